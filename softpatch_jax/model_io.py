"""A fitted model as one versioned file: serialisation only (save and load).

File format (``model.softpatch``, format 4): a 64-byte header (magic bytes,
the body's length, the SHA-256 of the body: `model_meta.frame`), checked
before the body is parsed, then the body: one msgpack document written with
``flax.serialization.msgpack_serialize`` (no pickle, so loading a file never
runs code)::

    {"magic": "softpatch-jax model",
     "format_version": 4,
     "meta": "<JSON string>",           # everything that is not an array
     "arrays": {"bank_features": float32 (M, D),
                "bank_weights": float32 (M,),
                "heldout_image_scores": float32 (N,)   # optional
                "heldout_pixel_max": float32 (N,)}}    # optional

``meta`` (format 3 and 4) holds typed records, each stored as a JSON object:

    method       the method name ('softpatch_lof', 'patchcore', ...)
    grid         [h, w] patch grid; image_size [H, W] network input size
    batch_size   the fitting batch size (predict's default)
    backbone     `model_meta.BackboneRecord`: name, layers, weights, seed, weights_id
                 (the sha256 of the weights file or 'random:<seed>')
    preprocess   `data.Preprocess.to_record()`: resize, crop, mean, std, ...
    embed        `features.EmbedOptions`
    scoring      `scoring.ScoringOptions`, soft_weight resolved to true/false
    thresholds   `thresholds.ChosenThresholds`: image, pixel, method, details
    calibration  `calibration.Calibration`: the image and pixel score maps
                 raw -> [0, 1] (threshold -> 0.5), or null without an image
                 threshold (format 3)
    fit_info     what fitting did (informational)
    config       the fitting settings (informational: nothing reads it)

Format 1 files (a flat soft_weight / blur_sigma / features layout, the
memory budget, search and batch size inside the saved config) are still
read: `model_meta.upgrade_v1` maps them onto the format 2 records. Format 1
and 2 files have no calibration: it is rebuilt on load from their stored
held-out scores and thresholds (`calibration.for_thresholds`; the
thresholds alone when there are no held-out scores). Files of formats 1-3
have no header: they load with a warning that nothing verified them. A
format 4 file whose body does not match its checksum is refused ("model
file X is corrupted (checksum mismatch)"). Arrays are stored as
float32 exactly as fitted, so a loaded model scores bit for bit like the one
that was saved.

The file is written to a temporary name and renamed into place, so an
interrupted save leaves the previous model (or none), never a truncated one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

from flax import serialization
import numpy as np

from softpatch_jax import calibration as calibration_lib
from softpatch_jax import features
from softpatch_jax import io_utils
from softpatch_jax import model_meta
from softpatch_jax import scoring
from softpatch_jax import thresholds as thresholds_lib
from softpatch_jax import validation

MAGIC = model_meta.MAGIC
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MODEL_FILENAME = "model.softpatch"


@dataclasses.dataclass
class FittedModel:
  """A memory bank plus everything needed to score new images with it.

  Attributes:
    bank_features: (M, D) float32 memory-bank patch features.
    bank_weights: (M,) float32 outlier weights of the bank patches.
    method: method name ('softpatch_lof', 'patchcore', ...).
    grid: (h, w) patch grid of one image.
    image_size: (H, W) network input size = pixel-map size.
    backbone: the `model_meta.BackboneRecord`.
    preprocess: the preprocessing record (`data.Preprocess.to_record()`).
    embed: the `features.EmbedOptions` of the bank's features.
    scoring: the `scoring.ScoringOptions` of the bank; soft_weight is the
      resolved true / false, memory_budget_mb predict's default budget.
    thresholds: the `thresholds.ChosenThresholds`.
    batch_size: the fitting batch size; predict's default, so that the
      backbone runs the program it ran at fit time.
    fit_info: bank size, outlier patches, timings, ... (informational).
    config: the fitting settings as a plain dict (informational only).
    heldout_image_scores: (N,) held-out training image scores, or None.
    heldout_pixel_max: (N,) max of each held-out pixel map, or None.
    calibration: the `calibration.Calibration` of the thresholds (raw ->
      [0, 1], threshold -> 0.5); None: built from the held-out scores and
      thresholds (`calibration.for_thresholds`), and stays None without an
      image threshold. One given must match the thresholds.
    format_version: file format version this model was read from / for.
  """

  bank_features: np.ndarray
  bank_weights: np.ndarray
  method: str
  grid: tuple
  image_size: tuple
  backbone: model_meta.BackboneRecord
  preprocess: Dict[str, Any]
  embed: features.EmbedOptions
  scoring: scoring.ScoringOptions
  thresholds: thresholds_lib.ChosenThresholds
  batch_size: int
  fit_info: Dict[str, Any] = dataclasses.field(default_factory=dict)
  config: Dict[str, Any] = dataclasses.field(default_factory=dict)
  heldout_image_scores: Optional[np.ndarray] = None
  heldout_pixel_max: Optional[np.ndarray] = None
  calibration: Optional[calibration_lib.Calibration] = None
  format_version: int = FORMAT_VERSION

  def __post_init__(self):
    self.bank_features = np.asarray(self.bank_features, np.float32)
    self.bank_weights = np.asarray(self.bank_weights, np.float32)
    self.grid = tuple(int(g) for g in self.grid)
    self.image_size = tuple(int(s) for s in self.image_size)
    self.batch_size = int(self.batch_size)
    if self.scoring.soft_weight is None:
      raise ValueError(
          "a model's scoring.soft_weight must be true or false (the method's "
          "choice, resolved when the bank was fitted), got None"
      )
    self._bank = None
    t_img, t_pix = self.thresholds.image, self.thresholds.pixel
    if self.calibration is None:
      self.calibration = calibration_lib.for_thresholds(
          t_img, t_pix, self.heldout_image_scores, self.heldout_pixel_max
      )
    elif t_img is None or not self.calibration.matches(t_img, t_pix):
      raise ValueError(
          "the model's calibration maps thresholds "
          f"({self.calibration.image.threshold}, "
          f"{getattr(self.calibration.pixel, 'threshold', None)}) to 0.5, "
          f"but its thresholds are ({t_img}, {t_pix}); pass calibration=None "
          "to rebuild it"
      )

  def _make_bank(self, features_on_host):
    return scoring.make_bank(
        self.bank_features,
        self.bank_weights,
        soft_weight=self.scoring.soft_weight,
        grid=self.grid,
        image_size=self.image_size,
        blur_sigma=self.scoring.blur_sigma,
        features_on_host=features_on_host,
        search=self.scoring.search,
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
    return self.thresholds.image

  @property
  def pixel_threshold(self) -> Optional[float]:
    return self.thresholds.pixel


# --------------------------------------------------------------------------
# Save.


def meta_of(model: FittedModel) -> dict:
  """The model's format 3 metadata, as plain JSON types."""
  return io_utils.jsonable({
      "method": model.method,
      "grid": list(model.grid),
      "image_size": list(model.image_size),
      "batch_size": model.batch_size,
      "backbone": dataclasses.asdict(model.backbone),
      "preprocess": model.preprocess,
      "embed": dataclasses.asdict(model.embed),
      "scoring": dataclasses.asdict(model.scoring),
      "thresholds": model.thresholds.to_record(),
      "calibration": (
          None if model.calibration is None else model.calibration.to_record()
      ),
      "fit_info": model.fit_info,
      "config": model.config,
  })


