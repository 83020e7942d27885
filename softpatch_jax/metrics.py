"""Evaluation metrics in plain numpy: AUROC, F1-max and AUPRO.

All curves are exact: scores are sorted once and every distinct score is a
threshold (a sample is predicted anomalous when score >= threshold), the same
convention as sklearn's ``roc_curve`` / ``precision_recall_curve``.

Degenerate inputs raise ``ValueError`` instead of returning NaN: AUROC and F1
need both classes; AUPRO needs at least one defect region and one normal pixel.
Callers should only ask for pixel metrics when ground-truth masks exist.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

# 8-connectivity for defect regions, as in the MVTec AD evaluation code: pixels
# that touch diagonally belong to the same defect.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _as_binary(y, name: str) -> np.ndarray:
  y = np.asarray(y)
  if y.dtype == bool:
    return y.ravel()
  yf = y.astype(np.float64, copy=False).ravel()
  bad = ~((yf == 0) | (yf == 1))
  if bad.any():
    raise ValueError(
        f"{name} must be binary (0/1); found {int(bad.sum())} other value(s), "
        f"e.g. {yf[bad][0]!r}"
    )
  return yf == 1


def _as_scores(s, name: str) -> np.ndarray:
  s = np.asarray(s, dtype=np.float64).ravel()
  bad = ~np.isfinite(s)
  if bad.any():
    raise ValueError(f"{name}: {int(bad.sum())} non-finite score(s) (NaN/inf)")
  return s


def _check_pair(y, s, what: str):
  if y.shape[0] != s.shape[0]:
    raise ValueError(f"{what}: {y.shape[0]} labels but {s.shape[0]} scores")
  if y.shape[0] == 0:
    raise ValueError(f"{what}: empty input")
  n_pos = int(y.sum())
  if n_pos == 0 or n_pos == y.shape[0]:
    cls = "anomalous" if n_pos else "normal"
    raise ValueError(
        f"{what} is undefined: only one class present (all {y.shape[0]} "
        f"samples are {cls})"
    )


def _clf_curve(y: np.ndarray, s: np.ndarray):
  """Cumulative (fps, tps, thresholds) at each distinct score.

  Thresholds descend; each is a score of the data, and fps/tps count the
  samples with score >= threshold.
  """
  order = np.argsort(-s, kind="stable")
  s_sorted = s[order]
  y_sorted = y[order]
  # The end of each group of tied scores.
  last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
  tps = np.cumsum(y_sorted, dtype=np.int64)[last]
  fps = (last + 1) - tps
  return fps, tps, s_sorted[last]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
  return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def auroc(labels, scores) -> float:
  """Area under the ROC curve (ties as in sklearn.metrics.roc_auc_score)."""
  y = _as_binary(labels, "labels")
  s = _as_scores(scores, "scores")
  _check_pair(y, s, "AUROC")
  fps, tps, _ = _clf_curve(y, s)
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return _trapezoid(fpr, tpr)


def image_auroc(labels, scores) -> float:
  """Image-level AUROC: labels (N,) in {0,1}, scores (N,)."""
  return auroc(labels, scores)


def _check_maps(masks, maps, what):
  masks, maps = np.asarray(masks), np.asarray(maps)
  if masks.shape != maps.shape:
    raise ValueError(
        f"{what}: masks shape {masks.shape} != maps shape {maps.shape}"
    )
  return masks, maps


def pixel_auroc(masks, maps) -> float:
  """Pixel-level AUROC over all pixels of all images: masks/maps (N, H, W)."""
  masks, maps = _check_maps(masks, maps, "pixel AUROC")
  return auroc(masks, maps)


def _f1_curve(y: np.ndarray, s: np.ndarray):
  """(thresholds descending, F1) for validated labels and scores."""
  fps, tps, thr = _clf_curve(y, s)
  # F1 = 2PR / (P + R), in this order of operations so that reported F1
  # values stay bit-identical across releases (the algebraically equal
  # 2TP / (TP + FP + #positives) rounds differently).
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  denom = precision + recall
  f1 = np.divide(
      2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0
  )
  return thr, f1


def f1_curve(labels, scores) -> Tuple[np.ndarray, np.ndarray]:
  """F1 of the decision `score >= t` at every distinct score t.

  The one F1 curve of the package: ``f1_max_threshold`` (the metric) and
  ``thresholds.f1_threshold`` (the deployed decision threshold) both read
  it and differ only in how they break ties, see there.

  Args:
    labels: (N,) binary labels, 1 = anomalous.
    scores: (N,) finite scores, higher = more anomalous.

  Returns:
    (thresholds, f1): (T,) float64 arrays, T = number of distinct scores,
    thresholds strictly descending. Same points as sklearn's
    ``precision_recall_curve`` (without its final (P=1, R=0) point).
  """
  y = _as_binary(labels, "labels")
  s = _as_scores(scores, "scores")
  _check_pair(y, s, "F1")
  return _f1_curve(y, s)


def f1_max_threshold(labels, scores) -> Tuple[float, float]:
  """(max F1 over thresholds, the threshold reaching it), `score >= t`.

  The threshold is a score of the data. Among equal F1 values the lowest
  threshold is returned, the first argmax of sklearn's ascending
  ``precision_recall_curve``, so that the reported metric matches sklearn.
  ``thresholds.f1_threshold`` breaks the same ties the other way (and
  places the threshold between two scores) because a deployed decision
  threshold should raise the fewest alarms; the F1 value is the same.
  """
  thr, f1 = f1_curve(labels, scores)
  # Thresholds descend here: the last maximum is the lowest threshold.
  i = len(f1) - 1 - int(np.argmax(f1[::-1]))
  return float(f1[i]), float(thr[i])


def f1_max(labels, scores) -> float:
  """Maximum F1 score over all thresholds."""
  return f1_max_threshold(labels, scores)[0]


def pro_curve(masks, maps):
  """Exact per-region-overlap curve: (fpr, pro) at every distinct threshold.

  Regions are the 8-connected components of each image's mask. PRO(t) is the
  mean over all regions of the fraction of the region with score >= t; FPR(t)
  is the fraction of all normal pixels (of every image) with score >= t. The
  curve starts at (0, 0).
  """
  masks, maps = _check_maps(masks, maps, "AUPRO")
  if masks.ndim == 2:
    masks, maps = masks[None], maps[None]
  if masks.ndim != 3:
    raise ValueError(
        f"AUPRO: expected (N, H, W) masks/maps, got shape {masks.shape}"
    )
  gt = _as_binary(masks, "masks").reshape(masks.shape)
  s = _as_scores(maps, "anomaly maps")
  # Global region ids: 0 = normal pixel, 1..R = defect regions of all images.
  region = np.zeros(gt.shape, np.int64)
  n_regions = 0
  for i in range(gt.shape[0]):
    lab, k = ndimage.label(gt[i], structure=_CONNECTIVITY)
    region[i] = np.where(lab > 0, lab + n_regions, 0)
    n_regions += k
  region = region.ravel()
  n_normal = int((region == 0).sum())
  if n_regions == 0:
    raise ValueError("AUPRO is undefined: the masks contain no defect pixels")
  if n_normal == 0:
    raise ValueError("AUPRO is undefined: the masks contain no normal pixels")
  size = np.bincount(region, minlength=n_regions + 1).astype(np.float64)
  # Each defect pixel adds 1/(|region| * R) to PRO once the threshold passes it.
  contrib = np.where(region > 0, 1.0 / (size[region] * n_regions), 0.0)
  normal = region == 0
  order = np.argsort(-s, kind="stable")
  s_sorted = s[order]
  last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
  fpr = np.cumsum(normal[order], dtype=np.int64)[last] / n_normal
  pro = np.minimum(np.cumsum(contrib[order])[last], 1.0)
  return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
  """Area under the PRO curve for FPR in [0, fpr_limit], over fpr_limit.

  The curve is interpolated linearly at exactly fpr_limit. The normalisation is
  by fpr_limit itself, not by the last FPR reached below it, so the result is
  in [0, 1].
  """
  if not 0.0 < float(fpr_limit) <= 1.0:
    raise ValueError(f"AUPRO: fpr_limit must be in (0, 1], got {fpr_limit}")
  fpr, pro = pro_curve(masks, maps)
  # First point beyond the limit (exists because the curve ends at fpr == 1).
  j = int(np.searchsorted(fpr, fpr_limit, side="right"))
  xs, ys = fpr[:j], pro[:j]
  if j < fpr.size and xs[-1] < fpr_limit:
    t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
    xs = np.r_[xs, fpr_limit]
    ys = np.r_[ys, pro[j - 1] + t * (pro[j] - pro[j - 1])]
  return _trapezoid(xs, ys) / float(fpr_limit)
