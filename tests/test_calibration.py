"""Calibrated scores: a monotone map raw -> [0, 1], the threshold at 0.5."""

import jax
import numpy as np
import pytest

from softpatch_jax import calibration


def reference(score_map, x):
  """The plain numpy map: np.interp through the anchors, clipped."""
  xs = np.asarray(score_map.xs, np.float32)
  return np.clip(np.interp(np.asarray(x, np.float32), xs, score_map.ys), 0, 1)


def heldout_sets(seed):
  rng = np.random.default_rng(seed)
  yield rng.gamma(2.0, 5000.0, size=40)  # skewed, like real scores
  yield np.repeat(rng.uniform(1, 10, size=5), 4)  # ties
  yield np.concatenate([rng.normal(100, 5, 30), [1e4, 2e4]])  # outliers
  yield np.full(7, 3.25)  # constant: degenerate
  yield np.array([42.0])  # one score


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_numpy_reference_and_threshold_is_half(seed):
  rng = np.random.default_rng(seed)
  for h in heldout_sets(seed):
    for t in (np.quantile(h, 0.95), h.max(), np.median(h), h.min() * 0.5):
      sm = calibration.fit(t, h)
      assert sm.xs[1] == float(t) and sm.source == "heldout"
      assert np.all(np.diff(sm.xs) > 0)
      x = np.concatenate([
          h,
          rng.uniform(h.min() - 10, h.max() * 3 + 10, 200),
          sm.xs,
          [t, -1e9, 1e9],
      ]).astype(np.float32)
      got = np.asarray(calibration.normalise(sm, x))
      np.testing.assert_allclose(got, reference(sm, x), atol=1e-6)
      assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
      assert np.all(np.diff(got[np.argsort(x, kind="stable")]) >= 0)
      assert float(calibration.normalise(sm, np.float32(t))) == 0.5
      jitted = jax.jit(lambda v, sm=sm: calibration.normalise(sm, v))
      np.testing.assert_array_equal(np.asarray(jitted(x)), got)


def test_anchors_are_documented_quantiles():
  h = np.arange(1, 101, dtype=np.float64)
  t = float(np.quantile(h, 0.95))
  sm = calibration.fit(t, h)
  lo, mid = np.quantile(h, calibration.LOW_QUANTILE), np.median(h)
  assert sm.xs == (lo, t, t + (t - mid)) and sm.ys == (0.0, 0.5, 1.0)
  assert float(calibration.normalise(sm, lo)) == 0.0
  assert float(calibration.normalise(sm, t + (t - mid))) == 1.0
  # Scores of normal images mostly sit below 0.5.
  assert np.mean(np.asarray(calibration.normalise(sm, h)) < 0.5) >= 0.94


@pytest.mark.parametrize("t", [3.25, 0.0, -2.0, 1e-30, 5e30])
def test_degenerate_and_threshold_only(t):
  for h in (None, [], np.full(5, t), np.full(5, t + 1.0)):
    sm = calibration.fit(t, h)
    assert np.all(np.diff(np.asarray(sm.xs, np.float32)) > 0)
    assert float(calibration.normalise(sm, np.float32(t))) == 0.5
    x = np.linspace(sm.xs[0] - 1, sm.xs[-1] + 1, 50, dtype=np.float32)
    got = np.asarray(calibration.normalise(sm, x))
    assert np.all(np.diff(got) >= 0) and 0 <= got.min() and got.max() <= 1
  sm = calibration.fit(10.0)
  assert sm.source == "threshold" and sm.xs == (0.0, 10.0, 20.0)


def test_bad_inputs_refused():
  with pytest.raises(ValueError, match="threshold must be a finite"):
    calibration.fit(float("nan"), [1.0])
  with pytest.raises(ValueError, match="threshold must be a finite"):
    calibration.fit(None)
  with pytest.raises(ValueError, match="1 of 3 held-out scores are NaN"):
    calibration.fit(1.0, [0.5, np.inf, 0.2])
  with pytest.raises(ValueError, match="strictly increasing"):
    calibration.ScoreMap((1.0, 1.0, 2.0), threshold=1.0)
  with pytest.raises(ValueError, match="anchor of 0.5"):
    calibration.ScoreMap((0.0, 1.0, 2.0), threshold=1.5)
  with pytest.raises(ValueError, match="rise within"):
    calibration.ScoreMap((0.0, 1.0, 2.0), (0.0, 0.5, 1.5), 1.0)
  with pytest.raises(ValueError, match="ScoreMap"):
    calibration.Calibration(None)


def test_records_round_trip_and_frozen():
  cal = calibration.for_thresholds(2.0, 3.0, [1.0, 1.5, 2.5], [2.0, 2.2, 4.0])
  back = calibration.Calibration.from_record(cal.to_record())
  assert back == cal and cal.matches(2.0, 3.0) and not cal.matches(2.0, None)
  assert calibration.for_thresholds(None, 1.0) is None
  assert calibration.for_thresholds(2.0).pixel is None
  with pytest.raises(Exception):
    cal.image = None  # frozen
