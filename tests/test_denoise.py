"""softpatch_jax.denoise vs sklearn / numpy references."""

import logging

import jax
import numpy as np
import pytest
import torch

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import denoise
from softpatch_jax import denoise_gaussian


def _data(seed, n, p, d, dup=True):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, p, d)).astype(np.float32)
  if dup and n >= 4:
    x[1] = x[0]  # an image duplicated at every position
    x[3, : p // 2] = x[2, : p // 2]  # partial duplicates
    x[:, -1] = np.round(x[:, -1])  # coarse grid: many tied distances
  return x


def test_make_projection_and_project():
  w, b = denoise.make_projection(jax.random.PRNGKey(0), 64, 16)
  assert w.shape == (64, 16) and b.shape == (16,)
  bound = 1 / np.sqrt(64)
  assert (
      float(np.abs(w).max()) <= bound and float(np.abs(w).max()) > 0.9 * bound
  )
  w2, _ = denoise.make_projection(jax.random.PRNGKey(0), 64, 16)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(w2))
  x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(denoise.project(x, (w, b))),
      x.astype(np.float64) @ np.asarray(w, np.float64),
      rtol=1e-5,
      atol=1e-5,
  )
  with pytest.raises(ValueError, match="dim"):
    denoise.project(x[..., :10], (w, b))


def _ambiguous_knn(xj, k):
  """True if some point's k-th and (k+1)-th neighbours tie at distinct locations.

  sklearn's choice among such ties follows float noise in its distance code, so
  LOF is not uniquely defined there. Ties among exact duplicates are harmless
  (duplicates share the same lrd) and are kept in the comparison.
  """
  x = xj.astype(np.float64)
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  srt = np.sort(dist, axis=1)
  for i in range(len(x)):
    if k < len(x) - 1 and srt[i, k - 1] == srt[i, k]:
      group = np.flatnonzero(dist[i] == srt[i, k - 1])
      if len(np.unique(x[group], axis=0)) > 1:
        return True
  return False


@pytest.mark.parametrize(
    "seed,n,p,d,k",
    [
        (0, 12, 3, 5, 6),
        (1, 9, 4, 3, 5),
        (2, 20, 2, 8, 3),
        (3, 7, 3, 4, 6),
        (4, 5, 2, 6, 6),
        (5, 30, 3, 2, 6),
    ],
)
def test_lof_matches_sklearn(seed, n, p, d, k):
  x = _data(seed, n, p, d)
  got = np.asarray(
      denoise.patch_weights(x, "lof", denoise.DenoiseOptions(lof_k=k))
  )
  assert got.shape == (n, p) and np.all(np.isfinite(got))
  kk = min(k, n - 1)
  compared = 0
  for j in range(p):
    if _ambiguous_knn(x[:, j], kk):
      continue
    compared += 1
    ref = _testutil.sklearn_lof(x[None, :, j], kk, fit_dtype=np.float64)[0]
    np.testing.assert_allclose(got[:, j], ref, rtol=2e-4, atol=2e-4)
  assert compared >= p - 1  # only the coarse-grid position may be skipped


def test_lof_k_clamped_with_warning(caplog):
  x = _data(5, 4, 2, 3, dup=False)
  with caplog.at_level(logging.WARNING):
    got = np.asarray(
        denoise.patch_weights(x, "lof", denoise.DenoiseOptions(lof_k=6))
    )
  assert "lof_k=6" in caplog.text
  for j in range(2):
    ref = _testutil.sklearn_lof(x[None, :, j], 3)[0]
    np.testing.assert_allclose(got[:, j], ref, rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="lof_k"):
    denoise.effective_lof_k(0, 10)


@pytest.mark.parametrize(
    "seed,n,p,d", [(0, 10, 5, 4), (1, 2, 3, 6), (2, 31, 7, 16), (3, 6, 1, 2)]
)
def test_nearest_matches_bruteforce(seed, n, p, d):
  x = _data(seed, n, p, d)
  got = np.asarray(denoise.patch_weights(x, "nearest"))
  xd = x.astype(np.float64)
  diff = np.sqrt(((xd[:, None] - xd[None, :]) ** 2).sum(-1))  # (N, N, P)
  diff[np.arange(n), np.arange(n)] = np.inf
  ref = diff.min(axis=1) + 1.0
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  if n >= 4:
    np.testing.assert_array_equal(
        got[0], 1.0
    )  # exact duplicate -> distance exactly 0


def test_nearest_chunked(monkeypatch):
  # Force several position chunks (and a remainder) through lax.map.
  monkeypatch.setattr(denoise, "_BLOCK_ELEMS", 3 * 8 * 8)
  x = _data(7, 8, 10, 3)
  got = np.asarray(denoise.patch_weights(x, "nearest"))
  xd = x.astype(np.float64)
  diff = np.sqrt(((xd[:, None] - xd[None, :]) ** 2).sum(-1))
  diff[np.arange(8), np.arange(8)] = np.inf
  np.testing.assert_allclose(got, diff.min(axis=1) + 1, rtol=1e-4, atol=1e-4)


def _gaussian_in_sample(xj, reg=0.01):
  """The reference: all N points, unbiased covariance + reg I (float64)."""
  d = xj.shape[1]
  cov = np.cov(xj, rowvar=False, ddof=1).reshape(d, d) + reg * np.eye(d)
  delta = xj - xj.mean(0)
  return np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(cov), delta))


