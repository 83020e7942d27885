"""A fitted model as one versioned file: save, load, and score with it.

File format (``model.softpatch``): one msgpack document written with
``flax.serialization.msgpack_serialize`` (no pickle, so loading a file never
runs code)::

    {"magic": "softpatch-jax model",
     "format_version": 1,
     "meta": "<JSON string>",           # everything that is not an array
     "arrays": {"bank_features": float32 (M, D),
                "bank_weights": float32 (M,),
                "heldout_image_scores": float32 (N,)   # optional
                "heldout_pixel_max": float32 (N,)}}    # optional

``meta`` holds the method, the backbone (name, taps, weights spec, seed and
the weights identity: the sha256 of the weights file or 'random:<seed>'), the
preprocessing (resize, crop, mean, std), the feature settings, the pixel-map
geometry, the thresholds (image, pixel, how they were chosen) and the full
config. Arrays are stored as float32 exactly as fitted, so a loaded model
scores bit for bit like the one that was saved.

The file is written to a temporary name and renamed into place, so an
interrupted save leaves the previous model (or none), never a truncated one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from softpatch_jax import io_utils
from softpatch_jax import scoring

MAGIC = "softpatch-jax model"
FORMAT_VERSION = 1
MODEL_FILENAME = "model.softpatch"


@dataclasses.dataclass
class FittedModel:
  """A memory bank plus everything needed to score new images with it.

  Attributes:
    bank_features: (M, D) float32 memory-bank patch features.
    bank_weights: (M,) float32 outlier weights of the bank patches.
    method: pipeline method name ('softpatch_lof', 'patchcore', ...).
    soft_weight: whether nearest distances are multiplied by bank weights.
    grid: (h, w) patch grid of one image.
    image_size: (H, W) network input size = pixel-map size.
    blur_sigma: Gaussian blur of the pixel maps.
    backbone: {'name', 'layers', 'weights', 'seed', 'weights_id'}.
    preprocess: {'resize', 'crop', 'mean', 'std', 'grayscale_to_rgb'}.
    features: {'patchsize', 'pretrain_embed_dim', 'target_embed_dim'}.
    thresholds: {'image', 'pixel', 'method', 'details'}; 'image'/'pixel' may
      be None when no threshold was chosen.
    config: the full fitting config as a plain dict.
    fit_info: bank size, noise patches, timings, ... (informational).
    heldout_image_scores: (N,) held-out training image scores, or None.
    heldout_pixel_max: (N,) max of each held-out pixel map, or None.
    format_version: file format version this model was read from / for.
  """
  bank_features: np.ndarray
  bank_weights: np.ndarray
  method: str
  soft_weight: bool
  grid: tuple
  image_size: tuple
  blur_sigma: float
  backbone: Dict[str, Any]
  preprocess: Dict[str, Any]
  features: Dict[str, Any]
  thresholds: Dict[str, Any]
  config: Dict[str, Any] = dataclasses.field(default_factory=dict)
  fit_info: Dict[str, Any] = dataclasses.field(default_factory=dict)
  heldout_image_scores: Optional[np.ndarray] = None
  heldout_pixel_max: Optional[np.ndarray] = None
  format_version: int = FORMAT_VERSION

  def __post_init__(self):
    self.bank_features = np.asarray(self.bank_features, np.float32)
    self.bank_weights = np.asarray(self.bank_weights, np.float32)
    self.grid = tuple(int(g) for g in self.grid)
    self.image_size = tuple(int(s) for s in self.image_size)
    self._bank = None

  # ---- derived objects ----------------------------------------------------

  @property
  def bank(self) -> scoring.MemoryBank:
    """The memory bank as a device pytree (built once, on first use)."""
    if self._bank is None:
      self._bank = scoring.make_bank(
          self.bank_features, self.bank_weights, soft_weight=self.soft_weight,
          grid=self.grid, image_size=self.image_size,
          blur_sigma=self.blur_sigma)
    return self._bank

  @property
  def image_threshold(self) -> Optional[float]:
    v = self.thresholds.get("image")
    return None if v is None else float(v)

  @property
  def pixel_threshold(self) -> Optional[float]:
    v = self.thresholds.get("pixel")
    return None if v is None else float(v)

  def make_preprocess(self):
    from softpatch_jax.data.preprocess import Preprocess  # pylint: disable=g-import-not-at-top
    p = self.preprocess
    return Preprocess(resize=p["resize"], crop=p["crop"],
                      mean=tuple(p["mean"]), std=tuple(p["std"]),
                      grayscale_to_rgb=bool(p.get("grayscale_to_rgb", True)))

  def build_backbone(self, weights: Optional[str] = None):
    """Rebuilds the recorded backbone and checks its weights identity.

    Args:
      weights: where to find the weights now ('imagenet', 'random', a .pth
        path) when they moved since fitting; default: the recorded spec.

    Raises:
      ValueError: the rebuilt weights are not the ones the model was fitted
        with (its scores would be meaningless).
    """
    from softpatch_jax import backbones  # pylint: disable=g-import-not-at-top
    b = self.backbone
    bb = backbones.load(b["name"],
                        weights=b["weights"] if weights is None else weights,
                        layers=tuple(b["layers"]), seed=int(b.get("seed", 0)))
    check_backbone(self, bb)
    return bb

  def make_extractor(self, bb, batch_size: int = 16):
    from softpatch_jax import pipeline  # pylint: disable=g-import-not-at-top
    f = self.features
    return pipeline.FeatureExtractor(
        backbone=bb, patchsize=int(f["patchsize"]),
        pretrain_embed_dim=int(f["pretrain_embed_dim"]),
        target_embed_dim=int(f["target_embed_dim"]),
        batch_size=int(batch_size))

  def score(self, feats, memory_budget_mb: Optional[float] = None):
    """(B, P, D) features -> (image scores (B,), pixel maps (B, H, W)).

    When the bank is larger than `memory_budget_mb` (default: the fitted
    config's scoring.memory_budget_mb), it is scanned in chunks that fit the
    budget; the result is the same as scoring against the whole bank.
    """
    if memory_budget_mb is None:
      memory_budget_mb = (self.config.get("scoring", {}) or {}).get(
          "memory_budget_mb")
    return score_with_budget(self, feats, memory_budget_mb)


# --------------------------------------------------------------------------
# Chunked scoring under a memory budget.


def _knn_chunk(queries, chunk, tile):
  # Called outside any enclosing jit on purpose: the kernel then runs as its
  # own compiled program, exactly as in an unchunked search.
  from softpatch_jax import kernels  # pylint: disable=g-import-not-at-top
  d, i = kernels.knn(queries, chunk, k=1, block_n=tile)
  return d[:, 0], i[:, 0]


@jax.jit
def _merge(best_d, best_i, d, i, offset):
  # Strictly smaller only: on a tie the earlier chunk (lower bank index)
  # wins, as in one unchunked argmin.
  better = d < best_d
  return jnp.where(better, d, best_d), jnp.where(better, i + offset, best_i)


@jax.jit
def _patch_scores(bank, feats):
  return scoring.patch_scores(bank, feats)[0]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _image_scores_and_maps(scores, grid, image_size, sigma):
  # One compiled program turns patch scores into outputs on both the chunked
  # and the unchunked path, so the two agree bit for bit.
  return jnp.max(scores, axis=-1), scoring.anomaly_maps(scores, grid,
                                                        image_size, sigma)


def rows_per_chunk(dim: int, memory_budget_mb: Optional[float]) -> Optional[int]:
  """Bank rows that fit the budget; None when there is no budget."""
  if memory_budget_mb is None or memory_budget_mb <= 0:
    return None
  return max(1, int(float(memory_budget_mb) * 2**20) // (4 * int(dim)))


def chunking(m: int, dim: int, memory_budget_mb: Optional[float]):
  """(chunk_rows, tile_rows) for a bank of m rows, or None: no chunking.

  The kNN kernel scans the bank in tiles of `tile` rows. Chunks are whole
  multiples of the tile the unchunked search uses, so every distance comes
  from the same tile computation and the scores are bit-identical to the
  unchunked ones (tested). Only a budget below one tile (1024 rows, 4 MiB
  for 1024-d features) needs smaller tiles; the nearest neighbours are then the same and
  the scores equal to float rounding (~1e-7 relative).
  """
  rows = rows_per_chunk(dim, memory_budget_mb)
  if rows is None or rows >= m:
    return None
  knn_module = importlib.import_module("softpatch_jax.kernels.knn")
  tile = int(knn_module.default_blocks(1, m, 1)[1])
  if rows >= tile:
    return (rows // tile) * tile, tile
  tile = max(8, (rows // 8) * 8)
  return tile, tile


def score_with_budget(model: FittedModel, feats, memory_budget_mb=None):
  """Image scores and pixel maps, chunking the bank when over budget."""
  feats = jnp.asarray(feats, jnp.float32)
  m, d = model.bank_features.shape
  if feats.ndim != 3 or feats.shape[-1] != d:
    raise ValueError(f"features must have shape (B, P, {d}) for this model, "
                     f"got {tuple(feats.shape)}")
  plan = chunking(m, d, memory_budget_mb)
  if plan is None:
    scores = _patch_scores(model.bank, feats)
  else:
    rows, tile = plan
    b, p, _ = feats.shape
    q = feats.reshape(b * p, d)
    best_d = jnp.full((b * p,), jnp.inf, jnp.float32)
    best_i = jnp.zeros((b * p,), jnp.int32)
    for start in range(0, m, rows):
      # Only one chunk of the bank is on the device at a time.
      chunk = jnp.asarray(model.bank_features[start:start + rows])
      dist, idx = _knn_chunk(q, chunk, tile)
      best_d, best_i = _merge(best_d, best_i, dist, idx, jnp.int32(start))
    if model.soft_weight:
      best_d = best_d * jnp.asarray(model.bank_weights)[best_i]
    scores = best_d.reshape(b, p)
  return _image_scores_and_maps(scores, model.grid, model.image_size,
                                float(model.blur_sigma))


# --------------------------------------------------------------------------
# Save / load.


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=io_utils._json_default))  # pylint: disable=protected-access


def to_bytes(model: FittedModel) -> bytes:
  meta = {
      "method": model.method,
      "soft_weight": bool(model.soft_weight),
      "grid": list(model.grid),
      "image_size": list(model.image_size),
      "blur_sigma": float(model.blur_sigma),
      "backbone": model.backbone,
      "preprocess": model.preprocess,
      "features": model.features,
      "thresholds": model.thresholds,
      "config": model.config,
      "fit_info": model.fit_info,
  }
  arrays = {"bank_features": np.ascontiguousarray(model.bank_features,
                                                  np.float32),
            "bank_weights": np.ascontiguousarray(model.bank_weights,
                                                 np.float32)}
  if model.heldout_image_scores is not None:
    arrays["heldout_image_scores"] = np.asarray(model.heldout_image_scores,
                                                np.float32)
  if model.heldout_pixel_max is not None:
    arrays["heldout_pixel_max"] = np.asarray(model.heldout_pixel_max,
                                             np.float32)
  payload = {"magic": MAGIC, "format_version": FORMAT_VERSION,
             "meta": json.dumps(_jsonable(meta), sort_keys=True),
             "arrays": arrays}
  return serialization.msgpack_serialize(payload)


def save_model(path: str, model: FittedModel) -> str:
  """Writes `model` to `path` atomically; returns the absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  check_finite_bank(model.bank_features, model.bank_weights, path)
  io_utils.write_bytes(path, to_bytes(model))
  return path


def resolve_model_path(path: str) -> str:
  """A model file, or a fit workdir holding model.softpatch."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    cand = os.path.join(path, MODEL_FILENAME)
    if not os.path.isfile(cand):
      raise ValueError(f"no {MODEL_FILENAME} in directory {path!r}; pass the "
                       "model file written by the fit command")
    return cand
  if not os.path.isfile(path):
    raise ValueError(f"model file does not exist: {path!r}")
  return path


def from_bytes(data: bytes, origin: str = "<bytes>") -> FittedModel:
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types
    raise ValueError(f"{origin} is not a readable SoftPatch model file "
                     f"(truncated or corrupt?): {type(e).__name__}: {e}"
                     ) from None
  if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
    raise ValueError(f"{origin} is not a SoftPatch model file (no "
                     f"{MAGIC!r} header)")
  version = payload.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(
        f"{origin} has model format version {version!r}, but this version of "
        f"softpatch_jax reads version {FORMAT_VERSION}; refit the model or use "
        "the matching softpatch_jax release")
  try:
    meta = json.loads(payload["meta"])
    arrays = payload["arrays"]
    feats = np.asarray(arrays["bank_features"])
    weights = np.asarray(arrays["bank_weights"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{origin}: model file is missing fields ({e})") from None
  if feats.dtype != np.float32 or feats.ndim != 2 or weights.shape != (
      feats.shape[0],):
    raise ValueError(f"{origin}: bad memory bank arrays: features "
                     f"{feats.dtype}{feats.shape}, weights "
                     f"{weights.dtype}{weights.shape}")
  check_finite_bank(feats, weights, origin)
  opt = lambda k: (np.asarray(arrays[k], np.float32) if k in arrays else None)
  return FittedModel(
      bank_features=feats, bank_weights=weights, method=meta["method"],
      soft_weight=bool(meta["soft_weight"]), grid=tuple(meta["grid"]),
      image_size=tuple(meta["image_size"]),
      blur_sigma=float(meta["blur_sigma"]), backbone=meta["backbone"],
      preprocess=meta["preprocess"], features=meta["features"],
      thresholds=meta["thresholds"], config=meta.get("config", {}),
      fit_info=meta.get("fit_info", {}),
      heldout_image_scores=opt("heldout_image_scores"),
      heldout_pixel_max=opt("heldout_pixel_max"),
      format_version=int(version))


def load_model(path: str, backbone=None) -> FittedModel:
  """Reads a model file (or a fit workdir).

  Args:
    path: the model file, or the directory that holds model.softpatch.
    backbone: optionally a backbones.Backbone to be used with the model; it
      must be the one the model was fitted with (name, taps, weights id).

  Raises:
    ValueError: unreadable file, wrong format version, non-finite bank, or a
      mismatched backbone.
  """
  path = resolve_model_path(path)
  with open(path, "rb") as f:
    data = f.read()
  model = from_bytes(data, origin=path)
  if backbone is not None:
    check_backbone(model, backbone)
  return model


def check_backbone(model: FittedModel, bb) -> None:
  """Refuses a backbone other than the one the model was fitted with."""
  rec = model.backbone
  if bb.name != rec["name"]:
    raise ValueError(f"backbone mismatch: the model was fitted with "
                     f"{rec['name']!r}, got {bb.name!r}")
  if tuple(bb.layers) != tuple(rec["layers"]):
    raise ValueError(f"backbone mismatch: the model was fitted with taps "
                     f"{tuple(rec['layers'])}, got {tuple(bb.layers)}")
  if bb.weights_id != rec["weights_id"]:
    raise ValueError(
        f"backbone weights mismatch for {rec['name']!r}: the model was fitted "
        f"with weights {rec['weights_id']!r}, got {bb.weights_id!r}; scores "
        "against this memory bank would be meaningless. Point to the original "
        "weights file")


def check_finite_bank(feats, weights, origin: str) -> None:
  for name, a in (("features", feats), ("weights", weights)):
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a))))
    if bad:
      raise ValueError(f"{origin}: memory bank {name} contain {bad} "
                       "non-finite values (NaN/inf); the model is broken")
