"""The metadata of a model file: its header, records, checks, format 1.

`model_io` writes and reads the file; this module frames its body with the
format 4 header (`frame`, `unframe`: magic bytes, body length and the
SHA-256 of the body, checked before the body is parsed), says what its
"meta" document must hold (format 2 to 4, see model_io), refuses anything
else with one clear error (`check_meta`, `calibration_of` for the
calibration record), and maps format 1 metadata onto format 2
(`upgrade_v1`).

Every stored size and numeric bound has a hard ceiling, checked on load, so
that a hand-edited file cannot make predict hang or allocate without bound:
sides <= 65536, image_size and preprocess.max_pixels <= `MAX_MODEL_PIXELS`,
resize / crop <= `MAX_RESIZE`, batch_size <= `MAX_BATCH` (and times the
image pixels <= `MAX_BATCH_PIXELS`), blur_sigma below
`scoring.MAX_BLUR_SIGMA` (fit's own limit), memory_budget_mb <=
`MAX_BUDGET_MB`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Tuple

from absl import logging

from softpatch_jax import calibration as calibration_lib
from softpatch_jax import data
from softpatch_jax import features
from softpatch_jax import scoring
from softpatch_jax import thresholds as thresholds_lib

MAGIC = "softpatch-jax model"
# Format 4 files start with these bytes, then the body length and the
# SHA-256 of the body (`frame`); the body is the msgpack document.
HEADER_MAGIC = b"\x89softpatch-jax model\r\n\x1a\n"
HEADER_SIZE = len(HEADER_MAGIC) + 8 + 32
# Files of formats 1-3 (and a bare body) are one msgpack map: fixmap, map16
# or map32.
MAP_MARKERS = (*range(0x80, 0x90), 0xDE, 0xDF)
# The data settings' own ceilings (data/geometry.py): a config that passes
# them saves a model that loads.
MAX_MODEL_PIXELS = data.geometry.MAX_SOURCE_PIXELS  # 256 MiB per float32 map
MAX_RESIZE = data.geometry.MAX_SIDE
MAX_BATCH = data.geometry.MAX_BATCH
MAX_BATCH_PIXELS = 1 << 28  # one batch of maps: 1 GiB as float32
MAX_BUDGET_MB = 1e9
_MAX_SIDE = 1 << 16
_LEN = struct.Struct("<Q")


def frame(body: bytes) -> bytes:
  """The format 4 file of a body document: header (magic, length, SHA-256)
  then the body."""
  digest = hashlib.sha256(body).digest()
  return HEADER_MAGIC + _LEN.pack(len(body)) + digest + body


def check_head(head: bytes, origin: str) -> bool:
  """Whether a file's first `HEADER_SIZE` bytes open a format 4 file (True)
  or a bare msgpack model document (False, formats 1-3).

  Raises:
    ValueError: neither, before any more of the file is read.
  """
  if head.startswith(HEADER_MAGIC):
    return True
  if head[:1] and head[0] in MAP_MARKERS:
    return False
  raise ValueError(
      f"{origin} is not a SoftPatch model file (no {MAGIC!r} header)"
  )


def check_file(f, origin: str) -> None:
  """Refuses an open model file that is not one, or a format 4 file whose
  body does not match its header, reading 1 MiB at a time; leaves `f` at
  its start."""
  head = f.read(HEADER_SIZE)
  if check_head(head, origin):
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
      size += len(chunk)
    start = len(HEADER_MAGIC)
    check_body(origin, head[start:], size, digest.digest())
  f.seek(0)


def check_body(origin: str, stored: bytes, size: int, digest: bytes) -> None:
  """Refuses a body of `size` bytes and SHA-256 `digest` that does not
  match the header's `stored` length and checksum."""
  if len(stored) < HEADER_SIZE - len(HEADER_MAGIC):
    raise ValueError(f"model file {origin} is truncated (in its header)")
  (want,) = _LEN.unpack_from(stored)
  if size != want:
    raise ValueError(
        f"model file {origin} is truncated or corrupted: its header "
        f"announces {want} body bytes, it holds {size}"
    )
  if digest != stored[8:40]:
    raise ValueError(f"model file {origin} is corrupted (checksum mismatch)")