@pytest.mark.parametrize(
    "seed,n,p,d",
    [
        (0, 20, 4, 4),
        (1, 6, 3, 10),
        (2, 40, 2, 16),
        (3, 3, 5, 2),
        (4, 16, 2, 64),
        (5, 2, 3, 5),
        (6, 90, 2, 6),
    ],
)
def test_gaussian_matches_numpy(seed, n, p, d):
  x = _data(seed, n, p, d) * np.float32(0.1 + 3 * seed)  # scales differ
  got = np.asarray(denoise.patch_weights(x, "gaussian"))
  ref = np.stack(
      [_testutil.gaussian_loo(x[:, j].astype(np.float64)) for j in range(p)], 1
  )
  np.testing.assert_allclose(got, ref + 1, rtol=2e-3, atol=2e-3)
  # in_sample=True is the reference implementation's in-sample fit.
  got = np.asarray(denoise.gaussian_distance(x.transpose(1, 0, 2), 0.01, True))
  ref = np.stack(
      [_gaussian_in_sample(x[:, j].astype(np.float64)) for j in range(p)]
  )
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ledoit_wolf_matches_sklearn(seed):
  covariance = pytest.importorskip("sklearn.covariance")
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((7 + 5 * seed, 12)) * rng.uniform(0.5, 3, 12)
  c = x - x.mean(0)
  alpha, mu = denoise_gaussian.ledoit_wolf(np.float32(c), np.float32(c.T @ c))
  np.testing.assert_allclose(
      float(alpha), covariance.ledoit_wolf_shrinkage(x), rtol=1e-3
  )
  np.testing.assert_allclose(float(mu), np.trace(c.T @ c) / len(x) / 12, 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_flags_an_outlier_with_few_images(seed):
  # N = 12 images in d = 64 dimensions (fewer images than dimensions): the
  # in-sample fit gives every point the same distance; leave-one-out does
  # not, and the injected image stands out at every position.
  rng = np.random.default_rng(seed)
  n, p, d = 12, 5, 64
  x = rng.standard_normal((n, p, d)).astype(np.float32)
  x[7] += 2.0 * rng.standard_normal((p, d)).astype(np.float32)
  w = np.asarray(denoise.patch_weights(x, "gaussian"))
  assert (np.argmax(w, axis=0) == 7).all()
  others = np.delete(w, 7, axis=0)
  assert (w[7] > 1.3 * others.max(axis=0)).all()
  # Identical points all score 1 (zero distance).
  np.testing.assert_allclose(
      np.asarray(
          denoise.patch_weights(np.ones((4, 2, 3), np.float32), "gaussian")
      ),
      1.0,
  )
  old = np.asarray(denoise.gaussian_distance(x.transpose(1, 0, 2), 0.01, True))
  assert old.std(axis=1).max() < 1e-3 * old.mean()  # the bug it fixes


def test_gaussian_jit_equals_eager():
  x = _data(9, 10, 3, 4)
  f = jax.jit(lambda a: denoise.patch_weights(a, "gaussian"))
  np.testing.assert_allclose(
      np.asarray(f(x)),
      np.asarray(denoise.patch_weights(x, "gaussian")),
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("frac", [0.15, 0.0, 0.5, 0.01])
def test_threshold_and_denoise(seed, frac):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((13, 17)).astype(np.float32)
  w[0, :5] = w[1, :5]  # ties
  t = float(denoise.outlier_threshold(w, frac))
  np.testing.assert_allclose(
      t, np.quantile(w.astype(np.float64), 1 - frac), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      t,
      float(torch.quantile(torch.from_numpy(w).reshape(-1), 1 - frac)),
      rtol=1e-5,
      atol=1e-6,
  )
  mask, soft, t2 = denoise.denoise(w, frac)
  assert float(t2) == t
  np.testing.assert_array_equal(np.asarray(mask), w > np.float32(t))
  np.testing.assert_array_equal(np.asarray(soft), np.maximum(w, 0))


def test_bad_inputs():
  x = _data(0, 5, 2, 3)
  with pytest.raises(ValueError, match="unknown discriminator 'median'"):
    denoise.patch_weights(x, "median")
  with pytest.raises(ValueError, match="shape"):
    denoise.patch_weights(x[0], "nearest")
  with pytest.raises(ValueError, match="at least 2"):
    denoise.patch_weights(x[:1], "nearest")
  bad = x.copy()
  bad[0, 0, 0] = np.nan
  bad[1, 1, 2] = np.inf
  with pytest.raises(ValueError, match="2 non-finite"):
    denoise.patch_weights(bad, "gaussian")
  with pytest.raises(ValueError, match="noise_fraction"):
    denoise.outlier_threshold(x, 1.0)


def test_lof_jit_equals_eager():
  x = _data(6, 10, 5, 4, dup=False)
  f = jax.jit(
      lambda a: denoise.patch_weights(a, "lof", denoise.DenoiseOptions(lof_k=4))
  )
  np.testing.assert_array_equal(
      np.asarray(f(x)),
      np.asarray(
          denoise.patch_weights(x, "lof", denoise.DenoiseOptions(lof_k=4))
      ),
  )


def test_register_discriminator():
  @denoise.register_discriminator("test_norm")
  def norm(x, options):
    del options
    return np.linalg.norm(x, axis=-1)

  try:
    x = _data(7, 4, 3, 2, dup=False)
    np.testing.assert_allclose(
        np.asarray(denoise.patch_weights(x, "test_norm")),
        np.linalg.norm(x, axis=-1),
        rtol=1e-6,
    )
  finally:
    denoise.DISCRIMINATORS.unregister("test_norm")
