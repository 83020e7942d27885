"""Helpers shared by the test files (not a test module itself)."""

import functools
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image

from softpatch_jax import cli_flags
from softpatch_jax import features
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import scoring
from softpatch_jax import thresholds
from softpatch_jax.data import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args):
  """`python -m <module> <args>` in a new process on the CPU ->
  CompletedProcess (not checked)."""
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      check=False,
      timeout=300,
  )


def run_predict_cli(model, inputs, output):
  """The predict command in a new process -> CompletedProcess (not checked)."""
  return run_module(
      "softpatch_jax.predict",
      f"--model={model}",
      f"--input={inputs}",
      f"--output={output}",
  )


def load_config(name):
  """Loads the packaged config `name` (softpatch_jax/configs/<name>.py) the
  way the command line does and returns it."""
  spec = importlib.util.spec_from_file_location(
      name.replace("/", "_"), cli_flags.config_path(name)
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def fit_config(train_dir, folds=3, **overrides):
  """The fit_folder config shrunk for tests: 64 px, small batches.

  `overrides` use dotted keys given with '__' (e.g. threshold__method='f1'
  is not needed: pass {'threshold.method': 'f1'} via **{...}).
  """
  c = load_config("fit_folder")
  c.data.train_dir = str(train_dir)
  c.data.resize = c.data.crop = 64
  c.data.batch_size = 4
  c.data.num_workers = 1
  if folds is not None:
    c.threshold.folds = folds
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def points(rng, kind, m, d):
  """(m, d) float64 test points of one kind, each hard for pruned searches
  in its own way (the exact pruned k-center and kNN tests share them)."""
  if kind == "gauss":
    return rng.normal(size=(m, d))
  if kind == "clustered":
    k = int(rng.integers(1, 12))
    centres = rng.normal(size=(k, d)) * rng.uniform(2, 20)
    spread = rng.uniform(0.01, 1.0, size=(k, 1))
    lab = rng.integers(0, k, m)
    return centres[lab] + rng.normal(size=(m, d)) * spread[lab]
  if kind == "duplicates":
    x = rng.normal(size=(max(1, m // 4), d))
    return x[rng.integers(0, len(x), m)]
  if kind == "grid":  # small integers: many exactly equal distances
    return rng.integers(0, 3, size=(m, d)).astype(np.float64)
  if kind == "offset":  # far from the origin, small spread: cancellation
    return 1000.0 + rng.normal(size=(m, d)) * 0.1
  if kind == "lowrank":  # a principal projection holds everything
    return rng.normal(size=(m, 3)) @ rng.normal(size=(3, d))
  raise ValueError(kind)


def _numpy_dist_to(x, i):
  diff = x - x[i]
  return np.sqrt((diff * diff).sum(1))


def _numpy_start_distance(x, start_idx):
  """Mean distance to the starts, summed one start after the other in x's
  dtype (as the kernels do), without any weight."""
  starts = np.asarray(start_idx).ravel()
  acc = np.zeros(len(x), x.dtype)
  for s in starts:
    acc = acc + _numpy_dist_to(x, int(s))
  return acc / np.asarray(len(starts), x.dtype)


def numpy_greedy_kcenter(
    x, n_select, start_idx, weight=None, *, dtype=np.float32, first=None
):
  """Weighted greedy k-center in plain numpy (the kernels.kcenter contract).

  As documented at the top of kernels/kcenter.py: Euclidean distances from
  coordinate differences; the initial distance is the mean distance to the
  starting points times the weight; then n_select times pick the first
  argmax and lower the running minimum with distance * weight.

  Args:
    x: (M, d) points.
    n_select: number of centres to pick.
    start_idx: (S,) indices of the starting points.
    weight: (M,) sampling weights, or None for all ones.
    dtype: arithmetic precision. float32 (default) rounds like the kernels
      (the starts are summed one after the other), so selections can be
      compared exactly; float64 gives the exact-arithmetic answer.
    first: None, or an index forced as the first pick (the loop then goes
      on as usual from it).

  Returns:
    (n_select,) int32 indices in selection order.
  """
  x = np.asarray(x, dtype)
  w = np.ones(len(x), dtype) if weight is None else np.asarray(weight, dtype)
  dist_to = functools.partial(_numpy_dist_to, x)
  dist = _numpy_start_distance(x, start_idx) * w
  sel = []
  for t in range(int(n_select)):
    i = int(np.argmax(dist)) if first is None or t > 0 else int(first)
    sel.append(i)
    dist = np.minimum(dist, dist_to(i) * w)
  return np.array(sel, np.int32)


def numpy_reference_sampler(
    x, n_select, start_idx, weight, *, dtype=np.float32
):
  """The official SoftPatch code's weighted coreset sampler, in plain numpy.

  Every point starts at its mean distance to the starting points WITHOUT
  the weight; then n_select times: pick the first argmax, and lower the
  running minimum with distance * weight. So the first pick may be a
  zero-weight point. Rounds like `numpy_greedy_kcenter` (starts summed one
  after the other in `dtype`), so picks can be compared exactly.

  Returns:
    (picks (n_select,) int32, valid (n_select,) bool): valid marks the picks
    that are new and (after the first) of positive weight.
  """
  x = np.asarray(x, dtype)
  w = np.asarray(weight, dtype)
  dist_to = functools.partial(_numpy_dist_to, x)
  dist = _numpy_start_distance(x, start_idx)
  picks, valid = [], []
  for t in range(int(n_select)):
    i = int(np.argmax(dist))
    valid.append(i not in picks and (t == 0 or w[i] > 0))
    picks.append(i)
    dist = np.minimum(dist, dist_to(i) * w)
  return np.array(picks, np.int32), np.array(valid, bool)


def sklearn_lof(x, k, *, fit_dtype=None):
  """sklearn's LOF per position: (P, N, D) -> (P, N) float64.

  out[p] = -LocalOutlierFactor(n_neighbors=k).fit(x[p])
  .negative_outlier_factor_; sklearn's warning when k >= N (it then uses
  N - 1) is silenced.

  Args:
    x: (P, N, D) points, one independent LOF per position.
    k: n_neighbors.
    fit_dtype: dtype the points are cast to before fitting (None: as given).
  """
  from sklearn.neighbors import LocalOutlierFactor  # pylint: disable=g-import-not-at-top

  x = np.asarray(x) if fit_dtype is None else np.asarray(x, fit_dtype)
  out = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for p in range(x.shape[0]):
      clf = LocalOutlierFactor(n_neighbors=k).fit(x[p])
      out.append(-clf.negative_outlier_factor_)
  return np.stack(out).astype(np.float64)


def random_model(seed=0, m=40, d=16, grid=(4, 4), soft=True, **kw):
  """A FittedModel with a random bank and complete metadata (no backbone run).

  The recorded backbone is efficientnet_lite0 with a made-up weights id;
  pass backbone=model_meta.BackboneRecord(...) to record another one.
  """
  rng = np.random.default_rng(seed)
  return model_io.FittedModel(
      bank_features=rng.normal(size=(m, d)).astype(np.float32),
      bank_weights=rng.uniform(0.5, 2.0, size=(m,)).astype(np.float32),
      method="softpatch_lof",
      grid=grid,
      image_size=(4 * grid[0], 4 * grid[1]),
      backbone=kw.pop(
          "backbone",
          model_meta.BackboneRecord(
              "efficientnet_lite0", ("stage3", "stage5"), "imagenet", 0, "abc"
          ),
      ),
      preprocess={
          "resize": 64,
          "crop": 64,
          "mean": [0.5] * 3,
          "std": [0.5] * 3,
          "grayscale_to_rgb": True,
      },
      embed=features.EmbedOptions(3, d, d),
      scoring=scoring.ScoringOptions(soft_weight=soft, blur_sigma=2.0),
      thresholds=thresholds.ChosenThresholds(1.5, 1.25, "manual"),
      batch_size=kw.pop("batch_size", 16),
      config={"seed": 0, "nested": {"a": [1, 2]}},
      heldout_image_scores=rng.uniform(size=(7,)).astype(np.float32),
      heldout_pixel_max=rng.uniform(size=(7,)).astype(np.float32),
      **kw,
  )


def sample_lists(n_train=40, n_good=12, n_bad=30, cat="c"):
  """(train, test) Sample lists with made-up paths; defects have masks."""
  train = [
      Sample(f"/d/train/{i:03d}.png", 0, "good", category=cat)
      for i in range(n_train)
  ]
  test = [
      Sample(f"/d/test/good/{i:03d}.png", 0, "good", category=cat)
      for i in range(n_good)
  ]
  test += [
      Sample(
          f"/d/test/bad/{i:03d}.png",
          1,
          "bad",
          f"/d/gt/bad/{i:03d}_mask.png",
          category=cat,
      )
      for i in range(n_bad)
  ]
  return train, test


def write_mvtec_layout(root, category, defects, n_train=10, normal="good"):
  """An MVTec-style category of tiny PNGs under root; returns its folder.

  defects: {test sub-folder: number of images}; every folder other than
  `normal` gets a mask per image under ground_truth/<folder>/<stem>_mask.png.
  Files are named 000.png, 001.png, ...; train/<normal> gets n_train images.
  """
  cat = os.path.join(str(root), category)
  folders = {
      os.path.join("train", normal): n_train,
      **{os.path.join("test", d): n for d, n in defects.items()},
  }
  for sub, n in folders.items():
    os.makedirs(os.path.join(cat, sub), exist_ok=True)
    dtype = os.path.basename(sub)
    for i in range(n):
      Image.new("L", (4, 4), i).save(os.path.join(cat, sub, f"{i:03d}.png"))
      if sub.startswith("test") and dtype != normal:
        gt = os.path.join(cat, "ground_truth", dtype)
        os.makedirs(gt, exist_ok=True)
        Image.new("L", (4, 4), 255).save(os.path.join(gt, f"{i:03d}_mask.png"))
  return cat


def gaussian_loo(xj, reg=0.01):
  """Point i against the others' Gaussian, shrunk by Ledoit-Wolf (float64):
  written from the definitions, one covariance and inverse per point."""
  n, d = xj.shape
  c = xj - xj.mean(0)
  s = c.T @ c / n
  mu = np.trace(s) / d
  spread = np.sum((s - mu * np.eye(d)) ** 2) / d
  b2 = sum(np.sum((np.outer(v, v) - s) ** 2) for v in c) / n**2 / d
  alpha = min(b2, spread) / spread if spread > 0 else 0.0
  out = np.empty(n)
  for i in range(n):
    others = np.delete(xj, i, axis=0)
    oc = others - others.mean(0)
    cov = oc.T @ oc / max(n - 2, 1)
    sig = (1 - alpha) * cov + (alpha * mu + reg) * np.eye(d)
    v = xj[i] - others.mean(0)
    out[i] = np.sqrt(v @ np.linalg.inv(sig) @ v)
  return out