def unframe(raw: bytes, origin: str, verified: bool = False):
  """The body document of a model file's bytes, its checksum verified (a
  file without one, format 1-3, loads with a warning). `verified`: the
  caller already checked length and checksum (`check_file`, streamed).

  Raises:
    ValueError: not a model file, truncated, or a checksum mismatch.
  """
  if not check_head(raw[:HEADER_SIZE], origin):
    logging.warning(
        "model file %s has no checksum (written before format 4): it loads "
        "unverified; save it again to add one",
        origin,
    )
    return raw
  body = memoryview(raw)[HEADER_SIZE:]
  if not verified:
    stored = raw[len(HEADER_MAGIC) : HEADER_SIZE]
    check_body(origin, stored, len(body), hashlib.sha256(body).digest())
  return body


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
  if not (_is_int(meta["batch_size"]) and 1 <= meta["batch_size"] <= MAX_BATCH):
    _bad(
        origin,
        "batch_size",
        f"a positive integer <= {MAX_BATCH}",
        meta["batch_size"],
    )
  _check_sizes(meta, origin)
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
  sigma = rec["blur_sigma"]
  if not (_number(sigma) and 0 <= sigma < scoring.MAX_BLUR_SIGMA):
    want = f"a finite number >= 0 and < {scoring.MAX_BLUR_SIGMA:g}"
    _bad(origin, "scoring.blur_sigma", want, sigma)
  budget = rec["memory_budget_mb"]
  if not (_number(budget) and 0 <= budget <= MAX_BUDGET_MB):
    want = f"a finite number >= 0 and <= {MAX_BUDGET_MB:g} (MiB)"
    _bad(origin, "scoring.memory_budget_mb", want, budget)
  _record(scoring.ScoringOptions, rec, "scoring", origin)


def _check_sizes(meta: dict, origin: str) -> None:
  """grid and image_size: pairs within the ceilings, the grid no finer
  than the image, a batch of maps within `MAX_BATCH_PIXELS`."""
  for field in ("grid", "image_size"):
    if not _size_pair(meta[field]):
      _bad(origin, field, "two positive integers <= 65536", meta[field])
  h, w = meta["image_size"]
  if h * w > MAX_MODEL_PIXELS:
    want = f"at most {MAX_MODEL_PIXELS} pixels"
    _bad(origin, "image_size", want, meta["image_size"])
  if any(g > s for g, s in zip(meta["grid"], meta["image_size"])):
    _bad(origin, "grid", "no larger than image_size", meta["grid"])
  if h * w * meta["batch_size"] > MAX_BATCH_PIXELS:
    raise ValueError(
        f"{origin}: bad model metadata: batch_size x image_size must be at "
        f"most {MAX_BATCH_PIXELS} pixels, got {meta['batch_size']} x "
        f"{meta['image_size']}"
    )


def _check_preprocess(pre: dict, origin: str) -> None:
  size = pre.get("input_size")
  if size is not None and not _size_pair(size):
    _bad(origin, "preprocess.input_size", "two positive integers or null", size)
  for key in ("resize", "crop"):
    v = pre[key]
    if v is not None and not (_is_int(v) and 0 < v <= MAX_RESIZE):
      _bad(
          origin,
          f"preprocess.{key}",
          f"a positive integer <= {MAX_RESIZE} or null",
          v,
      )
  pixels = pre.get("max_pixels", 1)
  if not (_is_int(pixels) and 1 <= pixels <= MAX_MODEL_PIXELS):
    want = f"a positive integer <= {MAX_MODEL_PIXELS}"
    _bad(origin, "preprocess.max_pixels", want, pixels)
  for key in ("mean", "std"):
    v = pre[key]
    if not (
        isinstance(v, list)
        and len(v) in (1, 3)
        and all(_number(x) and math.isfinite(x) for x in v)
    ):
      _bad(origin, f"preprocess.{key}", "1 or 3 finite numbers", v)
  if pre["crop"] is None and size is None:
    _bad(
        origin,
        "preprocess.input_size",
        "set when crop is null (whole image)",
        size,
    )
  try:
    data.Preprocess.from_record(pre)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{origin}: bad model metadata: preprocess: {e}") from None


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
