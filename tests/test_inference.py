"""inference: scoring streams against several banks, padding, metrics."""

import numpy as np
import pytest

from softpatch_jax import inference
from softpatch_jax import metrics
from softpatch_jax import scoring
from softpatch_jax.data import Batch


class _FakeEmbedder:
  """Features = the flattened image, so scores are easy to check."""

  batch_size = 4

  def __call__(self, images):
    return images.reshape(images.shape[0], 4, -1)


def _banks(rng):
  f = rng.normal(size=(20, 3)).astype(np.float32)
  w = rng.uniform(0.5, 2, size=(20,)).astype(np.float32)
  kw = dict(grid=(2, 2), image_size=(8, 8), blur_sigma=1.0)
  return {
      "soft": scoring.make_bank(f, w, soft_weight=True, **kw),
      "hard": scoring.make_bank(f, w, soft_weight=False, **kw),
  }


def test_score_stream_matches_score_and_pads(rng=np.random.default_rng(0)):
  banks = _banks(rng)
  images = rng.normal(size=(7, 2, 2, 3)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 0, 1, 1], np.int32)
  stream = [
      Batch(images[:4], None, labels[:4], np.arange(4)),
      Batch(images[4:], None, labels[4:], np.arange(4, 7)),
  ]
  preds = inference.score_stream(banks, _FakeEmbedder(), stream, total=2)
  for name, bank in banks.items():
    img, maps, _ = scoring.score(bank, images.reshape(7, 4, 3))
    np.testing.assert_allclose(
        preds[name].image_scores, np.asarray(img), rtol=1e-6
    )
    np.testing.assert_allclose(
        preds[name].maps, np.asarray(maps), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(preds[name].labels, labels)
    np.testing.assert_array_equal(preds[name].indices, np.arange(7))
    assert preds[name].masks is None
  res = inference.evaluate(preds["soft"])
  assert res["image_auroc"] == pytest.approx(
      metrics.auroc(labels, preds["soft"].image_scores)
  )
  assert res["pixel_auroc"] is None and res["aupro"] is None


def test_nonfinite_features_and_empty_stream():
  rng = np.random.default_rng(1)
  banks = _banks(rng)
  bad = np.full((1, 2, 2, 3), np.nan, np.float32)
  with pytest.raises(ValueError, match="non-finite"):
    inference.score_images(banks, _FakeEmbedder(), bad)
  with pytest.raises(ValueError, match="no images to score"):
    inference.score_stream(banks, _FakeEmbedder(), [])


def test_evaluate_one_class_and_unlabelled_is_na():
  pred = inference.Predictions(
      image_scores=np.array([0.1, 0.2, 0.3]),
      maps=None,
      labels=np.array([0, 0, -1]),
      masks=None,
      indices=np.arange(3),
  )
  assert inference.evaluate(pred) == {
      "image_auroc": None,
      "image_f1_max": None,
      "pixel_auroc": None,
      "aupro": None,
  }
