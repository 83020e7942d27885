"""kernels.knn_pruned: the nearest row of a float64 brute force, to rounding."""

import gc

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import knn
from softpatch_jax.kernels import knn_pruned


def _brute(q, b):
  q = q.astype(np.float64)
  b = b.astype(np.float64)
  return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _check(q, b, dist, idx):
  full = _brute(q, b)
  best = full.min(1)
  # float32 rounding of ||q||^2 - 2 q.b + ||b||^2 (the dense expression).
  tol = 1e-5 * ((q.astype(np.float64) ** 2).sum(1) + (b**2).sum(1).max()) + 1e-6
  rows = np.arange(len(q))
  assert idx.dtype == np.int32 and dist.dtype == np.float32
  np.testing.assert_array_less(full[rows, idx], best + 2 * tol + 1e-12)
  np.testing.assert_array_less(np.abs(dist - best), 2 * tol + 1e-12)
  # Where the nearest row is clear by more than rounding, it is that row.
  second = np.partition(full, 1, axis=1)[:, 1] if b.shape[0] > 1 else best + 1
  clear = second - best > 4 * tol
  np.testing.assert_array_equal(idx[clear], full.argmin(1)[clear])
  # Exact duplicates of the winning row: the lowest index wins.
  first = {}
  for i, row in enumerate(map(bytes, b)):
    first.setdefault(row, i)
  assert all(first[bytes(b[i])] == i for i in idx)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "kind", ["gauss", "clustered", "duplicates", "grid", "offset", "lowrank"]
)
def test_matches_float64_bruteforce(seed, kind):
  rng = np.random.default_rng(seed + 100 * len(kind))
  m = int(rng.integers(1, 900))
  d = int(rng.integers(1, 80))
  n = int(rng.integers(1, 300))
  # Queries: fresh points of the same draw (same clusters), and some bank
  # rows themselves.
  pts = _testutil.points(rng, kind, m + n, d).astype(np.float32)
  b, q = pts[:m], pts[m:]
  q[: n // 4] = b[rng.integers(0, m, n // 4)]
  index = knn_pruned.build_index(
      b,
      proj_dim=int(rng.integers(1, 12)),
      leaf=int(rng.integers(1, 64)),
  )
  dist, idx = knn_pruned.nearest(index, q, block_q=int(rng.integers(1, 128)))
  _check(q, b, dist, idx)


@pytest.mark.parametrize("seed", range(3))
def test_matches_dense_knn(seed):
  rng = np.random.default_rng(seed)
  m, d, n = int(rng.integers(200, 2000)), int(rng.integers(16, 200)), 257
  pts = _testutil.points(rng, "clustered", m + n, d).astype(np.float32)
  b, q = pts[:m], pts[m:]
  dist, idx = knn_pruned.nearest(knn_pruned.build_index(b, proj_dim=8), q)
  ref_d, ref_i = knn.knn(q, b, k=1)
  _check(q, b, dist, idx)
  # The same row as the dense search wherever the nearest is clear by more
  # than rounding (both round ||q||^2 - 2 q.b + ||b||^2 in float32).
  full = _brute(q, b)
  two = np.partition(full, 1, axis=1)[:, :2]
  scale = (q.astype(np.float64) ** 2).sum(1) + (b**2).sum(1).max()
  clear = two[:, 1] - two[:, 0] > 4e-5 * scale
  assert clear.sum() > 50
  np.testing.assert_array_equal(idx[clear], np.asarray(ref_i)[clear, 0])
  # Cancellation error scales with the norms (queries sit next to rows).
  np.testing.assert_array_less(
      np.abs(dist - np.asarray(ref_d)[:, 0]), 1e-5 * scale + 1e-6
  )


def test_prunes_most_tiles_on_clustered_banks(monkeypatch):
  """Exactness is not bought by computing everything."""
  rng = np.random.default_rng(0)
  b = _testutil.points(rng, "clustered", 4000, 256).astype(np.float32)
  q = b[rng.integers(0, 4000, 500)] + 0.01
  index = knn_pruned.build_index(b, proj_dim=16, leaf=64)
  pairs = []
  real = knn_pruned._exact  # pylint: disable=protected-access

  def counting(index, tile, q, qq, rows, best_d, best_i):
    pairs.append(len(rows))
    return real(index, tile, q, qq, rows, best_d, best_i)

  monkeypatch.setattr(knn_pruned, "_exact", counting)
  dist, idx = knn_pruned.nearest(index, q)
  _check(q, b, dist, idx)
  assert sum(pairs) < 0.25 * len(q) * index.num_tiles


def test_edges():
  b = np.arange(12, dtype=np.float32).reshape(4, 3)
  index = knn_pruned.build_index(b)
  d, i = knn_pruned.nearest(index, np.zeros((0, 3), np.float32))
  assert d.shape == (0,) and i.shape == (0,)
  d, i = knn_pruned.nearest(index, b[::-1])
  np.testing.assert_array_equal(i, [3, 2, 1, 0])
  np.testing.assert_array_equal(d, 0.0)
  one = knn_pruned.build_index(np.ones((1, 5), np.float32))
  d, i = knn_pruned.nearest(one, np.zeros((2, 5), np.float32))
  np.testing.assert_array_equal(i, [0, 0])
  np.testing.assert_allclose(d, 5.0)


def test_errors():
  with pytest.raises(ValueError, match=r"shape \(M>0, D\)"):
    knn_pruned.build_index(np.zeros((0, 4), np.float32))
  with pytest.raises(ValueError, match="non-finite"):
    knn_pruned.build_index(np.full((3, 2), np.nan, np.float32))
  with pytest.raises(ValueError, match="proj_dim=0"):
    knn_pruned.build_index(np.ones((3, 2), np.float32), proj_dim=0)
  index = knn_pruned.build_index(np.ones((3, 2), np.float32))
  with pytest.raises(ValueError, match=r"shape \(N, 2\), got \(4, 3\)"):
    knn_pruned.nearest(index, np.ones((4, 3), np.float32))


def test_cached_index_follows_the_array():
  b = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  first = knn_pruned.cached_index(b)
  assert knn_pruned.cached_index(b) is first
  other = b.copy()
  assert knn_pruned.cached_index(other) is not first
  cache = knn_pruned._CACHE  # pylint: disable=protected-access
  before = len(cache)
  del other
  gc.collect()
  assert len(cache) == before - 1


def test_unstructured_features_fall_back_to_the_dense_search(monkeypatch):
  """Isotropic noise defeats the bound: later blocks skip it, same answer."""
  rng = np.random.default_rng(3)
  b = rng.normal(size=(600, 96)).astype(np.float32)
  q = rng.normal(size=(200, 96)).astype(np.float32)
  index = knn_pruned.build_index(b, proj_dim=4, leaf=32)
  modes = []
  real = knn_pruned._search  # pylint: disable=protected-access

  def recording(index, q, prune):
    modes.append(prune)
    return real(index, q, prune)

  monkeypatch.setattr(knn_pruned, "_search", recording)
  monkeypatch.setattr(knn_pruned, "_RETRY", 4)
  dist, idx = knn_pruned.nearest(index, q, block_q=40)  # 5 blocks
  _check(q, b, dist, idx)
  # Pruned first; dense after; the bound retried at the 4th block.
  assert modes == [True, False, False, True, False]
  # pylint: disable-next=protected-access
  assert index.stats["survivors"] > knn_pruned._DENSE_ABOVE
