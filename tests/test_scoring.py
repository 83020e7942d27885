"""Scoring against plain references: numpy kNN, torch upsampling, scipy blur."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import jax.numpy as jnp

from softpatch_jax import scoring


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patch_scores_match_bruteforce(seed):
  rng = np.random.default_rng(seed)
  b, p, d, m = rng.integers(1, 4), rng.integers(5, 40), rng.integers(3, 20), \
      rng.integers(1, 70)
  feats = rng.normal(size=(b, p, d)).astype(np.float32)
  bank_f = rng.normal(size=(m, d)).astype(np.float32)
  bank_w = rng.uniform(0.5, 2.0, size=(m,)).astype(np.float32)
  for soft in (False, True):
    bank = scoring.make_bank(bank_f, bank_w, soft_weight=soft)
    scores, idx = scoring.patch_scores(bank, jnp.asarray(feats))
    d2 = ((feats.reshape(-1, 1, d).astype(np.float64)
           - bank_f[None].astype(np.float64)) ** 2).sum(-1)
    ref_idx = d2.argmin(1)
    ref = d2.min(1) * (bank_w[ref_idx] if soft else 1.0)
    np.testing.assert_array_equal(np.asarray(idx).ravel(), ref_idx)
    np.testing.assert_allclose(np.asarray(scores).ravel(), ref, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("grid,size,sigma", [((28, 28), (224, 224), 4.0),
                                             ((7, 5), (40, 33), 2.0),
                                             ((16, 16), (128, 128), 4.0),
                                             ((3, 3), (9, 9), 4.0)])
def test_anomaly_maps_match_torch_and_scipy(grid, size, sigma):
  rng = np.random.default_rng(sum(grid) + sum(size))
  s = rng.uniform(0, 3, size=(2, grid[0] * grid[1])).astype(np.float32)
  up = F.interpolate(torch.from_numpy(s.reshape(2, 1, *grid)), size=size,
                     mode="bilinear", align_corners=False).numpy()[:, 0]
  ref = np.stack([scipy.ndimage.gaussian_filter(u.astype(np.float64),
                                                sigma=sigma) for u in up])
  out = np.asarray(scoring.anomaly_maps(jnp.asarray(s), grid, size, sigma))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_score_batch_image_score_is_max():
  rng = np.random.default_rng(3)
  bank = scoring.make_bank(rng.normal(size=(50, 8)), soft_weight=False,
                           grid=(4, 4), image_size=(16, 16))
  feats = jnp.asarray(rng.normal(size=(3, 16, 8)).astype(np.float32))
  img, maps, patch = scoring.score_batch(bank, feats)
  np.testing.assert_allclose(np.asarray(img), np.asarray(patch).max(-1))
  assert maps.shape == (3, 16, 16)


def test_bank_validation():
  with pytest.raises(ValueError, match="shape"):
    scoring.make_bank(np.zeros((0, 4)))
  with pytest.raises(ValueError, match="weights"):
    scoring.make_bank(np.zeros((3, 4)), np.ones(2))
  bank = scoring.make_bank(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="test features"):
    scoring.patch_scores(bank, jnp.zeros((2, 5, 3)))
