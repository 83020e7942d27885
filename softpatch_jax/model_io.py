"""A fitted model as one versioned file: serialisation only (save and load).

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
import json
import math
import os
from typing import Any, Dict, Optional

from flax import serialization
import numpy as np

from softpatch_jax import io_utils
from softpatch_jax import methods
from softpatch_jax import scoring
from softpatch_jax import validation

MAGIC = "softpatch-jax model"
FORMAT_VERSION = 1
MODEL_FILENAME = "model.softpatch"


@dataclasses.dataclass
class FittedModel:
  """A memory bank plus everything needed to score new images with it.

  Attributes:
    bank_features: (M, D) float32 memory-bank patch features.
    bank_weights: (M,) float32 outlier weights of the bank patches.
    method: method name ('softpatch_lof', 'patchcore', ...).
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

  def _make_bank(self, features_on_host):
    return scoring.make_bank(
        self.bank_features,
        self.bank_weights,
        soft_weight=self.soft_weight,
        grid=self.grid,
        image_size=self.image_size,
        blur_sigma=self.blur_sigma,
        features_on_host=features_on_host,
        search=(self.config.get("scoring", {}) or {}).get("search", "auto"),
    )

  @property
  def bank(self) -> scoring.MemoryBank:
    """The memory bank as a device pytree (built once, on first use)."""
    if self._bank is None:
      self._bank = self._make_bank(features_on_host=False)
    return self._bank

  def host_bank(self) -> scoring.MemoryBank:
    """The memory bank with its features left in host memory (numpy)."""
    return self._make_bank(features_on_host=True)

  @property
  def image_threshold(self) -> Optional[float]:
    v = self.thresholds.get("image")
    return None if v is None else float(v)

  @property
  def pixel_threshold(self) -> Optional[float]:
    v = self.thresholds.get("pixel")
    return None if v is None else float(v)


# --------------------------------------------------------------------------
# Save / load.


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=io_utils._json_default))  # pylint: disable=protected-access


