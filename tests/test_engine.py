"""engine: the Embedder (padding, grid), fitting over a training set, and
held-out scores."""

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import defaults
from softpatch_jax import engine
from softpatch_jax import features
from softpatch_jax import scoring
from softpatch_jax import thresholds
from softpatch_jax.data import synthetic


@pytest.fixture(scope="module")
def bb():
  return backbones.load(
      "efficientnet_lite0", weights="random", layers=("stage3", "stage5")
  )


def test_embedder_pads_and_matches_embed(bb):
  spec = features.EmbedSpec(
      bb.module, bb.layers, pretrain_embed_dim=64, target_embed_dim=32
  )
  emb = engine.Embedder(bb.variables, spec, batch_size=4)
  assert emb.grid((64, 64)) == (8, 8)
  x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  got = np.asarray(emb(x))
  assert got.shape == (3, 64, 32)
  ref, grid = features.embed(bb.variables, x, spec)
  assert grid == (8, 8)
  np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="exceeds batch_size"):
    emb(np.zeros((5, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="batch_size"):
    engine.Embedder(bb.variables, spec, batch_size=0)


def test_fit_methods_on_generated_images(bb, tmp_path):
  synthetic.make_mvtec_like(
      tmp_path, n_train=6, n_test_good=1, n_test_defect=1, size=48, seed=0
  )
  c = defaults.base_config()
  c.data.resize = c.data.crop = 48
  c.data.batch_size = 4
  c.data.num_workers = 1
  c.coreset.projection_dim = 16
  train, _ = data.mvtec.load_category(str(tmp_path), "synth")
  emb = engine.build_embedder(c, bb)
  pre = engine.build_preprocess(c, bb)
  fitted = engine.fit_methods(
      c, train, emb, pre, ["softpatch_lof", "patchcore"]
  )
  assert fitted.train_feats.shape == (6, 36, 1024)
  assert fitted.grid == (6, 6) and fitted.image_size == (48, 48)
  lof, pc = fitted.infos["softpatch_lof"], fitted.infos["patchcore"]
  assert 0 < lof.n_noise_patches <= int(0.15 * 6 * 36) + 1
  assert lof.image_noise_fraction.shape == (6,) and pc.weights is None
  assert fitted.banks["softpatch_lof"].size == int(0.1 * 6 * 36)
  assert fitted.banks["softpatch_lof"].soft_weight
  assert not fitted.banks["patchcore"].soft_weight
  # The same fit with the features in a temporary file: identical banks.
  c.data.feature_store = "disk"
  spilled = engine.fit_methods(c, train, emb, pre, ["softpatch_lof"])
  assert isinstance(spilled.train_feats, np.memmap)
  np.testing.assert_array_equal(spilled.train_feats, fitted.train_feats)
  np.testing.assert_array_equal(
      np.asarray(spilled.banks["softpatch_lof"].features),
      np.asarray(fitted.banks["softpatch_lof"].features),
  )


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
  assert img.shape == pix.shape == (n,)
  assert np.all(img > 0)  # an in-bank image would match itself (score ~0)
  # Recompute fold 0 by hand.
  held = folds[0]
  rest = np.setdiff1d(np.arange(n), held)
  bank, _ = engine.fit_bank(
      feats[rest], method, jax.random.fold_in(key, 1), **kw
  )
  s = np.asarray(scoring.score(bank, feats[held])[0])
  np.testing.assert_allclose(img[held], s, rtol=1e-6)


def test_bank_options_and_rows():
  c = defaults.base_config()
  opts = engine.bank_options(c)
  assert opts["lof_k"] == 6 and opts["coreset_fraction"] == 0.1
  assert engine.max_bank_rows(c, 1024) == 262144  # 1024 MiB of 1024-d rows
  c.scoring.memory_budget_mb = 0
  assert engine.max_bank_rows(c, 1024) is None
