"""kernels.kcenter: every path against a plain numpy weighted greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import kcenter
from softpatch_jax.kernels import kcenter_pallas


def _data(seed, m, d, noise_frac, n_dup):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, d)).astype(np.float32)
  if n_dup:
    src = rng.choice(m, n_dup, replace=False)
    dst = rng.choice(m, n_dup, replace=False)
    x[dst] = x[src]
  w = None
  if noise_frac is not None:
    w = (rng.random(m) >= noise_frac).astype(np.float32)
  starts = rng.choice(m, size=min(m, 5), replace=False)
  return x, w, starts


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (0, 500, 16, 60, None, 0),
        (1, 777, 32, 100, 0.15, 20),
        (2, 300, 8, 80, 0.5, 50),
        (3, 40, 5, 40, 0.3, 5),  # selects past the clean points
        (4, 1, 3, 3, None, 0),
    ],
)
def test_xla_and_reference_match_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  for impl in ("xla", "reference"):
    got = np.asarray(kcenter.kcenter(x, n_sel, starts, w, impl=impl))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want, err_msg=impl)
  if w is not None:
    # Noise patches are never chosen while a clean point is still away
    # (n_clean - 1: duplicated clean points can reach distance 0 early).
    n_clean = int((w > 0).sum())
    assert np.all(w[got[: min(n_sel, n_clean - 1)]] > 0) or n_clean == 0


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (5, 200, 8, 12, 0.2, 10),
        (6, 70, 4, 9, None, 0),
    ],
)
def test_pallas_interpret_matches_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  got = np.asarray(
      kcenter.kcenter(x, n_sel, starts, w, impl="pallas_interpret")
  )
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (10, 200, 8, 30, 0.3, 20),
        (11, 333, 16, 50, None, 0),
        (12, 57, 3, 57, 0.5, 10),  # selects past the clean points
        (13, 90, 5, 1, 0.2, 0),
        (14, 1, 2, 2, None, 0),
    ],
)
def test_forced_first_matches_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  rng = np.random.default_rng(seed + 100)
  firsts = rng.choice(m, size=min(m, 3), replace=False).tolist()
  if w is not None and (w == 0).any():
    firsts.append(int(np.flatnonzero(w == 0)[0]))  # a zero-weight point
  for first in firsts:
    want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w, first=first)
    assert want[0] == first
    for impl in ("xla", "reference", "pallas_interpret"):
      got = np.asarray(
          kcenter.kcenter(x, n_sel, starts, w, impl=impl, first=first)
      )
      np.testing.assert_array_equal(got, want, err_msg=f"{impl} {first}")
    got = np.asarray(
        kcenter.kcenter_reference(x, n_sel, starts, w, first=first)
    )
    np.testing.assert_array_equal(got, want)


def test_forced_first_traced_and_default_unchanged():
  x, w, starts = _data(15, 150, 6, 0.2, 10)
  run = jax.jit(
      lambda f: kcenter.kcenter(x, 20, starts, w, impl="xla", first=f)
  )
  for first in (0, 7, 149):
    np.testing.assert_array_equal(
        np.asarray(run(jnp.int32(first))),
        _testutil.numpy_greedy_kcenter(x, 20, starts, w, first=first),
    )
  # first = the default first pick gives the default sequence.
  default = np.asarray(kcenter.kcenter(x, 20, starts, w))
  same = np.asarray(kcenter.kcenter(x, 20, starts, w, first=int(default[0])))
  np.testing.assert_array_equal(same, default)
  np.testing.assert_array_equal(
      default, _testutil.numpy_greedy_kcenter(x, 20, starts, w)
  )


def test_duplicates_are_not_reselected():
  x, _, starts = _data(7, 100, 6, None, 0)
  x = np.concatenate([x, x[:30]])  # 30 exact copies
  sel = np.asarray(kcenter.kcenter(x, 90, starts))
  np.testing.assert_array_equal(
      sel, _testutil.numpy_greedy_kcenter(x, 90, starts, None)
  )
  # A copy of a picked point has distance 0: never picked while others remain.
  rows = {tuple(r) for r in x[sel]}
  assert len(rows) == len(sel)


def test_bf16_storage_runs_and_mostly_agrees():
  x, w, starts = _data(8, 600, 32, 0.1, 0)
  a = np.asarray(kcenter.kcenter(x, 50, starts, w, impl="xla"))
  b = np.asarray(
      kcenter.kcenter(x, 50, starts, w, impl="xla", storage_dtype=jnp.bfloat16)
  )
  assert len(set(b.tolist())) == 50 and np.all(w[b] > 0)
  assert len(set(a.tolist()) & set(b.tolist())) >= 25


def test_errors():
  x = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="sampling_weight"):
    kcenter.kcenter(x, 2, np.array([0]), np.ones(9))
  with pytest.raises(ValueError, match="start_idx"):
    kcenter.kcenter(x, 2, np.array([], np.int32))
  with pytest.raises(ValueError, match="rank 2"):
    kcenter.kcenter(x[None], 2, np.array([0]))
  assert kcenter.kcenter(x, 0, np.array([0])).shape == (0,)
  assert kcenter.kcenter(x, 0, np.array([0]), first=3).shape == (0,)
  with pytest.raises(ValueError, match="first=10"):
    kcenter.kcenter(x, 2, np.array([0]), first=10)
  with pytest.raises(ValueError, match="first=-1"):
    kcenter.kcenter_reference(x, 2, np.array([0]), first=-1)
  with pytest.raises(ValueError, match="scalar integer"):
    kcenter.kcenter(x, 2, np.array([0]), first=np.array([1, 2]))
  with pytest.raises(ValueError, match="scalar integer"):
    kcenter.kcenter(x, 2, np.array([0]), first=1.0)


# --------------------------------------------------------------------------
# The Pallas kernel, both designs, in the Pallas interpreter.

BACKENDS = ("triton", "mosaic_tpu")


def _pallas(x, n_sel, starts, w, backend, **kw):
  m = len(x)
  w = np.ones(m, np.float32) if w is None else w
  return np.asarray(
      kcenter_pallas.kcenter_pallas(
          jnp.asarray(x, jnp.float32),
          n_sel,
          jnp.asarray(starts, jnp.int32),
          jnp.asarray(w, jnp.float32),
          backend=backend,
          interpret=True,
          **kw,
      )
  )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "seed,kind,m,d,n_sel,noise,block_m",
    [
        (20, "gauss", 300, 16, 25, None, 128),  # 3 blocks, last one partial
        (21, "clustered", 260, 13, 30, 0.2, 128),  # D not a multiple of 8
        (22, "duplicates", 200, 8, 60, 0.3, 128),  # past the distinct rows
        (23, "grid", 150, 5, 40, None, None),  # many exactly equal distances
        (24, "offset", 129, 3, 20, 0.5, 128),  # one point in the last block
        (25, "gauss", 40, 4, 40, 0.6, None),  # past the clean points
        (26, "gauss", 1, 2, 3, None, None),  # one point
        (27, "grid", 2, 1, 2, None, None),
    ],
)
def test_pallas_designs_match_numpy(
    backend, seed, kind, m, d, n_sel, noise, block_m
):
  rng = np.random.default_rng(seed)
  x = _testutil.points(rng, kind, m, d).astype(np.float32)
  w = None
  if noise is not None:
    w = (rng.random(m) >= noise).astype(np.float32)
  starts = rng.choice(m, size=min(m, 4), replace=False)
  if block_m is not None and backend == "triton":
    block_m = 128  # a power of two either way
  got = _pallas(x, n_sel, starts, w, backend, block_m=block_m)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_ties_pick_lowest_index_across_blocks(backend):
  # Equal maxima in different blocks, and all-zero weights but one point:
  # the lowest global index wins, padding points never do.
  x = np.zeros((300, 4), np.float32)
  x[[5, 140, 290], [0, 1, 2]] = 1.0  # three points at the same distance
  w = np.ones(300, np.float32)
  starts = np.array([0, 1])
  got = _pallas(x, 4, starts, w, backend, block_m=128)
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(x, 4, starts, w)
  )
  assert got.tolist()[:3] == [5, 140, 290]
  w0 = np.zeros(300, np.float32)
  w0[299] = 1.0
  got = _pallas(x, 3, starts, w0, backend, block_m=128)
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(x, 3, starts, w0)
  )
  assert np.all(got < 300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_bf16_storage_is_the_greedy_on_rounded_points(backend):
  x, w, starts = _data(30, 250, 24, 0.2, 10)
  got = _pallas(x, 20, starts, w, backend, storage_dtype=jnp.bfloat16)
  rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(rounded, 20, starts, w)
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapper_runs_the_chosen_design(backend, monkeypatch):
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", backend)
  x, w, starts = _data(31, 150, 6, 0.1, 5)
  got = kcenter.kcenter(x, 15, starts, w, impl="pallas_interpret")
  np.testing.assert_array_equal(
      np.asarray(got), _testutil.numpy_greedy_kcenter(x, 15, starts, w)
  )


def test_plan_blocks_and_budget():
  for m, d in ((103488, 128), (181104, 128), (1000, 24), (5, 3)):
    p = kcenter_pallas.plan(m, d, "triton")
    assert p.block_m & (p.block_m - 1) == 0 and p.block_m <= 1024
    assert p.d_pad % p.d_chunk == 0 and p.d_pad >= d
    assert 0 < p.nbytes <= dispatch.GPU_SMEM_BYTES
    p = kcenter_pallas.plan(m, d, "mosaic_tpu")
    assert p.block_m % 128 == 0 and p.d_pad % 8 == 0
    assert 0 < p.nbytes <= dispatch.TPU_VMEM_BYTES
  # A huge D shrinks the default block until it fits.
  p = kcenter_pallas.plan(10**6, 4096, "mosaic_tpu")
  assert p.block_m < 2048 and p.nbytes <= dispatch.TPU_VMEM_BYTES
  with pytest.raises(ValueError, match="power of two"):
    kcenter_pallas.plan(1000, 8, "triton", block_m=384)
  with pytest.raises(ValueError, match="multiple of 128"):
    kcenter_pallas.plan(1000, 8, "mosaic_tpu", block_m=64)
  x = jnp.zeros((100, 8), jnp.float32)  # 8 x 65536 f32 rows, 2 stages
  with pytest.raises(ValueError, match="kernels.kcenter.*shared memory"):
    kcenter_pallas.kcenter_pallas(
        x,
        2,
        jnp.zeros((1,), jnp.int32),
        x[:, 0],
        backend="triton",
        block_m=65536,
    )