def _meta(model: FittedModel) -> dict:
  return {
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


def to_bytes(model: FittedModel) -> bytes:
  meta = _meta(model)
  arrays = {
      "bank_features": np.ascontiguousarray(model.bank_features, np.float32),
      "bank_weights": np.ascontiguousarray(model.bank_weights, np.float32),
  }
  if model.heldout_image_scores is not None:
    arrays["heldout_image_scores"] = np.asarray(
        model.heldout_image_scores, np.float32
    )
  if model.heldout_pixel_max is not None:
    arrays["heldout_pixel_max"] = np.asarray(
        model.heldout_pixel_max, np.float32
    )
  payload = {
      "magic": MAGIC,
      "format_version": FORMAT_VERSION,
      "meta": json.dumps(_jsonable(meta), sort_keys=True),
      "arrays": arrays,
  }
  return serialization.msgpack_serialize(payload)


def save_model(path: str, model: FittedModel) -> str:
  """Writes `model` to `path` atomically; returns the absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  check_finite_bank(model.bank_features, model.bank_weights, path)
  check_meta(_jsonable(_meta(model)), path)
  io_utils.write_bytes(path, to_bytes(model))
  return path


def resolve_model_path(path: str) -> str:
  """A model file, or a fit workdir holding model.softpatch."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    cand = os.path.join(path, MODEL_FILENAME)
    if not os.path.isfile(cand):
      raise ValueError(
          f"no {MODEL_FILENAME} in directory {path!r}; pass the "
          "model file written by the fit command"
      )
    return cand
  if not os.path.isfile(path):
    raise ValueError(f"model file does not exist: {path!r}")
  return path


def from_bytes(data: bytes, origin: str = "<bytes>") -> FittedModel:
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types
    raise ValueError(
        f"{origin} is not a readable SoftPatch model file "
        f"(truncated or corrupt?): {type(e).__name__}: {e}"
    ) from None
  if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
    raise ValueError(
        f"{origin} is not a SoftPatch model file (no {MAGIC!r} header)"
    )
  version = payload.get("format_version")
  if type(version) is not int:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(
        f"{origin}: format_version must be an integer, got {version!r} (a "
        f"{type(version).__name__}); the file was not written by softpatch_jax"
    )
  if version != FORMAT_VERSION:
    raise ValueError(
        f"{origin} has model format version {version!r}, but this version of "
        f"softpatch_jax reads version {FORMAT_VERSION}; refit the model or use "
        "the matching softpatch_jax release"
    )
  try:
    meta = json.loads(payload["meta"])
    arrays = payload["arrays"]
    if not isinstance(meta, dict) or not isinstance(arrays, dict):
      raise TypeError("meta and arrays must be mappings")
    feats = np.asarray(arrays["bank_features"])
    weights = np.asarray(arrays["bank_weights"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{origin}: model file is missing fields ({e})") from None
  if (
      feats.dtype != np.float32
      or feats.ndim != 2
      or weights.shape != (feats.shape[0],)
  ):
    raise ValueError(
        f"{origin}: bad memory bank arrays: features "
        f"{feats.dtype}{feats.shape}, weights "
        f"{weights.dtype}{weights.shape}"
    )
  check_finite_bank(feats, weights, origin)
  check_meta(meta, origin)
  opt = lambda k: (np.asarray(arrays[k], np.float32) if k in arrays else None)
  return FittedModel(
      bank_features=feats,
      bank_weights=weights,
      method=meta["method"],
      soft_weight=bool(meta["soft_weight"]),
      grid=tuple(meta["grid"]),
      image_size=tuple(meta["image_size"]),
      blur_sigma=float(meta["blur_sigma"]),
      backbone=meta["backbone"],
      preprocess=meta["preprocess"],
      features=meta["features"],
      thresholds=meta["thresholds"],
      config=meta.get("config", {}),
      fit_info=meta.get("fit_info", {}),
      heldout_image_scores=opt("heldout_image_scores"),
      heldout_pixel_max=opt("heldout_pixel_max"),
      format_version=int(version),
  )


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
    raise ValueError(
        "backbone mismatch: the model was fitted with "
        f"{rec['name']!r}, got {bb.name!r}"
    )
  if tuple(bb.layers) != tuple(rec["layers"]):
    raise ValueError(
        "backbone mismatch: the model was fitted with taps "
        f"{tuple(rec['layers'])}, got {tuple(bb.layers)}"
    )
  if bb.weights_id != rec["weights_id"]:
    raise ValueError(
        f"backbone weights mismatch for {rec['name']!r}: the model was fitted "
        f"with weights {rec['weights_id']!r}, got {bb.weights_id!r}; scores "
        "against this memory bank would be meaningless. Point to the original "
        "weights file"
    )


def check_finite_bank(feats, weights, origin: str) -> None:
  """Bank features and weights finite, weights >= 0 (scores stay >= 0)."""
  for name, a in (("features", feats), ("weights", weights)):
    validation.check_finite(
        a, f"{origin}: memory bank {name}", "the model is broken"
    )
  n_neg = int(np.sum(np.asarray(weights) < 0))
  if n_neg:
    raise ValueError(
        f"{origin}: memory bank weights must be >= 0, {n_neg} are negative; "
        "the model is broken"
    )


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_meta(meta: dict, origin: str) -> None:
  """One clear error for missing, mistyped or out-of-range model metadata."""

  def bad(field, want, value):
    raise ValueError(
        f"{origin}: bad model metadata: {field} must be {want}, got {value!r}"
    )

  for field in (
      "method",
      "soft_weight",
      "grid",
      "image_size",
      "blur_sigma",
      "backbone",
      "preprocess",
      "features",
      "thresholds",
  ):
    if field not in meta:
      raise ValueError(f"{origin}: bad model metadata: {field!r} is missing")
  if meta["method"] not in methods.METHODS:
    bad("method", f"one of {sorted(methods.METHODS)}", meta["method"])
  if not isinstance(meta["soft_weight"], bool):
    bad("soft_weight", "true or false", meta["soft_weight"])
  for field in ("grid", "image_size"):
    v = meta[field]
    if not (
        isinstance(v, list)
        and len(v) == 2
        and all(type(g) is int and 0 < g <= 1 << 16 for g in v)
    ):  # pylint: disable=unidiomatic-typecheck
      bad(field, "two positive integers", v)
  sigma = meta["blur_sigma"]
  if not (_number(sigma) and math.isfinite(sigma) and sigma >= 0):
    bad("blur_sigma", "a finite number >= 0", sigma)
  for field in ("backbone", "preprocess", "features", "thresholds"):
    if not isinstance(meta[field], dict):
      bad(field, "a mapping", meta[field])
  required = {
      "backbone": ("name", "layers", "weights", "weights_id"),
      "preprocess": ("resize", "crop", "mean", "std"),
      "features": ("patchsize", "pretrain_embed_dim", "target_embed_dim"),
  }
  for field, keys in required.items():
    missing = [k for k in keys if k not in meta[field]]
    if missing:
      raise ValueError(
          f"{origin}: bad model metadata: {field} lacks {', '.join(missing)}"
      )
  for key in ("image", "pixel"):
    t = meta["thresholds"].get(key)
    if t is not None and not (_number(t) and math.isfinite(t)):
      bad(f"thresholds.{key}", "a finite number or null", t)
  pre = meta["preprocess"]
  size = pre.get("input_size")
  if size is not None and not (
      isinstance(size, list)
      and len(size) == 2
      and all(type(g) is int and 0 < g <= 1 << 16 for g in size)
  ):  # pylint: disable=unidiomatic-typecheck
    bad("preprocess.input_size", "two positive integers or null", size)
  for key in ("resize", "crop"):
    v = pre[key]
    if v is not None and not (type(v) is int and 0 < v <= 1 << 16):
      bad(f"preprocess.{key}", "a positive integer or null", v)
  if pre["crop"] is None and size is None:
    bad("preprocess.input_size", "set when crop is null (whole image)", size)
