"""kernels.lof against sklearn's LocalOutlierFactor and the jnp reference."""
import warnings

import numpy as np
import pytest
from sklearn.neighbors import LocalOutlierFactor

from softpatch_jax import kernels


def _sklearn_lof(x, k):
  out = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for p in range(x.shape[0]):
      clf = LocalOutlierFactor(n_neighbors=k).fit(x[p])
      out.append(-clf.negative_outlier_factor_)
  return np.stack(out).astype(np.float32)


def _with_duplicates(rng, x, n_groups, max_size):
  """Copies random points over others, per position (groups up to max_size)."""
  p, n, _ = x.shape
  for q in range(p):
    for _ in range(n_groups):
      size = int(rng.integers(2, max_size + 1))
      idx = rng.choice(n, size=min(size, n), replace=False)
      x[q, idx[1:]] = x[q, idx[0]]
  return x


def _check(got, want):
  got = np.asarray(got)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


CASES = [  # (P, N, D, k, duplicate groups, max group size)
    (3, 30, 20, 5, 0, 0),
    (4, 57, 17, 6, 3, 3),
    (2, 40, 24, 3, 2, 9),      # duplicate groups larger than k + 1
    (3, 7, 18, 6, 0, 0),       # k == N - 1
    (2, 6, 16, 10, 1, 2),      # k > N: clamped to N - 1
    (2, 2, 16, 1, 0, 0),       # smallest valid N
    (2, 25, 3, 4, 0, 0),       # low D: sklearn uses a k-d tree
    (1, 120, 64, 6, 6, 4),
]


def _case(seed, p, n, d, k, groups, size):
  """Random (p, n, d) data, optionally with duplicate groups, and sklearn's LOF."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(p, n, d)).astype(np.float32)
  if groups:
    x = _with_duplicates(rng, x, groups, size)
  return x, _sklearn_lof(x, k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p,n,d,k,groups,size", CASES)
def test_xla_and_reference_match_sklearn(seed, p, n, d, k, groups, size):
  x, want = _case(seed, p, n, d, k, groups, size)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _check(kernels.lof(x, k, impl="xla", chunk=2), want)
    _check(kernels.lof_reference(x, k), want)


@pytest.mark.parametrize("p,n,d,k,groups,size", [
    (2, 12, 16, 3, 1, 5),
    (3, 9, 8, 8, 1, 2),
    (1, 5, 4, 2, 0, 0),
])
def test_pallas_interpret_matches_sklearn(p, n, d, k, groups, size):
  x, want = _case(n, p, n, d, k, groups, size)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _check(kernels.lof(x, k, impl="pallas_interpret"), want)


def test_all_points_identical():
  x = np.ones((2, 10, 20), np.float32)
  want = _sklearn_lof(x, 3)
  _check(kernels.lof(x, 3), want)
  np.testing.assert_allclose(np.asarray(kernels.lof(x, 3)), 1.0)


def test_lattice_ties_follow_index_order():
  # Small-integer coordinates: many exactly tied distances between
  # *different* points. Our paths keep the lowest-index members of a tie;
  # sklearn's heap keeps an arrival-order-dependent subset, so only the
  # paths are compared with each other here (see kernels/lof.py).
  rng = np.random.default_rng(4)
  x = rng.integers(0, 3, size=(3, 20, 16)).astype(np.float32)
  want = np.asarray(kernels.lof_reference(x, 5))
  _check(kernels.lof(x, 5, impl="xla"), want)
  _check(kernels.lof(x[:1, :12], 5, impl="pallas_interpret"),
         np.asarray(kernels.lof_reference(x[:1, :12], 5)))


def test_warning_and_errors():
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  with pytest.warns(UserWarning, match="n_neighbors"):
    kernels.lof(x, 9)
  with pytest.raises(ValueError, match="at least 2 points"):
    kernels.lof(x[:, :1], 1)
  with pytest.raises(ValueError, match="rank 3"):
    kernels.lof(x[0], 2)
  with pytest.raises(ValueError, match="k must be"):
    kernels.lof(x, 0)


@pytest.mark.parametrize("p,chunk", [(70, 16), (33, 16), (48, 8)])
def test_positions_split_over_threads_is_bit_identical(p, chunk):
  # The CPU path runs slices of positions in parallel threads; the result
  # must not depend on the split.
  import importlib  # pylint: disable=g-import-not-at-top
  lof_mod = importlib.import_module("softpatch_jax.kernels.lof")
  rng = np.random.default_rng(p)
  x = rng.normal(size=(p, 12, 5)).astype(np.float32)
  whole = np.asarray(lof_mod._lof_xla(x, 4, chunk, 4))
  split = np.asarray(lof_mod._lof_xla_threaded(x, 4, chunk, 4))
  np.testing.assert_array_equal(split, whole)
  np.testing.assert_allclose(split, _sklearn_lof(x, 4), rtol=1e-5, atol=1e-5)
