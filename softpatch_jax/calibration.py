"""Calibrated scores: raw anomaly scores mapped to [0, 1], the threshold at 0.5.

Raw scores are (weighted) squared feature distances: their scale depends on
the backbone, the category and the bank (5,000 to 60,000 on the default
job), so a raw score says little without its model. A `ScoreMap` turns it
into a number in [0, 1] that reads the same for every model:

  * 0.5 is the decision threshold: normalised >= 0.5 is 'anomalous' (up to
    float32 rounding right at the threshold; the decision itself is always
    taken on the raw score, `raw >= threshold`).
  * 0 is what normal training images score: the low anchor is the
    `LOW_QUANTILE` (5 %) quantile of the held-out normal scores, and
    scores at or below it map to 0. Normal images mostly land in [0, 0.5).
  * 1 means "as far above the threshold as the threshold is above the median
    normal image": the high anchor is threshold + (threshold - median of the
    held-out scores); scores beyond it map to 1.

Between the anchors the map is linear (two pieces: below and above the
threshold), so it is strictly increasing between 0 and 1, and clipped
outside. It is robust: it rests on two quantiles of the held-out scores
(5 % and the median), not on their extremes, so a few defective training
images do not move it much.

Degenerate held-out scores (all equal, or a threshold at or below the low
quantile, e.g. a manual threshold under every normal score) fall back per
side to a span of |threshold| (1.0 for a zero threshold): with positive
scores, 0 -> 0, threshold -> 0.5, 2 x threshold -> 1. The same fallback is
the whole map when there are no held-out scores at all (a 'manual' threshold
and an old model file without them).

The image score and the pixel maps each have their own map: the pixel map's
anchors come from the held-out per-image map maxima and the pixel
threshold (`Calibration.pixel`, None without a pixel threshold).

Pure numpy / jnp: `normalise` is jittable (the anchors are constants).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

# The held-out quantile that maps to 0.
LOW_QUANTILE = 0.05
# Anchor values: low quantile -> 0, threshold -> 0.5, high anchor -> 1.
LEVELS = (0.0, 0.5, 1.0)


def _finite(v, what: str) -> float:
  try:
    f = float(v)
  except (TypeError, ValueError):
    f = math.nan
  if isinstance(v, bool) or not math.isfinite(f):
    raise ValueError(f"calibration: {what} must be a finite number, got {v!r}")
  return f


@dataclasses.dataclass(frozen=True)
class ScoreMap:
  """A monotone piecewise-linear map raw score -> [0, 1].

  xs: the anchors (low, threshold, high), strictly increasing, also in
  float32; ys: their values `LEVELS`; threshold: the decision threshold
  (= xs[1], mapped to exactly 0.5); source: 'heldout' (anchored on held-out
  normal scores) or 'threshold' (the threshold alone, module docstring).
  """

  xs: Tuple[float, ...]
  ys: Tuple[float, ...] = LEVELS
  threshold: float = 0.0
  source: str = "heldout"

  def __post_init__(self):
    xs = tuple(_finite(x, "anchor") for x in self.xs)
    ys = tuple(_finite(y, "anchor value") for y in self.ys)
    object.__setattr__(self, "xs", xs)
    object.__setattr__(self, "ys", ys)
    t = _finite(self.threshold, "threshold")
    object.__setattr__(self, "threshold", t)
    if len(xs) != len(ys) or len(xs) < 2:
      raise ValueError(
          f"calibration: needs >= 2 anchors and one value each, got {xs} "
          f"and {ys}"
      )
    x32 = np.asarray(xs, np.float32)
    if not (np.all(np.diff(xs) > 0) and np.all(np.diff(x32) > 0)):
      raise ValueError(
          f"calibration: anchors must be strictly increasing, got {xs}"
      )
    if not (np.all(np.diff(ys) >= 0) and ys[0] >= 0 and ys[-1] <= 1):
      raise ValueError(
          f"calibration: anchor values must rise within [0, 1], got {ys}"
      )
    if 0.5 not in ys or xs[ys.index(0.5)] != t:
      raise ValueError(
          f"calibration: the threshold {t!r} must be the anchor of 0.5; "
          f"anchors {xs}, values {ys}"
      )
    if self.source not in ("heldout", "threshold"):
      raise ValueError(
          "calibration: source must be 'heldout' or 'threshold', got "
          f"{self.source!r}"
      )

  def to_record(self) -> dict:
    """JSON types, as stored in a model file."""
    return {
        "xs": list(self.xs),
        "ys": list(self.ys),
        "threshold": self.threshold,
        "source": self.source,
    }

  @classmethod
  def from_record(cls, record: dict) -> "ScoreMap":
    if not isinstance(record, dict):
      raise ValueError(f"calibration: a score map is a mapping, got {record!r}")
    return cls(
        xs=tuple(record["xs"]),
        ys=tuple(record["ys"]),
        threshold=record["threshold"],
        source=record["source"],
    )


def normalise(score_map: ScoreMap, x):
  """Raw scores (any shape) -> normalised scores in [0, 1], float32.

  Pure and jittable: the anchors are constants. At the threshold (as a
  float32) the result is exactly 0.5. NaN stays NaN.
  """
  x = jnp.asarray(x, jnp.float32)
  xs = jnp.asarray(score_map.xs, jnp.float32)
  ys = jnp.asarray(score_map.ys, jnp.float32)
  i = jnp.clip(jnp.searchsorted(xs, x, side="right"), 1, xs.shape[0] - 1)
  x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
  y = y0 + (y1 - y0) * ((x - x0) / (x1 - x0))
  return jnp.clip(y, 0.0, 1.0)


def _fallback_span(t: float) -> float:
  return abs(t) if t != 0 else 1.0


def _widen(lo: float, t: float, hi: float) -> Tuple[float, float]:
  """(lo, hi) strictly around t in float32 too (huge / tiny spans)."""
  t32 = np.float32(t)
  while not np.float32(lo) < t32 or not lo < t:
    lo = t - 2.0 * max(t - lo, _fallback_span(t))
  while not np.float32(hi) > t32 or not hi > t:
    hi = t + 2.0 * max(hi - t, _fallback_span(t))
  return lo, hi


def fit(threshold, heldout: Optional[Sequence[float]] = None) -> ScoreMap:
  """The ScoreMap of a threshold, anchored on held-out normal scores.

  Args:
    threshold: the decision threshold (a finite number) -> 0.5.
    heldout: held-out normal scores (non-empty, finite), or None / empty:
      the threshold alone (module docstring).

  Raises:
    ValueError: a non-finite threshold or held-out score.
  """
  t = _finite(threshold, "threshold")
  h = None if heldout is None else np.asarray(heldout, np.float64).ravel()
  span = _fallback_span(t)
  if h is None or h.size == 0:
    lo, hi = _widen(t - span, t, t + span)
    return ScoreMap((lo, t, hi), LEVELS, t, "threshold")
  if not np.all(np.isfinite(h)):
    bad = int(h.size - np.count_nonzero(np.isfinite(h)))
    raise ValueError(
        f"calibration: {bad} of {h.size} held-out scores are NaN/inf"
    )
  lo = float(np.quantile(h, LOW_QUANTILE))
  mid = float(np.median(h))
  lo = lo if lo < t else t - span
  hi = t + (t - mid) if mid < t else t + (t - lo)
  lo, hi = _widen(lo, t, hi)
  return ScoreMap((lo, t, hi), LEVELS, t, "heldout")


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The image score's map and the pixel map's (None: no pixel threshold)."""

  image: ScoreMap
  pixel: Optional[ScoreMap] = None

  def __post_init__(self):
    for name in ("image", "pixel"):
      v = getattr(self, name)
      if not (isinstance(v, ScoreMap) or (v is None and name == "pixel")):
        raise ValueError(
            f"calibration.{name} must be a ScoreMap, got {type(v).__name__}"
        )

  def matches(self, image_threshold, pixel_threshold) -> bool:
    """Whether these maps put 0.5 at these thresholds."""
    pix = None if self.pixel is None else self.pixel.threshold
    return self.image.threshold == image_threshold and pix == pixel_threshold

  def to_record(self) -> dict:
    return {
        "image": self.image.to_record(),
        "pixel": None if self.pixel is None else self.pixel.to_record(),
    }

  @classmethod
  def from_record(cls, record: dict) -> "Calibration":
    if not isinstance(record, dict) or "image" not in record:
      raise ValueError(
          f"calibration: a mapping with 'image' and 'pixel', got {record!r}"
      )
    pix = record.get("pixel")
    return cls(
        ScoreMap.from_record(record["image"]),
        None if pix is None else ScoreMap.from_record(pix),
    )


def for_thresholds(
    image_threshold,
    pixel_threshold=None,
    heldout_image=None,
    heldout_pixel_max=None,
) -> Optional[Calibration]:
  """The Calibration of a model's thresholds and held-out normal scores
  (image scores, per-image map maxima; None: the thresholds alone).
  None when there is no image threshold."""
  if image_threshold is None:
    return None
  pixel = None
  if pixel_threshold is not None:
    pixel = fit(pixel_threshold, heldout_pixel_max)
  return Calibration(fit(image_threshold, heldout_image), pixel)
