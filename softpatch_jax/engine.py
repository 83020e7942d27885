"""The fitting stages chained over image streams: embed, fit banks.

This module sits between the pure core (features, methods, scoring) and the
edge (experiment, fit, predict). It reads images through `data` and shows
progress bars, but writes no files and prints nothing else. The sequence
preprocess -> grid -> stream -> embed -> fit is written once here
(`fit_methods`); `inference` scores image streams.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import feature_store
from softpatch_jax import features as features_lib
from softpatch_jax import methods as methods_lib
from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.data import _files
from softpatch_jax.progress import Progress

BROKEN_HINT = "the backbone weights or the input images are broken"


# --------------------------------------------------------------------------
# Embedding.


class Embedder:
  """`features.embed` bound to a backbone's weights, over fixed-size batches.

  Batches are padded to `batch_size` so that one compiled program serves
  every batch, the last partial one included (per device with a `mesh`).
  """

  def __init__(self, variables, spec, batch_size=16, mesh=None):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.variables = variables
    self.spec = spec
    self.mesh = mesh
    self.batch_size = int(batch_size) * getattr(mesh, "size", 1)
    self._grids = {}

  def grid(self, image_size) -> tuple:
    """The (h, w) patch grid for `image_size` input."""
    image_size = tuple(int(s) for s in image_size)
    if image_size not in self._grids:
      self._grids[image_size] = features_lib.grid_shape(
          self.variables, self.spec, image_size
      )
    return self._grids[image_size]

  def __call__(self, images: np.ndarray) -> jax.Array:
    """(B, H, W, 3) normalised images, B <= batch_size -> (B, P, D)."""
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(
          f"batch of {n} images exceeds batch_size {self.batch_size}"
      )
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad], 0)
    return parallel.embed(self.variables, images, self.spec, self.mesh)[:n]


def embed_spec(
    bb: backbones.Backbone, features_config
) -> features_lib.EmbedSpec:
  """The EmbedSpec of a backbone and a config.features-like mapping."""
  f = features_config
  return features_lib.EmbedSpec(
      module=bb.module,
      layers=tuple(bb.layers),
      patchsize=int(f["patchsize"]),
      pretrain_embed_dim=int(f["pretrain_embed_dim"]),
      target_embed_dim=int(f["target_embed_dim"]),
  )


def build_backbone(config) -> backbones.Backbone:
  layers = config.backbone.get("layers") or None
  return backbones.load(
      config.backbone.name,
      weights=config.backbone.get("weights", "imagenet"),
      layers=layers,  # a tuple or a comma string: backbones.load splits it
      seed=config.seed,
  )


def build_embedder(config, bb: backbones.Backbone) -> Embedder:
  mesh = parallel.mesh_from_config(config)
  spec = embed_spec(bb, config.features)
  return Embedder(bb.variables, spec, config.data.batch_size, mesh)


def build_preprocess(
    config, bb: backbones.Backbone, train: Sequence = ()
) -> data.Preprocess:
  """The preprocessing of `config.data` with the backbone's normalisation.

  In whole-image mode (config.data.crop 0 or None) the network input size
  follows the first training image's shape, so `train` must be given.
  """
  d = config.data
  crop = d.crop or None
  input_size = None
  if crop is None:
    if not train:
      raise ValueError(
          "whole-image mode (config.data.crop=0) takes its input size from "
          "the training images, and there are none"
      )
    input_size = data.whole_image_size(train[0].path, d.resize or None)
  return data.Preprocess(
      resize=d.resize or None,
      crop=crop,
      mean=tuple(bb.mean),
      std=tuple(bb.std),
      input_size=input_size,
      max_pixels=int(d.get("max_pixels", data.geometry.MAX_PIXELS)),
      max_aspect_ratio=float(
          d.get("max_aspect_ratio", data.geometry.MAX_ASPECT_RATIO)
      ),
  )


def preprocess_record(pre: data.Preprocess) -> dict:
  """The preprocessing as stored in a saved model (JSON types)."""
  return {
      "resize": pre.resize,
      "crop": pre.crop,
      "mean": list(pre.mean),
      "std": list(pre.std),
      "grayscale_to_rgb": bool(pre.grayscale_to_rgb),
      "input_size": list(pre.input_size) if pre.input_size else None,
      "max_pixels": int(pre.max_pixels),
      "max_aspect_ratio": float(pre.max_aspect_ratio),
  }


def preprocess_from_record(p) -> data.Preprocess:
  """Inverse of `preprocess_record`; models saved before the size bounds
  existed get the defaults."""
  size = p.get("input_size")
  return data.Preprocess(
      resize=p["resize"],
      crop=p["crop"],
      mean=tuple(p["mean"]),
      std=tuple(p["std"]),
      grayscale_to_rgb=bool(p.get("grayscale_to_rgb", True)),
      input_size=tuple(size) if size else None,
      max_pixels=int(p.get("max_pixels", data.geometry.MAX_PIXELS)),
      max_aspect_ratio=float(
          p.get("max_aspect_ratio", data.geometry.MAX_ASPECT_RATIO)
      ),
  )


def n_batches(n, bs):
  """Batches of size bs that hold n items."""
  return (n + bs - 1) // bs


def extract_features(
    embedder: Embedder,
    samples: Sequence,
    pre: data.Preprocess,
    *,
    num_workers: int = 2,
    augment=None,
    desc: str = "features",
    storage_dtype=np.float32,
    errors: str = "raise",
    what: str = "image",
    store: str = "memory",
) -> np.ndarray:
  """Embeds every sample -> (N, P, D) numpy array, with a progress bar.

  errors 'collect': read on past unreadable images, then raise one ValueError
  listing them all ('N <what>(s) cannot be read: ...'); 'raise': stop at the
  first. store: 'memory' or 'disk' (see `feature_store`).
  """
  bs = embedder.batch_size
  stream = data.stream_batches(
      samples,
      pre,
      batch_size=bs,
      num_workers=num_workers,
      with_masks=False,
      augment=augment,
      errors=errors,
  )
  # One preallocated array (or file), filled batch by batch: concatenating
  # chunks would hold every feature twice at the peak.
  out, failed = feature_store.Writer(len(samples), storage_dtype, store), []
  for batch in Progress(
      stream, total=n_batches(len(samples), bs), desc=desc, unit="batches"
  ):
    failed += [(samples[i].path, msg) for i, msg in batch.errors]
    if failed or batch.images is None:
      continue  # the run fails anyway: only look for more unreadable files
    f = np.asarray(embedder(batch.images))
    validation.check_finite(f, f"features of {desc}", BROKEN_HINT)
    out.write(f)
  if failed:
    raise ValueError(_files.unreadable_message(failed, what))
  if not out.filled:
    raise ValueError(f"no images to extract features from ({desc})")
  return out.finish()


# --------------------------------------------------------------------------
# Fitting.


@dataclasses.dataclass
class FitInfo:
  """What fitting did, for the results files and for diagnosis."""

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
  # (bank_size,) the training image each bank entry came from.
  bank_images: Optional[np.ndarray] = None
  fit_s: float = 0.0
  train_images: Optional[np.ndarray] = None  # those kept by an image filter


def bank_options(config) -> dict:
  """build_bank keyword arguments from a config (all but grid / image size)."""
  return dict(
      lof_k=config.denoise.lof_k,
      fusion=config.denoise.get("fusion", "rank"),
      noise_fraction=config.denoise.noise_fraction,
      coreset_fraction=config.coreset.fraction,
      num_starts=config.coreset.num_starts,
      projection_dim=config.coreset.projection_dim,
      reference_quirks=bool(config.coreset.get("reference_quirks", False)),
      coreset_impl=config.coreset.get("impl", "auto"),
      soft_weight=config.scoring.get("soft_weight", None),
      blur_sigma=config.scoring.blur_sigma,
      search=config.scoring.get("search", "auto"),
  )


def max_bank_rows(config, dim: int) -> Optional[int]:
  """config.scoring.memory_budget_mb as bank rows (None: no limit)."""
  return scoring.rows_for_budget(
      dim, config.scoring.get("memory_budget_mb", None)
  )


def fit_bank(train_feats, method, key, *, label: str = "fit", **options):
  """`methods.build_bank` on concrete data, timed and summarised: (bank, info).

  Logs what it is about to do and when the noise weights are done (each
  stage can take minutes); `label` prefixes those lines.
  """
  t0 = time.perf_counter()
  method = methods_lib.get_method(method)
  n, p = np.shape(train_feats)[:2]
  frac = options.get("coreset_fraction", methods_lib.CORESET_FRACTION)
  what = methods_lib.describe_fit(method, n, p, frac)
  logging.info("%s: %s: %s ...", label, method.name, what)

  def progress(stage):
    dt = time.perf_counter() - t0
    logging.info("%s: %s: %s done in %.1fs", label, method.name, stage, dt)

  bank, fit = methods_lib.build_bank(
      train_feats, key, method, progress=progress, **options
  )
  jax.block_until_ready(bank.features)
  info = FitInfo(
      method=method.name, n_images=n, n_patches=n * p, bank_size=bank.size
  )
  info.bank_images = np.asarray(coreset.compact((fit.indices, fit.valid))) // p
  if fit.noise is not None:
    info.threshold = float(fit.threshold)
    info.n_noise_patches = int(fit.noise.sum())
    info.image_noise_fraction = np.asarray(fit.noise.mean(axis=1))
    info.weights = np.asarray(fit.weights)
  info.fit_s = time.perf_counter() - t0
  return bank, info


@dataclasses.dataclass
class Fitted:
  """Banks fitted on one training set, with the features they came from."""

  banks: Dict[str, scoring.MemoryBank]
  infos: Dict[str, FitInfo]
  train_feats: np.ndarray
  grid: tuple
  image_size: tuple
  extract_s: float


def fit_methods(
    config,
    train: Sequence,
    embedder: Embedder,
    pre: data.Preprocess,
    method_names: Sequence[str],
    label: str = "fit",
    errors: str = "raise",
) -> Fitted:
  """Embeds the training samples once and fits every method on them.

  `label` (a category name) prefixes the progress bar and the log lines;
  `errors` as in `extract_features`.
  """
  desc = f"{label}: train features"
  image_size = pre.input_size or (pre.crop, pre.crop)
  grid = embedder.grid(image_size)
  t0 = time.perf_counter()
  train_feats = extract_features(
      embedder,
      train,
      pre,
      num_workers=config.data.num_workers,
      augment=data.build_augment(config),
      desc=desc,
      errors=errors,
      what="training image",
      store=config.data.get("feature_store", "memory"),
  )
  extract_s = time.perf_counter() - t0
  logging.info("%s %s (%.1fs)", desc, train_feats.shape, extract_s)
  key = jax.random.PRNGKey(config.seed)
  options = dict(bank_options(config), grid=grid, image_size=image_size)
  options["mesh"] = embedder.mesh
  banks, infos = {}, {}
  for name in method_names:
    banks[name], infos[name] = fit_bank(
        train_feats, name, key, label=label, **options
    )
    info = infos[name]
    logging.info(
        "%s / %s: bank %d of %d patches, %d noise patches (%.1fs)",
        label,
        name,
        info.bank_size,
        info.n_patches,
        info.n_noise_patches,
        info.fit_s,
    )
  return Fitted(banks, infos, train_feats, grid, image_size, extract_s)


def image_noise_summary(
    info: FitInfo, injected: np.ndarray
) -> Dict[str, Optional[float]]:
  """How much of the injected vs the clean images was flagged as noise."""
  if info.image_noise_fraction is None or not injected.any():
    return {}
  frac = info.image_noise_fraction
  return {
      "noise_frac_injected": float(frac[injected].mean()),
      "noise_frac_clean": (
          float(frac[~injected].mean()) if (~injected).any() else None
      ),
  }


def heldout_scores(
    train_feats,
    method,
    key,
    options,
    folds: List[np.ndarray],
    batch_size=16,
    max_bank_rows=None,
):
  """Held-out image scores and pixel-map maxima of every training image.

  Fold f is scored against a bank fitted (same method and settings, key
  folded with f) on the other folds.
  """
  n = train_feats.shape[0]
  img = np.zeros((n,), np.float32)
  pix = np.zeros((n,), np.float32)
  for f, held in enumerate(folds):
    rest = np.setdiff1d(np.arange(n), held)
    bank, _ = fit_bank(
        train_feats[rest], method, jax.random.fold_in(key, f + 1), **options
    )
    for s in range(0, held.size, batch_size):
      part = held[s : s + batch_size]
      i, maps, _ = scoring.score(
          bank, train_feats[part], max_bank_rows=max_bank_rows
      )
      img[part] = np.asarray(i)
      pix[part] = np.asarray(maps).reshape(part.size, -1).max(-1)
    logging.info(
        "threshold fold %d/%d: %d held out, bank %d",
        f + 1,
        len(folds),
        held.size,
        bank.size,
    )
  return img, pix
