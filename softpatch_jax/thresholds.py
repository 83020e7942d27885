"""Decision thresholds for image scores and pixel maps, with or without labels.

A SoftPatch user usually has no clean, labelled validation set: the training
folder itself is "mostly normal" with some defective images mixed in. Three
ways to choose a threshold are offered (config.threshold.method):

  'quantile' (default): held-out training scores. The training images are
      split into K folds (config.threshold.folds, default 5; fewer when there
      are fewer images). For each fold a memory bank is fitted on the other
      K-1 folds with the same method and settings, and the held-out fold is
      scored against it, so every training image gets the score it would get
      as a new image. The image threshold is the q-quantile of these N
      held-out image scores (config.threshold.quantile, default 0.95); the
      pixel threshold is the q-quantile of the N held-out per-image maxima of
      the pixel maps (config.threshold.pixel_quantile, default: the same q),
      so that a fraction q of held-out training images gets an empty mask.
      Why the default: it needs no labels, and scores of an image that is in
      the bank are ~0 (it matches itself), so only held-out scores show what
      a normal new image scores. Why q=0.95 and not 0.99: the training set
      may hold a few percent of defective images; their held-out scores are
      high, and a quantile above 1 - contamination would put the threshold
      among them and miss similar defects later. The price is about 5 % false
      alarms on a clean line; raise q for a clean training set. The held-out
      scores are stored in the model, so the threshold can be re-derived
      later without refitting (predict --quantile).
  'manual': config.threshold.value (image) and, optionally,
      config.threshold.pixel_value (pixel; without it no binary masks).
  'f1': config.threshold.val_dir, a labelled folder with good/ (normal) and
      one sub-folder per defect type (anomalous), optionally MVTec-style
      ground_truth/<defect>/<name>_mask.png masks. The image threshold
      maximises F1 over the folder's images; the pixel threshold maximises F1
      over its mask pixels (None when there are no masks).

Decisions everywhere are `score >= threshold` -> anomalous.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from softpatch_jax import metrics
from softpatch_jax import settings

METHODS = ("quantile", "manual", "f1")
# Pixel-level F1 sorts every pixel; beyond this many, a regular subsample.
MAX_F1_PIXELS = 20_000_000
# A training set whose images differ from each other by less than this
# fraction of the spread of patch features within an image is degenerate
# (copies of one image, or of a constant one): see `image_spread`.
MIN_IMAGE_SPREAD = 1e-2


@dataclasses.dataclass(frozen=True)
class ThresholdOptions:
  """config.threshold: how a saved model's decision thresholds are chosen
  (the module docstring explains each method and why 'quantile').

  Every field is checked when the record is built, before any expensive work.
  """

  method: str = "quantile"
  quantile: float = 0.95
  pixel_quantile: Optional[float] = None
  folds: int = 5
  value: Optional[float] = None
  pixel_value: Optional[float] = None
  val_dir: str = ""

  def __post_init__(self):
    settings.check_choice(self.method, "threshold.method", METHODS)
    for name in ("quantile", "pixel_quantile"):
      q = getattr(self, name)
      ok = (q is None and name == "pixel_quantile") or (
          settings.is_number(q) and 0.0 < float(q) <= 1.0
      )
      settings.require(ok, f"threshold.{name}", "in (0, 1]", q)
      if q is not None:
        settings.set_field(self, name, float(q))
    folds = settings.check_int(self.folds, "threshold.folds")
    settings.set_field(self, "folds", folds)
    if self.method == "quantile":
      settings.require(folds >= 2, "threshold.folds", ">= 2", folds)
    for name in ("value", "pixel_value"):
      v = getattr(self, name)
      if v is not None:
        settings.set_field(self, name, _finite(v, f"threshold.{name}"))
    if self.method == "manual" and self.value is None:
      raise ValueError(
          "config.threshold.method='manual' needs config.threshold.value"
      )
    if self.method == "f1" and not self.val_dir:
      raise ValueError(
          "config.threshold.method='f1' needs "
          "config.threshold.val_dir (a labelled folder)"
      )

  @property
  def resolved_pixel_quantile(self) -> float:
    """pixel_quantile, or else the image quantile."""
    return self.quantile if self.pixel_quantile is None else self.pixel_quantile


@dataclasses.dataclass(frozen=True)
class ChosenThresholds:
  """The decision thresholds a model was saved with.

  image / pixel: the thresholds (None: none chosen; decisions 'n/a', no
  masks); method: how they were chosen (`METHODS`); details: what they were
  chosen from (folds, validation F1, ...), informational.
  """

  image: Optional[float] = None
  pixel: Optional[float] = None
  method: str = "manual"
  details: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("image", "pixel"):
      v = getattr(self, name)
      if v is not None:
        settings.set_field(self, name, _finite(v, f"thresholds.{name}"))
    settings.check_choice(self.method, "thresholds.method", METHODS)
    settings.require(
        isinstance(self.details, dict),
        "thresholds.details",
        "a mapping",
        self.details,
    )

  def to_record(self) -> dict:
    """JSON types, as stored in a model file."""
    return dataclasses.asdict(self)


def _finite(v, field: str) -> float:
  ok = settings.is_number(v) and np.isfinite(float(v))
  settings.require(ok, field, "finite", v)
  return float(v)


def fold_split(n: int, n_folds: int, seed: int) -> List[np.ndarray]:
  """Splits range(n) into min(n_folds, n) seeded, near-equal folds."""
  if n < 2:
    raise ValueError(f"held-out scoring needs at least 2 images, got {n}")
  k = max(2, min(int(n_folds), n))
  perm = np.random.default_rng(seed).permutation(n)
  return [np.sort(f) for f in np.array_split(perm, k)]


def image_spread(train_feats) -> float:
  """How much the training images differ from each other, relative to how
  much patches differ within an image: 0 for copies of one image.

  train_feats: (N, P, D) patch features, read one image at a time. The
  between-image spread is the mean squared distance of each image's patch p
  from the mean image's patch p; the within-image spread is the mean
  squared distance of the mean image's patches from their own mean. Returns
  between / within (0 when both are 0: a constant image).
  """
  n = int(np.shape(train_feats)[0])
  mean = np.zeros(np.shape(train_feats)[1:], np.float64)
  for i in range(n):
    mean += np.asarray(train_feats[i], np.float64)
  mean /= max(n, 1)
  between = 0.0
  for i in range(n):
    d = np.asarray(train_feats[i], np.float64) - mean
    between += float(np.mean(np.sum(d * d, axis=-1))) / n
  within = float(np.mean(np.sum((mean - mean.mean(0)) ** 2, axis=-1)))
  if between <= 0.0:
    return 0.0
  return between / within if within > 0.0 else float("inf")


def degenerate_message(n: int, spread: float) -> Optional[str]:
  """Why n training images with this `image_spread` are degenerate, or None.

  Copies of one image (or near-copies, or constant images) leave the
  held-out folds' coresets short of some of that image's patches, so their
  held-out scores are bimodal and the threshold lands far above what a
  clean image or a real defect scores.
  """
  if spread >= MIN_IMAGE_SPREAD:
    return None
  return (
      f"the {n} training images are (nearly) identical: they differ from "
      f"each other by {spread:.2%} of the patch spread within an image "
      f"(at least {MIN_IMAGE_SPREAD:.0%} is needed)"
  )


def quantile(values, q: float) -> float:
  """The q-quantile (linear interpolation, numpy's default) as a float."""
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError("cannot take a quantile of no scores")
  if not np.all(np.isfinite(v)):
    raise ValueError("scores contain NaN/inf; cannot derive a threshold")
  return float(np.quantile(v, float(q)))


def f1_threshold(labels, scores) -> Tuple[float, float]:
  """The decision threshold t maximising F1 of `score >= t`: (F1, t).

  F1 comes from ``metrics.f1_curve``, the same curve as the F1-max metric.
  t is the midpoint between the lowest score flagged and the next lower
  score, so that the same split of the validation set holds with some margin
  either side. Ties in F1 go to the highest threshold: a deployed threshold
  should raise the fewest alarms. (``metrics.f1_max_threshold`` reports the
  lowest one instead, to follow sklearn; the F1 value is the same.)

  Args:
    labels: (N,) labels, nonzero = anomalous.
    scores: (N,) finite scores, higher = more anomalous.

  Returns:
    (f1, threshold) as floats.
  """
  y = np.asarray(labels).ravel().astype(bool)
  s = np.asarray(scores, np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
  n_pos = int(y.sum())
  if n_pos == 0 or n_pos == y.size:
    raise ValueError(
        "F1-optimal threshold needs both normal and anomalous "
        f"examples, got {n_pos} anomalous of {y.size}"
    )
  if not np.all(np.isfinite(s)):
    raise ValueError("scores contain NaN/inf; cannot derive a threshold")
  thr, f1 = metrics.f1_curve(y, s)
  i = int(np.argmax(f1))  # thresholds descend: first maximum = highest t
  t = thr[i]
  if i + 1 < thr.size:
    mid = 0.5 * (thr[i] + thr[i + 1])
    if mid > thr[i + 1]:  # adjacent floats: keep the exact score
      t = mid
  return float(f1[i]), float(t)


def pixel_f1_threshold(masks, maps) -> Tuple[float, float]:
  """``f1_threshold`` over pixels: (F1, t), masks > 0.5 = defective.

  Beyond MAX_F1_PIXELS pixels, a regular subsample is used.
  """
  m = np.asarray(masks).ravel() > 0.5
  a = np.asarray(maps, np.float32).ravel()
  if m.size != a.size:
    raise ValueError(
        f"masks ({np.shape(masks)}) and maps ({np.shape(maps)}) differ in size"
    )
  if a.size > MAX_F1_PIXELS:
    step = int(np.ceil(a.size / MAX_F1_PIXELS))
    m, a = m[::step], a[::step]
  return f1_threshold(m, a)


def summary(values) -> dict:
  v = np.asarray(values, np.float64)
  return {
      "n": int(v.size),
      "min": float(v.min()),
      "median": float(np.median(v)),
      "max": float(v.max()),
  }
