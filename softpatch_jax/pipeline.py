"""The SoftPatch / PatchCore pipeline as composable functions, and `run`.

    images --backbone--> layer maps --features--> (N, P, 1024) patch features
      --denoise--> (N, P) outlier weights, noise mask
      --coreset--> memory bank (features + weights)
      --scoring--> patch scores --> image score (max), pixel map

`extract_features`, `fit_bank`, `predict` and `evaluate` are the stages;
`run_category` chains them for one dataset category and several methods
(features are extracted once and shared by all methods); `run` loops over
categories and writes results.csv / results.json / heatmaps into the workdir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import features as features_lib
from softpatch_jax import io_utils
from softpatch_jax import metrics
from softpatch_jax import scoring
from softpatch_jax import viz
from softpatch_jax.progress import Progress

# Method presets. "denoise" is the noise discriminator (None: no denoising),
# "coreset" the subsampler, "soft" whether scores are re-weighted.
METHODS = {
    "softpatch_lof": dict(denoise="lof", coreset="greedy", soft=True),
    "softpatch_nearest": dict(denoise="nearest", coreset="greedy", soft=True),
    "softpatch_gaussian": dict(denoise="gaussian", coreset="greedy",
                               soft=True),
    "patchcore": dict(denoise=None, coreset="greedy", soft=False),
    "patchcore_random": dict(denoise=None, coreset="random", soft=False),
    # Full memory bank, no subsampling: an upper reference for small data.
    "patchcore_full": dict(denoise=None, coreset="identity", soft=False),
}
# Short aliases accepted in configs.
_ALIASES = {"softpatch": "softpatch_lof"}


def method_spec(name: str) -> dict:
  key = _ALIASES.get(name, name)
  if key not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from "
                     f"{sorted(METHODS) + sorted(_ALIASES)}")
  return dict(METHODS[key], name=key)


def parse_methods(methods) -> List[str]:
  if isinstance(methods, str):
    methods = [m.strip() for m in methods.split(",") if m.strip()]
  names = [method_spec(m)["name"] for m in methods]
  if not names:
    raise ValueError("config.methods is empty")
  return names


# --------------------------------------------------------------------------
# Stage 1: features.


@dataclasses.dataclass
class FeatureExtractor:
  """Backbone + patch-feature aggregation, jitted as one function.

  Batches are padded to `batch_size` so that one compiled program serves
  every batch, the last partial one included.
  """
  backbone: backbones.Backbone
  patchsize: int = 3
  pretrain_embed_dim: int = 1024
  target_embed_dim: int = 1024
  batch_size: int = 16

  def __post_init__(self):
    layers = tuple(self.backbone.layers)

    module = self.backbone.module

    # The weights are an argument, not closed-over constants, so they are
    # not baked into the compiled program.
    def fn(variables, images):
      maps = module.apply(variables, images)
      feats, grid = features_lib.patch_features(
          [maps[name] for name in layers], patchsize=self.patchsize,
          pretrain_embed_dim=self.pretrain_embed_dim,
          target_embed_dim=self.target_embed_dim)
      return feats

    self._fn = jax.jit(fn)
    self._grid = None

  def grid(self, image_size) -> tuple:
    """The (h, w) patch grid for `image_size` input, via shape inference."""
    if self._grid is None or self._grid[0] != tuple(image_size):
      spec = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
      maps = jax.eval_shape(self.backbone, spec)
      first = maps[self.backbone.layers[0]]
      self._grid = (tuple(image_size), (int(first.shape[1]),
                                        int(first.shape[2])))
    return self._grid[1]

  def __call__(self, images: np.ndarray) -> jax.Array:
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(f"batch of {n} images exceeds batch_size "
                       f"{self.batch_size}")
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad], 0)
    return self._fn(self.backbone.variables, jnp.asarray(images))[:n]


def check_finite(x, what: str) -> None:
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ValueError(
        f"{what} contain {bad} non-finite values (NaN/inf) out of "
        f"{np.size(x)}; the backbone weights or the input images are broken")


def extract_features(extractor: FeatureExtractor, stream, total=None,
                     desc="features", storage_dtype=np.float32) -> np.ndarray:
  """Runs the extractor over a batch stream -> (N, P, D) numpy array."""
  chunks = []
  for batch in Progress(stream, total=total, desc=desc, unit="batches"):
    f = np.asarray(extractor(batch.images))
    check_finite(f, f"features of {desc}")
    chunks.append(f.astype(storage_dtype, copy=False))
  if not chunks:
    raise ValueError(f"no images to extract features from ({desc})")
  return np.concatenate(chunks, 0)


# --------------------------------------------------------------------------
# Stage 2+3: denoise and coreset -> memory bank.


@dataclasses.dataclass
class FitInfo:
  """What fitting did, for the results file and for diagnosis."""
  method: str
  n_images: int
  n_patches: int
  bank_size: int
  n_noise_patches: int = 0
  threshold: Optional[float] = None
  # (N,) fraction of each training image's patches flagged as noise.
  image_noise_fraction: Optional[np.ndarray] = None
  # (N, P) outlier weights; kept for analysis, not saved in the bank.
  weights: Optional[np.ndarray] = None
  fit_s: float = 0.0


def fit_bank(train_feats, method: str, key, *, lof_k: int = 6,
             noise_fraction: float = 0.15, coreset_fraction: float = 0.1,
             num_starts: int = 10, projection_dim: int = 128,
             soft_weight: Optional[bool] = None, grid=(28, 28),
             image_size=(224, 224), blur_sigma: float = 4.0):
  """Fits a memory bank on (N, P, D) training patch features.

  Args:
    train_feats: (N, P, D) patch features of the N training images.
    method: a key of METHODS.
    key: jax PRNG key; the projection and the coreset starts come from it.
    soft_weight: overrides the method's re-weighting flag when not None.

  Returns:
    (MemoryBank, FitInfo).
  """
  t0 = time.perf_counter()
  spec = method_spec(method)
  train_feats = jnp.asarray(train_feats, jnp.float32)
  if train_feats.ndim != 3:
    raise ValueError(f"train features must be (N, P, D), got "
                     f"{train_feats.shape}")
  n, p, d = train_feats.shape
  if n < 1:
    raise ValueError("cannot fit a memory bank on 0 training images")
  check_finite(np.asarray(train_feats), "training features")
  flat = train_feats.reshape(n * p, d)
  proj_key, coreset_key = jax.random.split(key)
  # One projection serves the noise discriminator and the coreset (the
  # reference accidentally draws a second one for the coreset).
  proj = denoise.make_projection(proj_key, d, projection_dim)
  reduced = denoise.project(flat, proj)

  info = FitInfo(method=spec["name"], n_images=n, n_patches=n * p,
                 bank_size=0)
  sampling_weight = None
  soft = jnp.ones((n * p,), jnp.float32)
  if spec["denoise"] is not None:
    if n < 2:
      raise ValueError(f"{spec['name']} needs at least 2 training images to "
                       f"compare patches across images, got {n}")
    w = denoise.patch_weights(reduced.reshape(n, p, projection_dim),
                              spec["denoise"], lof_k=lof_k)
    noise, soft, t = denoise.denoise(w, noise_fraction)
    sampling_weight = jnp.where(noise, 0.0, 1.0).reshape(-1)
    soft = soft.reshape(-1)
    info.threshold = float(t)
    info.n_noise_patches = int(noise.sum())
    info.image_noise_fraction = np.asarray(noise.mean(axis=1))
    info.weights = np.asarray(w)

  m = n * p
  if spec["coreset"] == "identity":
    if sampling_weight is None:
      idx = coreset.identity(m)
    else:
      idx = jnp.nonzero(sampling_weight > 0)[0].astype(jnp.int32)
  else:
    n_select = coreset.num_samples(m, coreset_fraction)
    if spec["coreset"] == "greedy":
      idx = coreset.greedy(reduced, n_select, coreset_key,
                           sampling_weight=sampling_weight,
                           num_starts=num_starts)
    elif spec["coreset"] == "random":
      idx = coreset.random(m, n_select, coreset_key)
    else:
      raise ValueError(f"unknown coreset {spec['coreset']!r}")
  idx = jnp.asarray(idx)
  use_soft = spec["soft"] if soft_weight is None else bool(soft_weight)
  bank = scoring.make_bank(flat[idx], soft[idx], soft_weight=use_soft,
                           grid=grid, image_size=image_size,
                           blur_sigma=blur_sigma)
  jax.block_until_ready(bank.features)
  info.bank_size = bank.size
  info.fit_s = time.perf_counter() - t0
  return bank, info


# --------------------------------------------------------------------------
# Stage 4: prediction.


@dataclasses.dataclass
class Predictions:
  image_scores: np.ndarray           # (N,)
  maps: Optional[np.ndarray]         # (N, H, W) or None when not kept
  labels: np.ndarray                 # (N,)
  masks: Optional[np.ndarray]        # (N, H, W) or None
  indices: np.ndarray                # (N,) indices into the sample list


def predict_features(banks: Dict[str, scoring.MemoryBank], feats,
                     pad_to: Optional[int] = None):
  """Scores one batch of (B, P, D) features against several banks.

  With `pad_to`, a short (last) batch is zero-padded to that size and the
  padding dropped again, so every batch reuses one compiled program.
  """
  out = {}
  n = feats.shape[0]
  feats = jnp.asarray(feats)
  if pad_to is not None and n < pad_to:
    feats = jnp.pad(feats, ((0, pad_to - n), (0, 0), (0, 0)))
  for name, bank in banks.items():
    img, maps, _ = scoring.score_batch(bank, feats)
    out[name] = (np.asarray(img)[:n], np.asarray(maps)[:n])
  return out


def predict(banks: Dict[str, scoring.MemoryBank], extractor, stream,
            total=None, keep_maps=True, desc="predict",
            on_batch=None) -> Dict[str, Predictions]:
  """Streams test batches once and scores them against every bank."""
  scores = {k: [] for k in banks}
  maps = {k: [] for k in banks}
  labels, masks, indices = [], [], []
  for batch in Progress(stream, total=total, desc=desc, unit="batches"):
    feats = extractor(batch.images)
    check_finite(np.asarray(feats), f"features of {desc}")
    res = predict_features(banks, feats,
                           pad_to=getattr(extractor, "batch_size", None))
    for k, (img, amap) in res.items():
      scores[k].append(img)
      if keep_maps:
        maps[k].append(amap)
    labels.append(np.asarray(batch.labels))
    indices.append(np.asarray(batch.indices))
    if batch.masks is not None:
      masks.append(np.asarray(batch.masks, np.float32))
    if on_batch is not None:
      on_batch(batch, res)
  if not labels:
    raise ValueError(f"no images to score ({desc})")
  labels_a = np.concatenate(labels)
  masks_a = np.concatenate(masks) if masks and len(masks) == len(labels) \
      else None
  return {k: Predictions(image_scores=np.concatenate(scores[k]),
                         maps=np.concatenate(maps[k]) if keep_maps else None,
                         labels=labels_a, masks=masks_a,
                         indices=np.concatenate(indices))
          for k in banks}


def evaluate(pred: Predictions, pixel_metrics: bool = True) -> dict:
  """Image AUROC / F1-max, and pixel AUROC / AUPRO when masks exist.

  Metrics that cannot be computed (no masks, one class only) are None and
  are written as "n/a", never as 0.
  """
  res = {"image_auroc": None, "image_f1_max": None, "pixel_auroc": None,
         "aupro": None}
  labels = np.asarray(pred.labels)
  known = labels >= 0
  if known.any() and len(np.unique(labels[known])) == 2:
    res["image_auroc"] = float(metrics.image_auroc(labels[known],
                                                   pred.image_scores[known]))
    res["image_f1_max"] = float(metrics.f1_max(labels[known],
                                               pred.image_scores[known]))
  if (pixel_metrics and pred.masks is not None and pred.maps is not None
      and pred.masks.max() > 0 and pred.masks.min() < 1):
    res["pixel_auroc"] = float(metrics.pixel_auroc(pred.masks, pred.maps))
    res["aupro"] = float(metrics.aupro(pred.masks, pred.maps))
  return res


# --------------------------------------------------------------------------
# Orchestration.


def build_backbone(config) -> backbones.Backbone:
  layers = tuple(config.backbone.layers) if config.backbone.get(
      "layers") else None
  return backbones.load(config.backbone.name,
                        weights=config.backbone.get("weights", "imagenet"),
                        layers=layers, seed=config.seed)


def build_extractor(config, bb) -> FeatureExtractor:
  return FeatureExtractor(
      backbone=bb, patchsize=config.features.patchsize,
      pretrain_embed_dim=config.features.pretrain_embed_dim,
      target_embed_dim=config.features.target_embed_dim,
      batch_size=config.data.batch_size)


def build_preprocess(config, bb):
  from softpatch_jax.data import Preprocess  # pylint: disable=g-import-not-at-top
  return Preprocess(resize=config.data.resize, crop=config.data.crop,
                    mean=tuple(bb.mean), std=tuple(bb.std))


def build_augment(config):
  """The transforms applied to injected training copies (config.noise)."""
  from softpatch_jax.data.augment import Augment  # pylint: disable=g-import-not-at-top
  nc = config.noise
  return Augment(affine=nc.get("augment_affine", True),
                 rotate=nc.get("augment_rotate", True),
                 noise=nc.get("augment_noise", False),
                 blur=nc.get("augment_blur", False))


def fit_kwargs(config, grid, image_size) -> dict:
  return dict(lof_k=config.denoise.lof_k,
              noise_fraction=config.denoise.noise_fraction,
              coreset_fraction=config.coreset.fraction,
              num_starts=config.coreset.num_starts,
              projection_dim=config.coreset.projection_dim,
              soft_weight=config.scoring.get("soft_weight", None),
              grid=grid, image_size=image_size,
              blur_sigma=config.scoring.blur_sigma)


def _n_batches(n, bs):
  return (n + bs - 1) // bs


def run_category(config, category: str, train, test, bb, extractor,
                 workdir: str, noise_info: Optional[dict] = None) -> List[dict]:
  """Fits every configured method on one category and evaluates it."""
  from softpatch_jax.data import stream_batches  # pylint: disable=g-import-not-at-top
  methods = parse_methods(config.methods)
  pre = build_preprocess(config, bb)
  image_size = (config.data.crop, config.data.crop)
  grid = extractor.grid(image_size)
  bs, nw = config.data.batch_size, config.data.num_workers
  augment = build_augment(config)

  t0 = time.perf_counter()
  train_feats = extract_features(
      extractor, stream_batches(train, pre, batch_size=bs, num_workers=nw,
                                with_masks=False, augment=augment),
      total=_n_batches(len(train), bs), desc=f"{category}: train features")
  extract_s = time.perf_counter() - t0
  logging.info("%s: train features %s (%.1fs)", category, train_feats.shape,
               extract_s)

  key = jax.random.PRNGKey(config.seed)
  banks, infos = {}, {}
  for name in methods:
    bank, info = fit_bank(train_feats, name, key,
                          **fit_kwargs(config, grid, image_size))
    banks[name], infos[name] = bank, info
    logging.info("%s / %s: bank %d of %d patches, %d noise patches (%.1fs)",
                 category, name, info.bank_size, info.n_patches,
                 info.n_noise_patches, info.fit_s)
  del train_feats

  t0 = time.perf_counter()
  from softpatch_jax.data import has_pixel_labels  # pylint: disable=g-import-not-at-top
  has_masks = has_pixel_labels(test)
  preds = predict(banks, extractor,
                  stream_batches(test, pre, batch_size=bs, num_workers=nw,
                                 with_masks=has_masks),
                  total=_n_batches(len(test), bs),
                  desc=f"{category}: test")
  predict_s = time.perf_counter() - t0

  injected = np.array([bool(getattr(s, "injected", False)) for s in train])
  rows = []
  for name in methods:
    res = evaluate(preds[name], pixel_metrics=has_masks)
    info = infos[name]
    row = dict(category=category, method=name, **res,
               n_train=len(train), n_injected=int(injected.sum()),
               n_test=len(test),
               n_test_anomalous=int(sum(s.label == 1 for s in test)),
               bank_size=info.bank_size, n_noise_patches=info.n_noise_patches,
               extract_s=round(extract_s, 3), fit_s=round(info.fit_s, 3),
               predict_s=round(predict_s, 3))
    if info.image_noise_fraction is not None and injected.any():
      # How much of the injected images the discriminator flagged as noise,
      # against the clean ones: the denoising at work.
      row["noise_frac_injected"] = float(
          info.image_noise_fraction[injected].mean())
      row["noise_frac_clean"] = float(
          info.image_noise_fraction[~injected].mean()) if (~injected).any() \
          else None
    rows.append(row)
    logging.info("%s / %s: %s", category, name,
                 {k: v for k, v in res.items() if v is not None})

  if config.output.num_heatmaps > 0:
    injected_paths = {s.path for s in train if getattr(s, "injected", False)}
    write_heatmaps(os.path.join(workdir, "heatmaps", f"{category}.png"),
                   test, preds, methods, pre, config.output.num_heatmaps,
                   injected_paths)
  if noise_info is not None:
    io_utils.write_json(os.path.join(workdir, "noise", f"{category}.json"),
                        noise_info)
  return rows


def write_heatmaps(path, test, preds, methods, pre, num, injected_paths=()):
  """PNG: rows of defective test images; columns input | methods | mask.

  Test images that were also injected into training (overlap protocol) are
  marked: they are the ones PatchCore tends to miss.
  """
  from softpatch_jax.data import stream_batches  # pylint: disable=g-import-not-at-top
  first = preds[methods[0]]
  defective = [i for i, lab in enumerate(first.labels) if lab == 1]
  # Half the rows (at most) show defects that were also injected into
  # training, where the methods differ most; the rest are ordinary ones.
  seen = [i for i in defective
          if test[int(first.indices[i])].path in injected_paths]
  seen = seen[:num // 2]
  order = sorted(seen + [i for i in defective if i not in seen][:num - len(seen)])
  if not order or first.maps is None:
    return
  samples = [test[int(first.indices[i])] for i in order]
  batch = next(iter(stream_batches(samples, pre, batch_size=len(samples),
                                   num_workers=2,
                                   with_masks=first.masks is not None)))
  images = [viz.to_uint8_image(im, pre.mean, pre.std) for im in batch.images]
  # Colour scale per method: the median test pixel is dark, the 99.9th
  # percentile is full heat.
  scales = {name: np.percentile(preds[name].maps, [50.0, 99.9])
            for name in methods}
  rows = []
  for r, i in enumerate(order):
    row = [images[r]]
    for name in methods:
      lo, hi = scales[name]
      row.append(viz.overlay(images[r], preds[name].maps[i], float(lo),
                             float(hi)))
    if batch.masks is not None:
      row.append(viz.mask_outline(images[r], batch.masks[r]))
    rows.append(row)
  cols = ["input"] + list(methods) + (["mask"] if batch.masks is not None
                                      else [])
  titles = [f"{os.path.basename(s.path)} ({s.defect_type})"
            + (" [also injected into train]" if s.path in injected_paths
               else "") for s in samples]
  io_utils.save_image(path, viz.tile_rows(rows, titles, cols))


def load_dataset(config, category: str, workdir: str):
  """Returns (train, test) sample lists for one category of config.data."""
  from softpatch_jax import data  # pylint: disable=g-import-not-at-top
  ds = config.data.dataset
  if ds == "mvtec":
    return data.mvtec.load_category(config.data.root, category)
  if ds == "btad":
    return data.btad.load_category(config.data.root, category)
  if ds == "folder":
    return data.folder.load_folder(config.data.train_dir,
                                   config.data.get("test_dir") or None)
  if ds == "elpv":
    return data.elpv.load_category(
        category, seed=config.data.split_seed,
        test_normal_fraction=config.data.test_normal_fraction,
        max_train=config.data.get("max_train") or None)
  if ds == "synthetic":
    return data.mvtec.load_category(_synthetic_root(config, workdir),
                                    category)
  raise ValueError(f"unknown config.data.dataset {ds!r}; choose from mvtec, "
                   "btad, folder, elpv, synthetic")


def _synthetic_root(config, workdir):
  """Generates the synthetic data set once per parameter set.

  The parameters are recorded beside the data; other parameters (or an
  interrupted generation, which leaves no record) mean a fresh generation
  into a temporary folder that then replaces the old one.
  """
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from softpatch_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "synthetic_data")
  s = config.data.synthetic
  params = dict(categories=list(list_categories(config, workdir=None)),
                n_train=s.n_train, n_test_good=s.n_test_good,
                n_test_defect=s.n_test_defect, size=s.size, seed=s.seed)
  record = os.path.join(root, "params.json")
  try:
    with open(record, encoding="utf-8") as f:
      if json.load(f) == params:
        return root
  except (OSError, ValueError):
    pass
  tmp = tempfile.mkdtemp(prefix=".synthetic_data.", dir=workdir)
  try:
    synthetic.make_mvtec_like(tmp, categories=tuple(params["categories"]),
                              **{k: v for k, v in params.items()
                                 if k != "categories"})
    io_utils.write_json(os.path.join(tmp, "params.json"), params)
    if os.path.exists(root):
      shutil.rmtree(root)
    os.replace(tmp, root)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def list_categories(config, workdir=None) -> List[str]:
  cats = config.data.get("categories")
  if isinstance(cats, str):
    cats = [c.strip() for c in cats.split(",") if c.strip()]
  if cats:
    return list(cats)
  ds = config.data.dataset
  if ds == "mvtec":
    from softpatch_jax.data import mvtec  # pylint: disable=g-import-not-at-top
    return mvtec.list_categories(config.data.root)
  if ds == "btad":
    from softpatch_jax.data import btad  # pylint: disable=g-import-not-at-top
    return btad.list_categories(config.data.root)
  if ds == "elpv":
    return ["mono", "poly"]
  if ds == "folder":
    return ["folder"]
  return ["synth"]


def apply_noise(config, category, train, test):
  """Applies the noisy-training protocol of config.noise (DESIGN §1.8)."""
  from softpatch_jax.data import noise  # pylint: disable=g-import-not-at-top
  nc = config.noise
  if not nc.ratio:
    return train, test, None
  source = None
  if nc.get("source", "test") == "uncertain":
    from softpatch_jax.data import elpv  # pylint: disable=g-import-not-at-top
    if config.data.dataset != "elpv":
      raise ValueError("config.noise.source='uncertain' needs the elpv "
                       "dataset")
    source = elpv.uncertain_samples(category)
  train, test, info = noise.inject(
      train, test, ratio=nc.ratio, overlap=nc.overlap,
      seed=nc.seed, augment=nc.augment, source=source,
      resample=nc.get("resample", False))
  info = dict(info, category=category)
  return train, test, info


def subsample_test(test, max_test: int, seed: int):
  """A seeded subsample of at most `max_test` test images, per label.

  Keeps the normal/anomalous proportions (each label gets its share, at
  least one image), so a quick run still has both classes. Applied before
  noise injection, so with overlap the injected images stay in the test set.
  """
  if not max_test or len(test) <= max_test:
    return test
  rng = np.random.default_rng([seed, 2])
  labels = np.array([s.label for s in test])
  keep = []
  for lab in np.unique(labels):
    idx = np.flatnonzero(labels == lab)
    n = max(1, int(round(max_test * len(idx) / len(test))))
    keep += list(rng.choice(idx, size=min(n, len(idx)), replace=False))
  return [test[i] for i in sorted(keep)]


RESULT_FIELDS = ["category", "method", "image_auroc", "image_f1_max",
                 "pixel_auroc", "aupro", "n_train", "n_injected", "n_test",
                 "n_test_anomalous", "bank_size", "n_noise_patches",
                 "noise_frac_injected", "noise_frac_clean", "extract_s",
                 "fit_s", "predict_s"]


def summarize(rows: List[dict]) -> List[dict]:
  """Adds one 'mean' row per method over the categories."""
  out = []
  methods = []
  for r in rows:
    if r["method"] not in methods:
      methods.append(r["method"])
  for m in methods:
    rs = [r for r in rows if r["method"] == m]
    mean = {"category": "mean", "method": m}
    for k in ["image_auroc", "image_f1_max", "pixel_auroc", "aupro"]:
      vals = [r[k] for r in rs if r.get(k) is not None]
      mean[k] = float(np.mean(vals)) if vals else None
    for k in ["extract_s", "fit_s", "predict_s"]:
      mean[k] = round(float(np.sum([r[k] for r in rs])), 3)
    out.append(mean)
  return out


def format_table(rows: List[dict]) -> str:
  cols = ["category", "method", "image_auroc", "pixel_auroc", "aupro",
          "image_f1_max", "n_train", "n_injected", "fit_s"]

  def fmt(v):
    if v is None:
      return "n/a"
    if isinstance(v, float):
      return f"{v:.4f}"
    return str(v)

  table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths))
                   for row in table)


def run(config, workdir: str) -> dict:
  """Runs every configured method on every configured category.

  Writes into `workdir`: results.csv, results.json (per category and mean,
  with timings and the injected-noise record), heatmaps/<category>.png.
  Every file is written atomically, so an interrupted run leaves either the
  previous result or none, never a truncated one.
  """
  mode = config.get("mode", "evaluate")
  if mode == "fit":
    # Fit on an unlabelled folder and save a model artifact (no metrics).
    from softpatch_jax import fitting  # pylint: disable=g-import-not-at-top
    return fitting.fit_and_save(config, workdir)
  if mode != "evaluate":
    raise ValueError(f"config.mode must be 'evaluate' or 'fit', got {mode!r}")
  workdir = io_utils.ensure_writable_dir(workdir)
  t_start = time.perf_counter()
  # Categories first: a wrong data path fails before any weights load.
  cats = list_categories(config, workdir)
  parse_methods(config.methods)
  coreset.num_samples(1, config.coreset.fraction)  # (0, 1], before any work
  bb = build_backbone(config)
  extractor = build_extractor(config, bb)
  rows = []
  noise_records = {}
  for cat in cats:
    train, test = load_dataset(config, cat, workdir)
    test = subsample_test(test, config.data.get("max_test", 0),
                          config.data.get("split_seed", 0))
    train, test, noise_info = apply_noise(config, cat, train, test)
    if noise_info is not None:
      noise_records[cat] = noise_info
    logging.info("%s: %d train (%d injected), %d test", cat, len(train),
                 sum(bool(getattr(s, "injected", False)) for s in train),
                 len(test))
    rows += run_category(config, cat, train, test, bb, extractor, workdir,
                         noise_info)
    # Rewritten after every category so a long run can be inspected midway.
    result = _write_results(workdir, config, rows, noise_records,
                            time.perf_counter() - t_start, bb)
  print(format_table(rows + summarize(rows)), flush=True)
  print(f"results written to {os.path.join(workdir, 'results.csv')} and "
        "results.json", flush=True)
  return result


def _write_results(workdir, config, rows, noise_records, total_s, bb):
  all_rows = rows + summarize(rows)
  io_utils.write_csv(os.path.join(workdir, "results.csv"), all_rows,
                     RESULT_FIELDS)
  result = {
      "results": all_rows,
      "total_s": round(total_s, 3),
      "backbone": {"name": bb.name, "layers": list(bb.layers),
                   "weights_id": bb.weights_id},
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
      "noise": noise_records,
      "config": config.to_dict(),
  }
  io_utils.write_json(os.path.join(workdir, "results.json"), result)
  return result
