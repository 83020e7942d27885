"""kernels.lof against sklearn's LocalOutlierFactor and the jnp reference."""

import warnings

import jax
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import lof


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
    (2, 40, 24, 3, 2, 9),  # duplicate groups larger than k + 1
    (3, 7, 18, 6, 0, 0),  # k == N - 1
    (2, 6, 16, 10, 1, 2),  # k > N: clamped to N - 1
    (2, 2, 16, 1, 0, 0),  # smallest valid N
    (2, 25, 3, 4, 0, 0),  # low D: sklearn uses a k-d tree
    (1, 120, 64, 6, 6, 4),
]


def _case(seed, p, n, d, k, groups, size):
  """Random (p, n, d) data, maybe with duplicate groups, and sklearn's LOF."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(p, n, d)).astype(np.float32)
  if groups:
    x = _with_duplicates(rng, x, groups, size)
  return x, _testutil.sklearn_lof(x, k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p,n,d,k,groups,size", CASES)
def test_xla_and_reference_match_sklearn(seed, p, n, d, k, groups, size):
  x, want = _case(seed, p, n, d, k, groups, size)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _check(lof.lof(x, k, impl="xla", chunk=2), want)
    _check(lof.lof_reference(x, k), want)


@pytest.mark.parametrize(
    "p,n,d,k,groups,size",
    [
        (2, 12, 16, 3, 1, 5),
        (3, 9, 8, 8, 1, 2),
        (1, 5, 4, 2, 0, 0),
    ],
)
def test_pallas_interpret_matches_sklearn(p, n, d, k, groups, size):
  x, want = _case(n, p, n, d, k, groups, size)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _check(lof.lof(x, k, impl="pallas_interpret"), want)


def test_all_points_identical():
  x = np.ones((2, 10, 20), np.float32)
  want = _testutil.sklearn_lof(x, 3)
  _check(lof.lof(x, 3), want)
  np.testing.assert_allclose(np.asarray(lof.lof(x, 3)), 1.0)


def test_lattice_ties_follow_index_order():
  # Small-integer coordinates: many exactly tied distances between
  # *different* points. Our paths keep the lowest-index members of a tie;
  # sklearn's heap keeps an arrival-order-dependent subset, so only the
  # paths are compared with each other here (see kernels/lof.py).
  rng = np.random.default_rng(4)
  x = rng.integers(0, 3, size=(3, 20, 16)).astype(np.float32)
  want = np.asarray(lof.lof_reference(x, 5))
  _check(lof.lof(x, 5, impl="xla"), want)
  _check(
      lof.lof(x[:1, :12], 5, impl="pallas_interpret"),
      np.asarray(lof.lof_reference(x[:1, :12], 5)),
  )


def test_warning_and_errors():
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  with pytest.warns(UserWarning, match="n_neighbors"):
    lof.lof(x, 9)
  with pytest.raises(ValueError, match="at least 2 points"):
    lof.lof(x[:, :1], 1)
  with pytest.raises(ValueError, match="rank 3"):
    lof.lof(x[0], 2)
  with pytest.raises(ValueError, match="k must be"):
    lof.lof(x, 0)


@pytest.mark.parametrize("p,chunk", [(70, 16), (33, 16), (48, 8)])
def test_positions_split_over_threads_is_bit_identical(p, chunk):
  # The CPU path runs slices of positions in parallel threads; the result
  # must not depend on the split.
  rng = np.random.default_rng(p)
  x = rng.normal(size=(p, 12, 5)).astype(np.float32)
  whole = np.asarray(lof._lof_xla(x, 4, chunk, 4))  # pylint: disable=protected-access
  split = np.asarray(lof._lof_xla_threaded(x, 4, chunk, 4))  # pylint: disable=protected-access
  np.testing.assert_array_equal(split, whole)
  np.testing.assert_allclose(
      split, _testutil.sklearn_lof(x, 4), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("p", [5, 40])
def test_traceable_under_jit_and_vmap(p):
  # Tracers cannot be split over host threads: under jit the positions stay
  # in one traced call, which must give the eager result exactly (p=40 is
  # split over threads eagerly on a multi-core CPU).
  x = np.random.default_rng(p).normal(size=(p, 12, 6)).astype(np.float32)
  eager = np.asarray(lof.lof(x, 5))
  jitted = np.asarray(jax.jit(lambda x: lof.lof(x, 5))(x))
  np.testing.assert_array_equal(jitted, eager)
  batched = np.asarray(jax.vmap(lambda x: lof.lof(x, 5))(x[None]))
  np.testing.assert_allclose(batched[0], eager, rtol=1e-6, atol=1e-6)
