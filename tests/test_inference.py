"""inference: the one prediction loop (banks and tap-map models), padding,
metrics."""

import numpy as np
import pytest

from softpatch_jax import embedding
from softpatch_jax import inference
from softpatch_jax import metrics
from softpatch_jax import scoring
from softpatch_jax.data import Batch


class _FakeEmbedder:
  """Features = the flattened image, so scores are easy to check."""

  batch_size = 4
  mesh = None

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    return images.reshape(images.shape[0], 4, -1)


class _FakeExtractor:
  """'maps' = the image padded to the batch size, as MapExtractor pads."""

  batch_size = 4

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    return [embedding.pad_batch(images, self.batch_size)]


class _MeanModel:
  """A 'maps' model: image score = mean of the padded map input."""

  source = "maps"

  def __call__(self, maps):
    x = np.asarray(maps[0])
    return x.mean(axis=(1, 2, 3)), x.mean(axis=-1)


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
  models = inference.bank_scorers(banks)
  inputs = inference.Inputs(_FakeEmbedder())
  preds = inference.score_stream(models, inputs, stream, total=2)
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
    inference.score_batch(
        inference.bank_scorers(banks),
        inference.Inputs(_FakeEmbedder()),
        bad,
        what="t",
    )
  with pytest.raises(ValueError, match="no images to score"):
    inference.score_stream(
        inference.bank_scorers(banks), inference.Inputs(_FakeEmbedder()), []
    )


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


def test_one_loop_computes_each_input_once_per_batch():
  rng = np.random.default_rng(2)
  banks = _banks(rng)
  images = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
  labels = np.array([0, 1, 0, 1, 1, 0], np.int32)
  masks = (images[..., 0] > 0).astype(np.float32)
  stream = [
      Batch(images[:4], masks[:4], labels[:4], np.arange(4)),
      Batch(images[4:], masks[4:], labels[4:], np.arange(4, 6)),
  ]
  inputs = inference.Inputs(_FakeEmbedder(), _FakeExtractor())
  models = {"mean": _MeanModel(), **inference.bank_scorers(banks)}
  preds = inference.score_stream(models, inputs, stream, desc="t")
  assert inputs.features.calls == inputs.maps.calls == 2
  assert list(preds) == ["mean", "soft", "hard"]
  np.testing.assert_allclose(
      preds["mean"].image_scores, images.mean(axis=(1, 2, 3)), rtol=1e-6
  )
  assert preds["mean"].maps.shape == (6, 2, 2)
  alone = inference.score_stream(
      inference.bank_scorers(banks),
      inference.Inputs(_FakeEmbedder()),
      stream,
      keep_maps=False,
  )
  for name in banks:  # bit for bit the scores of a banks-only loop
    np.testing.assert_array_equal(
        preds[name].image_scores, alone[name].image_scores
    )
    assert alone[name].maps is None
    np.testing.assert_array_equal(preds[name].masks, masks)


def test_inputs_check_batch_sizes_and_sources():
  ex = _FakeExtractor()
  ex.batch_size = 8
  with pytest.raises(ValueError, match="one batch size"):
    inference.Inputs(_FakeEmbedder(), ex)
  with pytest.raises(ValueError, match="needs an embedder or map extractor"):
    inference.Inputs()
  only_maps = inference.Inputs(maps=_FakeExtractor())
  assert only_maps.batch_size == 4
  models = inference.bank_scorers(_banks(np.random.default_rng(3)))
  with pytest.raises(ValueError, match="scores 'features', and no input"):
    inference.score_batch(
        models, only_maps, np.zeros((1, 2, 2, 3), np.float32), what="t"
    )


def test_bank_scorers_pick_a_search_per_bank(monkeypatch):
  banks = _banks(np.random.default_rng(4))
  got = inference.bank_scorers(banks, {"soft": "chunked"})
  assert got["soft"].search == "chunked" and got["hard"].search is None
  dense = scoring.DenseSearch()
  assert inference.bank_scorers(banks, dense)["hard"].search is dense
  options = scoring.ScoringOptions(memory_budget_mb=3 * 4 * 8 / 2**20)
  chosen = inference.chosen_scorers(banks, options)
  for name, bank in banks.items():
    assert chosen[name].search == scoring.choose_search(bank, options)
  assert chosen["soft"].search.max_bank_rows == 8  # 8 rows of 3 floats
  seen = []

  def score(bank, feats, search=None):
    seen.append(search)
    return np.zeros(1), np.zeros((1, 2, 2)), None

  monkeypatch.setattr(inference.scoring, "score", score)
  got["soft"](np.zeros((1, 4, 3), np.float32))
  assert seen == ["chunked"]
