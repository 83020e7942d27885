"""The metadata of a model file: its records, checks and format 1 reading.

`model_io` writes and reads the file; this module says what its "meta"
document must hold (format 2 and 3, see model_io), refuses anything else
with one clear error (`check_meta`, `calibration_of` for format 3's
calibration record), and maps format 1 metadata onto format 2
(`upgrade_v1`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

from softpatch_jax import calibration as calibration_lib
from softpatch_jax import features
from softpatch_jax import scoring
from softpatch_jax import thresholds as thresholds_lib

_MAX_SIDE = 1 << 16


@dataclasses.dataclass(frozen=True)
class BackboneRecord:
  """The backbone a model was fitted with: how to rebuild it (name, layers,
  weights spec, seed) and its identity (weights_id), which a rebuilt
  backbone must match."""

  name: str
  layers: Tuple[str, ...]
  weights: str
  seed: int
  weights_id: str

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(str(t) for t in self.layers))
    object.__setattr__(self, "seed", int(self.seed))

  @classmethod
  def of(cls, bb, weights: str, seed: int) -> "BackboneRecord":
    """The record of a loaded `backbones.Backbone`."""
    return cls(bb.name, tuple(bb.layers), str(weights), seed, bb.weights_id)


def upgrade_v1(meta: dict, origin: str) -> dict:
  """Format 1 metadata in the format 2 layout.

  Format 1 kept soft_weight and blur_sigma at the top, the feature settings
  as 'features', and predict read the memory budget, the search and the
  batch size from the saved config (a missing budget meant no limit).
  """
  _require(meta, _V1_FIELDS, origin)
  config = _mapping(meta.get("config"))
  scoring_cfg = _mapping(config.get("scoring"))
  budget = scoring_cfg.get("memory_budget_mb")
  backbone = meta["backbone"]
  if isinstance(backbone, dict):
    backbone = {"seed": 0, **backbone}
  thresholds = meta["thresholds"]
  if isinstance(thresholds, dict):
    thresholds = {"image": None, "pixel": None, "details": {}, **thresholds}
  return dict(
      {k: v for k, v in meta.items() if k not in _V1_ONLY},
      batch_size=_mapping(config.get("data")).get("batch_size", 16),
      backbone=backbone,
      thresholds=thresholds,
      embed=meta["features"],
      scoring={
          "soft_weight": meta["soft_weight"],
          "blur_sigma": meta["blur_sigma"],
          "memory_budget_mb": 0.0 if budget is None else budget,
          "search": scoring_cfg.get("search", "auto"),
      },
  )


_V1_FIELDS = (
    "method",
    "soft_weight",
    "grid",
    "image_size",
    "blur_sigma",
    "backbone",
    "preprocess",
    "features",
    "thresholds",
)
_V1_ONLY = ("soft_weight", "blur_sigma", "features")
_RECORDS = {
    "backbone": ("name", "layers", "weights", "seed", "weights_id"),
    "preprocess": ("resize", "crop", "mean", "std"),
    "embed": ("patchsize", "pretrain_embed_dim", "target_embed_dim"),
    "scoring": ("soft_weight", "blur_sigma", "memory_budget_mb", "search"),
    "thresholds": ("image", "pixel", "method"),
}
_FIELDS = ("method", "grid", "image_size", "batch_size", *_RECORDS)


def check_meta(meta: dict, origin: str) -> None:
  """One clear error for missing, mistyped or out-of-range model metadata
  (format 2 layout)."""
  _require(meta, _FIELDS, origin)
  if not (isinstance(meta["method"], str) and meta["method"]):
    _bad(origin, "method", "a method name", meta["method"])
  for field in ("grid", "image_size"):
    if not _size_pair(meta[field]):
      _bad(origin, field, "two positive integers", meta[field])
  if not (_is_int(meta["batch_size"]) and meta["batch_size"] >= 1):
    _bad(origin, "batch_size", "a positive integer", meta["batch_size"])
  for field, keys in _RECORDS.items():
    if not isinstance(meta[field], dict):
      _bad(origin, field, "a mapping", meta[field])
    missing = [k for k in keys if k not in meta[field]]
    if missing:
      raise ValueError(
          f"{origin}: bad model metadata: {field} lacks {', '.join(missing)}"
      )
  _check_scoring(meta["scoring"], origin)
  for key in ("image", "pixel"):
    t = meta["thresholds"][key]
    if t is not None and not (_number(t) and math.isfinite(t)):
      _bad(origin, f"thresholds.{key}", "a finite number or null", t)
  _check_preprocess(meta["preprocess"], origin)
  for field, cls in (
      ("backbone", BackboneRecord),
      ("embed", features.EmbedOptions),
      ("thresholds", thresholds_lib.ChosenThresholds),
  ):
    _record(cls, meta[field], field, origin)


def calibration_of(meta: dict, origin: str):
  """The `calibration.Calibration` of format 3 metadata (None: none stored,
  then rebuilt from the thresholds)."""
  _require(meta, ("calibration",), origin)
  rec = meta["calibration"]
  if rec is None:
    return None
  try:
    return calibration_lib.Calibration.from_record(rec)
  except (KeyError, TypeError, ValueError) as e:
    msg = str(e).removeprefix("calibration: ")
    raise ValueError(
        f"{origin}: bad model metadata: calibration: {msg}"
    ) from None


def _check_scoring(rec: dict, origin: str) -> None:
  if not isinstance(rec["soft_weight"], bool):
    _bad(origin, "scoring.soft_weight", "true or false", rec["soft_weight"])
  for key in ("blur_sigma", "memory_budget_mb"):
    v = rec[key]
    if not (_number(v) and math.isfinite(v) and v >= 0):
      _bad(origin, f"scoring.{key}", "a finite number >= 0", v)
  _record(scoring.ScoringOptions, rec, "scoring", origin)


def _check_preprocess(pre: dict, origin: str) -> None:
  size = pre.get("input_size")
  if size is not None and not _size_pair(size):
    _bad(origin, "preprocess.input_size", "two positive integers or null", size)
  for key in ("resize", "crop"):
    v = pre[key]
    if v is not None and not (_is_int(v) and 0 < v <= _MAX_SIDE):
      _bad(origin, f"preprocess.{key}", "a positive integer or null", v)
  if pre["crop"] is None and size is None:
    _bad(
        origin,
        "preprocess.input_size",
        "set when crop is null (whole image)",
        size,
    )


def _require(meta: dict, fields, origin: str) -> None:
  for field in fields:
    if field not in meta:
      raise ValueError(f"{origin}: bad model metadata: {field!r} is missing")


def _record(cls, values: dict, field: str, origin: str):
  """`cls(**values)`, its refusal as one metadata error."""
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    msg = str(e).removeprefix("config.")
    raise ValueError(f"{origin}: bad model metadata: {field}: {msg}") from None


def _bad(origin: str, field: str, want: str, value) -> None:
  raise ValueError(
      f"{origin}: bad model metadata: {field} must be {want}, got {value!r}"
  )


def _mapping(x) -> dict:
  return x if isinstance(x, dict) else {}


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return type(x) is int  # pylint: disable=unidiomatic-typecheck


def _size_pair(v) -> bool:
  return (
      isinstance(v, list)
      and len(v) == 2
      and all(_is_int(g) and 0 < g <= _MAX_SIDE for g in v)
  )
