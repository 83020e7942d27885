"""fitting: every method fitted over a training set, held-out scores, and
the outlier summaries of a fit."""

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import denoise
from softpatch_jax import embedding
from softpatch_jax import features
from softpatch_jax import fitting
from softpatch_jax import methods
from softpatch_jax import scoring
from softpatch_jax import thresholds
from softpatch_jax.data import synthetic


@pytest.fixture(scope="module")
def bb():
  return backbones.load(
      "efficientnet_lite0", weights="random", layers=("stage3", "stage5")
  )


def test_fit_methods_on_generated_images(bb, tmp_path):
  synthetic.make_mvtec_like(
      tmp_path, n_train=6, n_test_good=1, n_test_defect=1, size=48, seed=0
  )
  train, _ = data.mvtec.load_category(str(tmp_path), "synth")
  emb = embedding.for_backbone(bb, features.EmbedOptions(), batch_size=4)
  pre = data.preprocess_for(
      data.DataOptions(resize=48, crop=48), bb.mean, bb.std
  )
  options = fitting.BankOptions(
      coreset=coreset.CoresetOptions(projection_dim=16)
  )
  loader = embedding.LoaderOptions(num_workers=1)
  names = ["softpatch_lof", "patchcore"]
  fitted = fitting.fit_methods(
      train, emb, pre, names, options, seed=0, loader=loader
  )
  assert fitted.train_feats.shape == (6, 36, 1024)
  assert fitted.grid == (6, 6) and fitted.image_size == (48, 48)
  lof, pc = fitted.infos["softpatch_lof"], fitted.infos["patchcore"]
  assert 0 < lof.n_outlier_patches <= int(0.15 * 6 * 36) + 1
  assert lof.image_outlier_fraction.shape == (6,) and pc.weights is None
  assert lof.outlier_threshold is not None and pc.outlier_threshold is None
  assert fitted.banks["softpatch_lof"].size == int(0.1 * 6 * 36)
  assert fitted.banks["softpatch_lof"].soft_weight
  assert not fitted.banks["patchcore"].soft_weight
  # The same fit with the features in a temporary file: identical banks.
  disk = embedding.LoaderOptions(num_workers=1, feature_store="disk")
  spilled = fitting.fit_methods(
      train, emb, pre, ["softpatch_lof"], options, seed=0, loader=disk
  )
  assert isinstance(spilled.train_feats, np.memmap)
  np.testing.assert_array_equal(spilled.train_feats, fitted.train_feats)
  np.testing.assert_array_equal(
      np.asarray(spilled.banks["softpatch_lof"].features),
      np.asarray(fitted.banks["softpatch_lof"].features),
  )


_OPTIONS = fitting.BankOptions(
    denoise.DenoiseOptions(lof_k=3, noise_fraction=0.1),
    coreset.CoresetOptions(fraction=0.5, num_starts=2, projection_dim=8),
    scoring.ScoringOptions(blur_sigma=1.0),
)
_GEOMETRY = methods.BankGeometry((4, 4), (8, 8))


@pytest.mark.parametrize("method", ["softpatch_lof", "patchcore"])
def test_heldout_scores_are_out_of_fold(method):
  """Each image is scored by a bank that never saw it."""
  rng = np.random.default_rng(0)
  n, p, d = 9, 16, 12
  feats = rng.normal(size=(n, p, d)).astype(np.float32)
  key = jax.random.PRNGKey(0)
  folds = thresholds.fold_split(n, 3, 0)
  img, pix = fitting.heldout_scores(
      feats, method, key, _OPTIONS, _GEOMETRY, folds, batch_size=4
  )
  assert img.shape == pix.shape == (n,)
  assert np.all(img > 0)  # an in-bank image would match itself (score ~0)
  # Recompute fold 0 by hand.
  held = folds[0]
  rest = np.setdiff1d(np.arange(n), held)
  bank, _ = fitting.fit_bank(
      feats[rest], method, jax.random.fold_in(key, 1), _OPTIONS, _GEOMETRY
  )
  s = np.asarray(scoring.score(bank, feats[held])[0])
  np.testing.assert_allclose(img[held], s, rtol=1e-6)


def test_fit_bank_info_and_outlier_summary():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(6, 16, 12)).astype(np.float32)
  feats[2] += 5.0  # one outlying image
  bank, info = fitting.fit_bank(
      feats, "softpatch_lof", jax.random.PRNGKey(1), _OPTIONS, _GEOMETRY
  )
  assert (info.method, info.n_images, info.n_patches) == (
      "softpatch_lof",
      6,
      96,
  )
  assert info.bank_size == bank.size == info.bank_images.size
  flagged = info.image_outlier_fraction
  assert info.n_outlier_patches == int(round(flagged.sum() * 16))
  assert flagged[2] == flagged.max() > 0
  injected = np.zeros(6, bool)
  injected[2] = True
  summary = fitting.image_outlier_summary(info, injected)
  assert summary["outlier_frac_injected"] == flagged[2]
  assert summary["outlier_frac_clean"] == pytest.approx(
      np.delete(flagged, 2).mean()
  )
  assert not fitting.image_outlier_summary(info, np.zeros(6, bool))
  _, plain = fitting.fit_bank(
      feats, "patchcore", jax.random.PRNGKey(1), _OPTIONS, _GEOMETRY
  )
  assert plain.n_outlier_patches == 0 and plain.image_outlier_fraction is None
  assert not fitting.image_outlier_summary(plain, injected)
