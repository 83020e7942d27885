"""Thresholds: quantile, F1-optimal decision thresholds, folds."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from softpatch_jax import metrics
from softpatch_jax import thresholds


def _f1_case(seed, n_max=60):
  """Random labels (both classes) and scores with ties, also across classes."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, n_max))
  labels = rng.integers(0, 2, n)
  labels[:2] = [0, 1]
  scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
  scores[rng.integers(0, n, 3)] = scores[0]  # ties
  if seed % 2:
    scores = np.round(scores, 1)  # many ties
  return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_threshold_matches_bruteforce(seed):
  labels, scores = _f1_case(seed)
  f1, t = thresholds.f1_threshold(labels, scores)
  cuts = np.unique(scores)
  per_cut = [f1_score(labels, scores >= c) for c in cuts]
  best = max(per_cut)
  assert f1 == pytest.approx(best, abs=1e-12)
  assert f1_score(labels, scores >= t) == pytest.approx(best, abs=1e-12)
  # F1 ties go to the highest threshold (fewest alarms); t lies between that
  # cut and the next lower score.
  hi = cuts[max(i for i, v in enumerate(per_cut) if v == pytest.approx(best))]
  lower = cuts[cuts < hi]
  assert t <= hi and (lower.size == 0 or t > lower.max())


@pytest.mark.parametrize("seed", range(8))
def test_f1_threshold_and_metric_agree_on_f1(seed):
  # One curve (metrics.f1_curve) behind both: the same F1 value exactly,
  # though the metric reports the lowest threshold among F1 ties and the
  # decision threshold the highest (and a midpoint).
  labels, scores = _f1_case(100 + seed, n_max=300 if seed < 4 else 12)
  f1_t, t = thresholds.f1_threshold(labels, scores)
  f1_m, t_m = metrics.f1_max_threshold(labels, scores)
  assert f1_t == f1_m
  assert np.sum(scores >= t) <= np.sum(scores >= t_m)  # never more alarms
  assert f1_score(labels, scores >= t_m) == pytest.approx(f1_m, abs=1e-12)
  assert f1_score(labels, scores >= t) == pytest.approx(f1_t, abs=1e-12)


def test_f1_threshold_midpoint_and_errors():
  f1, t = thresholds.f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
  assert f1 == 1.0 and t == pytest.approx(0.5)
  # F1 = 2/3 both when flagging the top score and when flagging all: the
  # decision threshold takes the higher cut, the metric the lower (sklearn).
  labels, scores = [1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]
  f1, t = thresholds.f1_threshold(labels, scores)
  assert f1 == pytest.approx(2 / 3) and t == pytest.approx(0.85)
  assert metrics.f1_max_threshold(labels, scores) == (f1, 0.6)
  with pytest.raises(ValueError, match="both normal and anomalous"):
    thresholds.f1_threshold([0, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    thresholds.f1_threshold([0, 1], [0.1, np.nan])
  f1, t = thresholds.pixel_f1_threshold(np.eye(4)[None], np.eye(4)[None] * 3)
  assert f1 == 1.0 and 0 < t <= 3


@pytest.mark.parametrize(
    "n,k,seed", [(2, 5, 0), (7, 5, 1), (23, 5, 2), (10, 3, 3)]
)
def test_fold_split_partitions(n, k, seed):
  folds = thresholds.fold_split(n, k, seed)
  assert len(folds) == min(k, n)
  allidx = np.concatenate(folds)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
  sizes = [f.size for f in folds]
  assert max(sizes) - min(sizes) <= 1
  np.testing.assert_array_equal(
      np.concatenate(thresholds.fold_split(n, k, seed)), allidx
  )  # seeded


def test_quantile_and_threshold_options():
  assert thresholds.quantile([1, 2, 3, 4, 5], 0.5) == 3.0
  assert thresholds.quantile([1, 2], 1.0) == 2.0
  with pytest.raises(ValueError, match="no scores"):
    thresholds.quantile([], 0.5)
  opts = thresholds.ThresholdOptions
  with pytest.raises(ValueError, match="threshold.method must be one of"):
    opts("median")
  with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
    opts("quantile", quantile=1.5)
  with pytest.raises(ValueError, match=r"pixel_quantile must be in \(0, 1\]"):
    opts(pixel_quantile=0.0)
  with pytest.raises(ValueError, match="folds must be >= 2"):
    opts("quantile", folds=1)
  opts("manual", folds=1, value=3.0)  # folds only matter for 'quantile'
  with pytest.raises(ValueError, match="needs config.threshold.value"):
    opts("manual")
  with pytest.raises(ValueError, match="threshold.value must be finite"):
    opts("manual", value=float("nan"))
  with pytest.raises(ValueError, match="pixel_value must be finite"):
    opts("manual", value=1.0, pixel_value=float("inf"))
  with pytest.raises(ValueError, match="val_dir"):
    opts("f1")
  assert opts(quantile=0.9).resolved_pixel_quantile == 0.9
  assert opts(quantile=0.9, pixel_quantile=0.5).resolved_pixel_quantile == 0.5


def test_chosen_thresholds_record():
  chosen = thresholds.ChosenThresholds(1, None, "quantile", {"folds": 3})
  assert chosen.image == 1.0 and isinstance(chosen.image, float)
  assert chosen.to_record() == {
      "image": 1.0,
      "pixel": None,
      "method": "quantile",
      "details": {"folds": 3},
  }
  assert thresholds.ChosenThresholds(**chosen.to_record()) == chosen
  with pytest.raises(ValueError, match="thresholds.image must be finite"):
    thresholds.ChosenThresholds(float("nan"))
  with pytest.raises(ValueError, match="thresholds.method must be one of"):
    thresholds.ChosenThresholds(1.0, method="guess")
