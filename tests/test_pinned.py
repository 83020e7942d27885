"""Pinned results: the functional core reproduces the earlier pipeline.

`data/pinned_results.json` holds the image scores, metrics and fit -> predict
scores that the package computed on generated data before its stages were
reshaped into pure functions (every method, the held-out threshold and the
predict command). The reshaping was verified bit-identical on this 2-core
x86-64 CPU. Since then the depthwise convolutions run as shifted
multiply-adds and the two patch-feature poolings are folded into one
(backbones/efficientnet_lite.py, features.py): the same arithmetic in
another float32 summation order, which moved these scores by up to 2e-6
relative and left every metric unchanged. The scores are compared to a
relative 1e-5 (float rounding on any CPU), the thresholds likewise, and
the metrics to 1e-7: pixel AUROC ranks 69,632 pixels, and a rounding-level
change can swap two nearly tied ones (it moved 5e-9).
"""

import json
import os

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import defaults
from softpatch_jax import inference
from softpatch_jax import evaluate
from softpatch_jax import fit
from softpatch_jax import predict

PINNED = os.path.join(os.path.dirname(__file__), "data", "pinned_results.json")
# Results fields renamed since the numbers were pinned.
RENAMED = {"n_noise_patches": "n_outlier_patches"}


def experiment_config():
  c = defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = c.data.crop = 64
  c.data.batch_size = 8
  c.data.num_workers = 2
  c.data.synthetic.n_train = 12
  c.data.synthetic.n_test_good = 5
  c.data.synthetic.n_test_defect = 6
  c.data.synthetic.size = 64
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.25
  c.noise.overlap = True
  c.noise.draw = "numpy"  # the draw the numbers were pinned with
  c.methods = (
      "softpatch_lof,softpatch_nearest,softpatch_gaussian,"
      "patchcore,patchcore_random"
  )
  c.output.num_heatmaps = 0
  return c


@pytest.fixture(scope="module")
def pinned():
  with open(PINNED, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("pinned")
  captured = {}
  orig = inference.score_stream

  def capture(banks, *args, **kwargs):
    preds = orig(banks, *args, **kwargs)
    captured.update({n: p.image_scores for n, p in preds.items()})
    return preds

  inference.score_stream = capture
  try:
    result = evaluate.run(experiment_config(), str(out / "exp"))
  finally:
    inference.score_stream = orig
  root = out / "exp" / "synthetic_data" / "synth"
  summary = fit.fit_and_save(
      _testutil.fit_config(root / "train" / "good", folds=3), str(out / "model")
  )
  pred = predict.predict(
      str(out / "model"),
      str(root / "test"),
      str(out / "pred"),
      predict.PredictOptions(recursive=True, progress=False, heatmaps=False),
  )
  return root, result, captured, summary, pred


def test_experiment_scores_and_metrics_pinned(pinned, runs):
  _, result, captured, _, _ = runs
  want = pinned["experiment"]
  assert sorted(captured) == sorted(want["image_scores"])
  for name, scores in want["image_scores"].items():
    np.testing.assert_allclose(captured[name], scores, rtol=1e-5, err_msg=name)
  rows = {r["method"]: r for r in result["results"] if r["category"] == "synth"}
  for name, metrics in want["metrics"].items():
    for key, value in metrics.items():
      # Patches flagged by the discriminator are "outlier patches" now.
      got = rows[name][RENAMED.get(key, key)]
      assert got == pytest.approx(value, abs=1e-7), (name, key)


def test_fit_predict_pinned(pinned, runs):
  root, _, _, summary, pred = runs
  want = pinned["fit_predict"]
  assert [os.path.relpath(r["path"], root) for r in pred["rows"]] == want[
      "paths"
  ]
  np.testing.assert_allclose(
      [r["score"] for r in pred["rows"]], want["scores"], rtol=1e-5
  )
  assert summary["thresholds"]["image"] == pytest.approx(
      want["image_threshold"], rel=1e-5
  )
  assert summary["thresholds"]["pixel"] == pytest.approx(
      want["pixel_threshold"], rel=1e-5
  )
