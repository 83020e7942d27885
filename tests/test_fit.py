"""fit: config checks, held-out / manual / F1 thresholds, the saved model."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import f1_score

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import options
from softpatch_jax import predict
from softpatch_jax import thresholds
from softpatch_jax.data import synthetic


def fit_config(train_dir, **overrides):
  return _testutil.fit_config(train_dir, folds=None, **overrides)


def test_fit_settings_are_checked_at_the_edge(tmp_path):
  c = fit_config(tmp_path)
  opts = options.from_config(c)
  assert fit.fit_method(opts) == "softpatch_lof"
  assert opts.threshold.method == "quantile" and opts.threshold.quantile == 0.95
  assert opts.threshold.resolved_pixel_quantile == 0.95
  c.methods = "softpatch_lof,patchcore"
  with pytest.raises(ValueError, match="fit mode saves one model"):
    fit.fit_method(options.from_config(c))
  with pytest.raises(ValueError, match="fit mode saves one model"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  c.methods = "patchcore"
  c.data.feature_store = "disk"
  assert fit.fit_method(options.from_config(c)) == "patchcore"
  c.data.feature_store = "ssd"
  with pytest.raises(ValueError, match="data.feature_store must be one of"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  c.data.feature_store = "memory"
  c.denoise.noise_fraction = 1.0
  with pytest.raises(ValueError, match="noise_fraction"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir


def test_check_train_size():
  fit.check_train_size(3, "softpatch_lof", "quantile")
  fit.check_train_size(2, "patchcore", "quantile")
  fit.check_train_size(2, "softpatch_lof", "manual")
  with pytest.raises(ValueError, match="no training images"):
    fit.check_train_size(0, "patchcore", "manual")
  with pytest.raises(ValueError, match="at least 3 training images"):
    fit.check_train_size(2, "softpatch_lof", "quantile")


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
  assert m.thresholds.method == "manual"
  assert m.image_threshold == 123.5 and m.pixel_threshold == 100.0
  assert m.heldout_image_scores is None


def test_f1_threshold_from_labelled_folder(data, tmp_path):
  c = fit_config(
      data / "train" / "good",
      **{"threshold.method": "f1", "threshold.val_dir": str(data / "test")}
  )
  fit.fit_and_save(c, str(tmp_path))
  m = model_io.load_model(str(tmp_path))
  det = m.thresholds.details
  assert m.thresholds.method == "f1"
  assert det["n_val"] == 3 + 2 * 2 and det["n_val_anomalous"] == 4
  assert 0 < det["image_f1"] <= 1 and 0 < det["pixel_f1"] <= 1
  assert m.pixel_threshold is not None
  # The stored threshold reproduces the reported F1 on the folder.
  res = predict.predict(
      m,
      str(data / "test"),
      str(tmp_path / "p"),
      predict.PredictOptions(recursive=True, heatmaps=False, progress=False),
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


def test_quantile_threshold_from_stored_heldout_scores(data, tmp_path):
  c = fit_config(data / "train" / "good", **{"threshold.folds": 3})
  summary = fit.fit_and_save(c, str(tmp_path))
  m = model_io.load_model(str(tmp_path))
  assert m.thresholds.method == "quantile"
  assert m.heldout_image_scores.shape == (5,)
  assert m.image_threshold == thresholds.quantile(m.heldout_image_scores, 0.95)
  assert m.pixel_threshold == thresholds.quantile(m.heldout_pixel_max, 0.95)
  with open(tmp_path / fit.SUMMARY_FILENAME, encoding="utf-8") as f:
    on_disk = json.load(f)
  assert (
      on_disk["bank_size"] == summary["bank_size"] == m.bank_features.shape[0]
  )
  assert on_disk["fit_info"]["n_train"] == 5
  assert on_disk["thresholds"] == m.thresholds.to_record()
  assert on_disk["thresholds"]["details"]["folds"] == 3
  # Patches flagged by the discriminator are outlier patches; "noise" is
  # only the injected images (none here).
  info = on_disk["fit_info"]
  assert info["n_outlier_patches"] == m.fit_info["n_outlier_patches"] > 0
  assert 0 < info["outlier_weight_threshold"]
  top = info["most_outlying_train_images"]
  assert len(top) == 5 and {"path", "outlier_fraction"} <= set(top[0])
  assert info["noise"] is None
  assert on_disk["backbone"]["weights_id"] == m.backbone.weights_id
  assert sorted(os.listdir(tmp_path)) == [
      fit.SUMMARY_FILENAME,
      model_io.MODEL_FILENAME,
  ]
