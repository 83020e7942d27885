"""kernels.score_images against a numpy brute-force scorer."""
import numpy as np
import pytest

from softpatch_jax import kernels


@pytest.mark.parametrize("seed,b,p,m,d", [(0, 3, 49, 120, 32),
                                          (1, 1, 10, 7, 5)])
@pytest.mark.parametrize("soft", [True, False])
def test_matches_numpy(seed, b, p, m, d, soft):
  rng = np.random.default_rng(seed)
  bank = rng.normal(size=(m, d)).astype(np.float32)
  w = rng.uniform(0.5, 2.0, size=m).astype(np.float32)
  feats = rng.normal(size=(b, p, d)).astype(np.float32)
  scores, idx = map(np.asarray, kernels.score_images(bank, w, feats, soft))
  sq = ((feats[:, :, None, :].astype(np.float64) - bank) ** 2).sum(-1)
  want_idx = sq.argmin(-1)
  np.testing.assert_array_equal(idx, want_idx)
  want = sq.min(-1) * (w[want_idx] if soft else 1.0)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
  assert scores.shape == (b, p) and idx.dtype == np.int32


def test_pallas_interpret_path_and_errors():
  rng = np.random.default_rng(2)
  bank = rng.normal(size=(20, 8)).astype(np.float32)
  w = np.ones(20, np.float32)
  feats = rng.normal(size=(2, 6, 8)).astype(np.float32)
  a = kernels.score_images(bank, w, feats, impl="pallas_interpret")
  b = kernels.score_images(bank, w, feats, impl="xla")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5)
  with pytest.raises(ValueError, match="bank_weights"):
    kernels.score_images(bank, w[:3], feats)
  with pytest.raises(ValueError, match="feature dim"):
    kernels.score_images(bank, w, feats[..., :4])
