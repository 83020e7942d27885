"""kernels.lof against sklearn's LocalOutlierFactor and the jnp reference."""

import warnings

import jax
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import lof
from softpatch_jax.kernels import lof_pallas


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


BACKENDS = ["triton", "mosaic_tpu"]

PALLAS_CASES = [  # (P, N, D, k, duplicate groups, max size, block_r)
    (2, 12, 16, 3, 1, 5, None),
    (3, 9, 8, 8, 1, 2, None),  # k == N - 1
    (1, 5, 4, 2, 0, 0, None),
    (2, 2, 16, 1, 0, 0, None),  # smallest valid N
    (2, 21, 13, 4, 2, 6, 8),  # tiles of 8 rows, the last one partial
    (1, 40, 24, 6, 3, 9, 16),  # duplicate groups larger than k + 1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,n,d,k,groups,size,block_r", PALLAS_CASES)
def test_pallas_designs_match_sklearn(
    backend, p, n, d, k, groups, size, block_r
):
  # Both kernel designs, run by the interpreter; block_r forces several row
  # tiles per position, N and D are not multiples of any block.
  x, want = _case(n + d, p, n, d, k, groups, size)
  keff = lof.effective_k(k, n)
  got = lof_pallas.lof_pallas(
      x, keff, backend=backend, interpret=True, block_r=block_r
  )
  _check(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_neighbours_follow_index_order_on_ties(backend):
  # Small-integer coordinates tie many distances exactly; the kernel lists
  # the same (distance, index)-ordered neighbours as the reference sort,
  # and duplicates are exactly 0 apart. Odd N and D, two row tiles.
  rng = np.random.default_rng(7)
  x = rng.integers(0, 3, size=(2, 19, 6)).astype(np.float32)
  x[:, 5] = x[:, 11]
  nd, nbr = lof_pallas.neighbours_pallas(
      x, 5, backend=backend, interpret=True, block_r=8
  )
  diff = x[:, :, None, :] - x[:, None, :, :]
  d = np.sqrt(np.sum(diff * diff, axis=-1, dtype=np.float32))
  d[:, np.arange(19), np.arange(19)] = np.inf
  order = np.lexsort((np.broadcast_to(np.arange(19), d.shape), d), axis=-1)
  np.testing.assert_array_equal(np.asarray(nbr), order[..., :5])
  np.testing.assert_array_equal(
      np.asarray(nd), np.take_along_axis(d, order[..., :5], axis=-1)
  )
  np.testing.assert_array_equal(np.asarray(nd)[:, 5, 0], 0.0)  # a duplicate
  _check(
      lof_pallas.lof_pallas(x, 5, backend=backend, interpret=True),
      np.asarray(lof.lof_reference(x, 5)),
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_all_points_identical(backend):
  x = np.ones((2, 10, 20), np.float32)
  got = lof_pallas.lof_pallas(x, 3, backend=backend, interpret=True)
  _check(got, _testutil.sklearn_lof(x, 3))
  np.testing.assert_array_equal(np.asarray(got), 1.0)


@pytest.mark.parametrize("forced", BACKENDS)
def test_pallas_interpret_impl_uses_the_selected_design(forced, monkeypatch):
  # impl='pallas_interpret' interprets the design of the current backend:
  # Triton on a CPU unless SOFTPATCH_JAX_PALLAS_BACKEND says otherwise.
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", forced)
  seen = []
  real = lof_pallas.lof_pallas

  def spy(*args, **kwargs):
    seen.append((kwargs["backend"], kwargs["interpret"]))
    return real(*args, **kwargs)

  monkeypatch.setattr(lof_pallas, "lof_pallas", spy)
  x, want = _case(3, 2, 12, 16, 3, 1, 5)
  _check(lof.lof(x, 3, impl="pallas_interpret"), want)
  assert seen == [(forced, True)]


@pytest.mark.parametrize("n", [132, 230, 231])
def test_pallas_plans_fit_on_chip_memory(n):
  # The pipeline's positions (D = 128, k = 6): a few tiles of (block_r, N')
  # on a GPU, one position's points plus (N8, 1) columns on a TPU.
  tri = lof_pallas.plan(n, 128, 6, "triton")
  assert (tri.block_r, tri.n_pad, tri.k_pad, tri.num_warps) == (16, 256, 8, 4)
  assert tri.n_rows % tri.block_r == 0 and tri.n_rows >= n
  assert 0 < tri.nbytes <= dispatch.GPU_SMEM_BYTES // 3
  tpu = lof_pallas.plan(n, 128, 6, "mosaic_tpu")
  assert tpu.block_r % 8 == 0 and tpu.k_pad == 128
  assert tpu.n_pad == -(-n // 8) * 8 and tpu.n_rows % tpu.block_r == 0
  assert 0 < tpu.nbytes <= dispatch.TPU_VMEM_BYTES // 8
  # Larger N: the Triton row tile shrinks to keep the tile in registers.
  big = lof_pallas.plan(4000, 128, 6, "triton")
  assert big.block_r * big.n_pad <= 4096 and big.n_pad == 4096


def test_pallas_budget_and_argument_errors():
  x = np.zeros((1, 5000, 128), np.float32)
  with pytest.raises(ValueError, match="kernels.lof.*VMEM"):
    lof_pallas.lof_pallas(x, 6, backend="mosaic_tpu")
  with pytest.raises(ValueError, match="shared memory"):
    lof_pallas.lof_pallas(x, 6, backend="triton", block_r=64)
  with pytest.raises(ValueError, match="power of 2"):
    lof_pallas.plan(100, 16, 3, "triton", block_r=12)
  with pytest.raises(ValueError, match="1 <= k < N"):
    lof_pallas.lof_pallas(x[:, :5], 5, interpret=True)


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