def to_bytes(model: FittedModel) -> bytes:
  """The body document of the model's file (`file_bytes` adds the header)."""
  arrays = {
      "bank_features": np.ascontiguousarray(model.bank_features, np.float32),
      "bank_weights": np.ascontiguousarray(model.bank_weights, np.float32),
  }
  for name in ("heldout_image_scores", "heldout_pixel_max"):
    value = getattr(model, name)
    if value is not None:
      arrays[name] = np.asarray(value, np.float32)
  payload = {
      "magic": MAGIC,
      "format_version": FORMAT_VERSION,
      "meta": json.dumps(meta_of(model), sort_keys=True),
      "arrays": arrays,
  }
  return serialization.msgpack_serialize(payload)


def file_bytes(model: FittedModel) -> bytes:
  """The model's file: the checksummed header, then `to_bytes`."""
  return model_meta.frame(to_bytes(model))


def save_model(path: str, model: FittedModel) -> str:
  """Writes `model` to `path` atomically; returns the absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  check_finite_bank(model.bank_features, model.bank_weights, path)
  meta = meta_of(model)
  model_meta.check_meta(meta, path)
  model_meta.calibration_of(meta, path)
  io_utils.write_bytes(path, file_bytes(model))
  return path


# --------------------------------------------------------------------------
# Load.


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


def read_payload(
    data: bytes, origin: str, verified: bool = False
) -> Tuple[dict, int]:
  """The msgpack document of a model file and its format version
  (`verified`: its checksum already checked, `model_meta.unframe`)."""
  body = model_meta.unframe(data, origin, verified)
  try:
    payload = serialization.msgpack_restore(body)
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
  if version not in READABLE_VERSIONS:
    raise ValueError(
        f"{origin} has model format version {version!r}, but this version of "
        f"softpatch_jax reads versions {READABLE_VERSIONS}; refit the model "
        "or use the matching softpatch_jax release"
    )
  return payload, version


def read_bank(payload: dict, origin: str) -> Tuple[dict, dict]:
  """(meta, arrays) of a payload, the bank arrays checked."""
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
  return meta, arrays


def from_bytes(
    data: bytes, origin: str = "<bytes>", verified: bool = False
) -> FittedModel:
  """Reads a model file's bytes; `origin` names it in error messages;
  `verified`: their checksum was already checked (`load_model`)."""
  payload, version = read_payload(data, origin, verified)
  meta, arrays = read_bank(payload, origin)
  if version == 1:
    meta = model_meta.upgrade_v1(meta, origin)
  model_meta.check_meta(meta, origin)
  calib = None
  if version >= 3:
    calib = model_meta.calibration_of(meta, origin)
  opt = lambda k: (np.asarray(arrays[k], np.float32) if k in arrays else None)
  try:
    return model_of(meta, arrays, opt, calib, version)
  except ValueError as e:
    raise ValueError(f"{origin}: bad model metadata: {e}") from None


def model_of(meta, arrays, opt, calib, version) -> FittedModel:
  """The FittedModel of checked metadata and arrays."""
  return FittedModel(
      bank_features=np.asarray(arrays["bank_features"]),
      bank_weights=np.asarray(arrays["bank_weights"]),
      method=meta["method"],
      grid=tuple(meta["grid"]),
      image_size=tuple(meta["image_size"]),
      backbone=model_meta.BackboneRecord(**meta["backbone"]),
      preprocess=meta["preprocess"],
      embed=features.EmbedOptions(**meta["embed"]),
      scoring=scoring.ScoringOptions(**meta["scoring"]),
      thresholds=thresholds_lib.ChosenThresholds(**meta["thresholds"]),
      batch_size=meta["batch_size"],
      fit_info=meta.get("fit_info", {}),
      config=meta.get("config", {}),
      heldout_image_scores=opt("heldout_image_scores"),
      heldout_pixel_max=opt("heldout_pixel_max"),
      calibration=calib,
      format_version=version,
  )


def load_model(path: str, backbone=None) -> FittedModel:
  """Reads a model file (or a fit workdir).

  Args:
    path: the model file, or the directory that holds model.softpatch.
    backbone: optionally a backbones.Backbone to be used with the model; it
      must be the one the model was fitted with (name, taps, weights id).

  Raises:
    ValueError: not a model file (refused from its first bytes), a checksum
      mismatch, unreadable file, unknown format version, non-finite bank,
      bad metadata (or beyond a ceiling), or a mismatched backbone.
  """
  path = resolve_model_path(path)
  with open(path, "rb") as f:
    model_meta.check_file(f, path)  # streamed: the checksum, once
    data = f.read()
  model = from_bytes(data, origin=path, verified=True)
  if backbone is not None:
    check_backbone(model, backbone)
  return model


# --------------------------------------------------------------------------
# Checks.


def check_backbone(model: FittedModel, bb) -> None:
  """Refuses a backbone other than the one the model was fitted with."""
  rec = model.backbone
  if bb.name != rec.name:
    raise ValueError(
        "backbone mismatch: the model was fitted with "
        f"{rec.name!r}, got {bb.name!r}"
    )
  if tuple(bb.layers) != rec.layers:
    raise ValueError(
        "backbone mismatch: the model was fitted with taps "
        f"{rec.layers}, got {tuple(bb.layers)}"
    )
  if bb.weights_id != rec.weights_id:
    raise ValueError(
        f"backbone weights mismatch for {rec.name!r}: the model was fitted "
        f"with weights {rec.weights_id!r}, got {bb.weights_id!r}; scores "
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
