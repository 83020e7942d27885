"""Thresholds: quantile, F1-optimal, folds, held-out scores, and the fit-time choices."""

import os

import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import fit
from softpatch_jax import metrics
from softpatch_jax import model_io
from softpatch_jax import engine
from softpatch_jax import scoring
from softpatch_jax import thresholds
from softpatch_jax.data import synthetic


def fit_config(train_dir, **overrides):
  return _testutil.fit_config(train_dir, folds=None, **overrides)


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


def test_quantile_and_validate():
  assert thresholds.quantile([1, 2, 3, 4, 5], 0.5) == 3.0
  assert thresholds.quantile([1, 2], 1.0) == 2.0
  with pytest.raises(ValueError, match="no scores"):
    thresholds.quantile([], 0.5)
  with pytest.raises(ValueError, match="method"):
    thresholds.validate("median")
  with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
    thresholds.validate("quantile", quantile=1.5)
  with pytest.raises(ValueError, match="folds"):
    thresholds.validate("quantile", folds=1)
  with pytest.raises(ValueError, match="needs config.threshold.value"):
    thresholds.validate("manual")
  with pytest.raises(ValueError, match="val_dir"):
    thresholds.validate("f1")


@pytest.mark.parametrize("method", ["softpatch_lof", "patchcore"])
def test_heldout_scores_are_out_of_fold(method):
  """Each image is scored by a bank that never saw it."""
  rng = np.random.default_rng(0)
  n, p, d = 9, 16, 12
  feats = rng.normal(size=(n, p, d)).astype(np.float32)
  kw = dict(
      lof_k=3,
      noise_fraction=0.1,
      coreset_fraction=0.5,
      num_starts=2,
      projection_dim=8,
      soft_weight=None,
      grid=(4, 4),
      image_size=(8, 8),
      blur_sigma=1.0,
  )
  key = jax.random.PRNGKey(0)
  folds = thresholds.fold_split(n, 3, 0)
  img, pix = engine.heldout_scores(feats, method, key, kw, folds, batch_size=4)
  assert len(folds) == 3 and img.shape == pix.shape == (n,)
  assert np.all(img > 0)  # an in-bank image would match itself (score ~0)
  # Recompute fold 0 by hand.
  held = thresholds.fold_split(n, 3, 0)[0]
  rest = np.setdiff1d(np.arange(n), held)
  bank, _ = engine.fit_bank(
      feats[rest], method, jax.random.fold_in(key, 1), **kw
  )
  s = np.asarray(scoring.score(bank, feats[held])[0])
  np.testing.assert_allclose(img[held], s, rtol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("thr")
  synthetic.make_mvtec_like(
      root / "d", n_train=5, n_test_good=3, n_test_defect=2, size=64, seed=1
  )
  return root / "d" / "synth"


def test_manual_threshold(data, tmp_path):
  c = fit_config(
      data / "train" / "good",
      **{
          "threshold.method": "manual",
          "threshold.value": 123.5,
          "threshold.pixel_value": 100.0,
      }
  )
  fit.fit_and_save(c, str(tmp_path))
  m = model_io.load_model(str(tmp_path))
  assert m.thresholds["method"] == "manual"
  assert m.image_threshold == 123.5 and m.pixel_threshold == 100.0
  assert m.heldout_image_scores is None


def test_f1_threshold_from_labelled_folder(data, tmp_path):
  c = fit_config(
      data / "train" / "good",
      **{"threshold.method": "f1", "threshold.val_dir": str(data / "test")}
  )
  fit.fit_and_save(c, str(tmp_path))
  m = model_io.load_model(str(tmp_path))
  det = m.thresholds["details"]
  assert m.thresholds["method"] == "f1"
  assert det["n_val"] == 3 + 2 * 2 and det["n_val_anomalous"] == 4
  assert 0 < det["image_f1"] <= 1 and 0 < det["pixel_f1"] <= 1
  assert m.pixel_threshold is not None
  # The stored threshold reproduces the reported F1 on the folder.
  from softpatch_jax import predict

  res = predict.predict(
      m,
      str(data / "test"),
      str(tmp_path / "p"),
      recursive=True,
      heatmaps=False,
      progress=False,
  )
  y = np.array(["good" not in r["path"] for r in res["rows"]])
  pred = np.array([r["decision"] == "anomalous" for r in res["rows"]])
  assert f1_score(y, pred) == pytest.approx(det["image_f1"])


def test_f1_threshold_needs_both_classes(data, tmp_path):
  c = fit_config(
      data / "train" / "good",
      **{"threshold.method": "f1", "threshold.val_dir": str(data / "train")}
  )
  with pytest.raises(ValueError, match="needs normal images in good/"):
    fit.fit_and_save(c, str(tmp_path))
  assert not os.path.exists(tmp_path / model_io.MODEL_FILENAME)
