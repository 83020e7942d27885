"""kernels.knn: XLA and Pallas (interpret) paths against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unittest import mock

from softpatch_jax import parallel
from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import knn
from softpatch_jax.kernels import knn_pallas

BACKENDS = dispatch.PALLAS_BACKENDS


def _np_knn(q, b, k):
  q = q.astype(np.float64)
  b = b.astype(np.float64)
  d = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, idx, 1), idx


def _check_against(ref, out, q, b):
  rd, ri = map(np.asarray, ref)
  od, oi = map(np.asarray, out)
  assert od.dtype == np.float32 and oi.dtype == np.int32
  np.testing.assert_allclose(od, rd, rtol=1e-5, atol=1e-4)
  assert np.all(np.diff(od, axis=1) >= 0)
  # Indices must agree except between neighbours tied to rounding.
  diff = oi != ri
  if diff.any():
    exact = (
        (q[:, None, :].astype(np.float64) - b[oi].astype(np.float64)) ** 2
    ).sum(-1)
    np.testing.assert_allclose(exact[diff], rd[diff], rtol=1e-5, atol=1e-4)


CASES = [  # (M, N, D, k, block_q, block_n)
    (1, 1, 3, 1, None, None),
    (37, 53, 20, 1, 16, 16),
    (64, 40, 7, 3, 32, 8),
    (9, 5, 4, 5, 8, 8),  # k == N
    (100, 130, 33, 4, None, 64),
    (50, 300, 16, 2, 24, 128),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("m,n,d,k,bq,bn", CASES)
def test_xla_matches_reference(seed, m, n, d, k, bq, bn):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(m, d)).astype(np.float32)
  b = rng.normal(size=(n, d)).astype(np.float32)
  ref = knn.knn_reference(q, b, k)
  out = knn.knn(q, b, k, block_q=bq, block_n=bn, impl="xla")
  _check_against(ref, out, q, b)
  nd, _ = _np_knn(q, b, k)
  np.testing.assert_allclose(np.asarray(ref[0]), nd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "m,n,d,k,bq,bn",
    [(13, 29, 6, 1, 8, 16), (20, 9, 5, 3, 16, 8), (5, 5, 3, 5, None, None)],
)
def test_pallas_interpret_matches_reference(m, n, d, k, bq, bn):
  rng = np.random.default_rng(m * n)
  q = rng.normal(size=(m, d)).astype(np.float32)
  b = rng.normal(size=(n, d)).astype(np.float32)
  ref = knn.knn_reference(q, b, k)
  out = knn.knn(q, b, k, block_q=bq, block_n=bn, impl="pallas_interpret")
  _check_against(ref, out, q, b)


# (M, N, D, k, block_q, block_n, block_d): sizes off the block multiples,
# several bank tiles and feature chunks, k == N, tiny inputs.
DESIGN_CASES = [
    (1, 1, 3, 1, None, None, None),
    (37, 53, 20, 1, 16, 16, 16),  # 2 feature chunks (Triton)
    (20, 9, 5, 3, 16, 16, None),
    (9, 5, 4, 5, None, None, None),  # k == N
    (70, 300, 40, 7, 16, 16, 32),  # D = 40 padded to 64 (Triton)
    (33, 150, 200, 2, 8, None, 128),  # 2 feature chunks (TPU), 2 bank tiles
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("m,n,d,k,bq,bn,bd", DESIGN_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_designs_match_reference(backend, m, n, d, k, bq, bn, bd, seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(m, d)).astype(np.float32)
  b = rng.normal(size=(n, d)).astype(np.float32)
  out = knn_pallas.knn_pallas(
      q,
      b,
      k,
      blocks=knn_pallas.Blocks(bq, bn, bd),
      backend=backend,
      interpret=True,
  )
  _check_against(knn.knn_reference(q, b, k), out, q, b)


@pytest.mark.parametrize("n,k", [(45, 20), (18, 18)])  # k > block_n; k == N
@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_k_larger_than_bank_tile(backend, n, k):
  # The interpreter does not enforce Mosaic's (8, 128) tiling, so a
  # 16-row bank tile exercises the TPU design's merge across tiles too.
  rng = np.random.default_rng(7)
  q = rng.normal(size=(11, 24)).astype(np.float32)
  b = rng.normal(size=(n, 24)).astype(np.float32)
  kp = 32 if backend == "triton" else 128
  p = knn_pallas.Plan(backend, 16, 16, 16, kp, 1)
  out = knn_pallas._knn_pallas(q, b, k, p, True, None)
  _check_against(knn.knn_reference(q, b, k), out, q, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_designs_exact_ties(backend):
  # Small integers: every distance is exact in f32, so ties are real;
  # duplicates straddle bank tiles and whole rows of distances tie.
  rng = np.random.default_rng(11)
  b = rng.integers(-1, 2, size=(40, 5)).astype(np.float32)
  b[30:] = 0.0
  b[[3, 19, 20, 37]] = b[5]
  q = np.concatenate(
      [b[[5, 3, 30]], np.zeros((2, 5)), rng.integers(-1, 2, size=(12, 5))]
  ).astype(np.float32)
  for k in (1, 4, 9):
    d, i = knn_pallas.knn_pallas(
        q,
        b,
        k,
        blocks=knn_pallas.Blocks(16, 16),
        backend=backend,
        interpret=True,
    )
    nd, ni = _np_knn(q, b, k)
    np.testing.assert_array_equal(np.asarray(d), nd)
    np.testing.assert_array_equal(np.asarray(i), ni)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_designs_bf16_refined(backend):
  rng = np.random.default_rng(5)
  q = rng.normal(size=(20, 64)).astype(np.float32)
  b = rng.normal(size=(40, 64)).astype(np.float32)
  d, i = map(
      np.asarray,
      knn_pallas.knn_pallas(
          q, b, 2, backend=backend, interpret=True, compute_dtype=jnp.bfloat16
      ),
  )
  _, i2 = knn.knn(q, b, 2, impl="xla", compute_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(i, np.asarray(i2))
  exact = ((q[:, None, :].astype(np.float64) - b[i]) ** 2).sum(-1)
  np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "m,n,d,k", [(1, 1, 1, 1), (333, 777, 128, 5), (87808, 18110, 1024, 1)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_blocks_are_legal_and_fit(backend, m, n, d, k):
  p = knn_pallas.plan(m, n, d, k, backend)
  if backend == "triton":
    for size in (p.block_q, p.block_n, p.block_d):
      assert size >= 16 and size & (size - 1) == 0, p
    assert p.kp == dispatch.next_pow2(k)
    assert 0 < p.nbytes <= dispatch.GPU_SMEM_BYTES
  else:
    assert p.block_q % 8 == 0 and p.block_n % 128 == 0, p
    assert p.block_d % 128 == 0 and p.kp % 128 == 0, p
    assert 0 < p.nbytes <= dispatch.TPU_VMEM_BYTES
  # The tiles are independent of d (parallel.knn_blocks relies on it).
  other = knn_pallas.plan(m, n, 7, k, backend)
  assert (other.block_q, other.block_n) == (p.block_q, p.block_n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_budget_blocks_are_refused(backend):
  q = np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match="kernels.knn: block configuration"):
    knn_pallas.knn_pallas(
        q,
        q,
        1,
        blocks=knn_pallas.Blocks(2048, 2048, 1024),
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_knn_blocks_mirror_the_plan(backend, monkeypatch):
  monkeypatch.setenv("SOFTPATCH_JAX_IMPL", "pallas_interpret")
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", backend)
  for q, n in ((5, 3), (784, 132), (87808, 18110)):
    p = knn_pallas.plan(q, n, 1024, 1, backend)
    assert parallel.knn_blocks(q, n) == (
        p.block_q,
        p.block_n,
        "pallas_interpret",
    )


def test_pallas_interpret_follows_the_backend_override(monkeypatch):
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", "mosaic_tpu")
  rng = np.random.default_rng(2)
  q = rng.normal(size=(6, 5)).astype(np.float32)
  b = rng.normal(size=(9, 5)).astype(np.float32)
  with mock.patch.object(
      knn.knn_pallas, "knn_pallas", wraps=knn_pallas.knn_pallas
  ) as spy:
    out = knn.knn(q, b, 2, impl="pallas_interpret")
  assert spy.call_args.kwargs["backend"] == "mosaic_tpu"
  assert spy.call_args.kwargs["interpret"] is True
  _check_against(knn.knn_reference(q, b, 2), out, q, b)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret", "reference"])
def test_duplicates_break_ties_to_lowest_index(impl):
  rng = np.random.default_rng(3)
  # Small integers: every distance is exact in f32, so ties are real.
  b = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)
  b[17] = b[4]
  b[9] = b[4]
  q = np.concatenate([b[[4, 9, 17]], rng.integers(-2, 3, size=(10, 4))]).astype(
      np.float32
  )
  d, i = knn.knn(q, b, 3, block_q=8, block_n=8, impl=impl)
  nd, ni = _np_knn(q, b, 3)
  np.testing.assert_array_equal(np.asarray(d), nd)
  np.testing.assert_array_equal(np.asarray(i), ni)
  np.testing.assert_array_equal(np.asarray(i)[:3], [[4, 9, 17]] * 3)


def test_bf16_inputs_refined_distances():
  rng = np.random.default_rng(5)
  q = rng.normal(size=(200, 64)).astype(np.float32)
  b = rng.normal(size=(300, 64)).astype(np.float32)
  ref_d, ref_i = map(np.asarray, knn.knn_reference(q, b, 2))
  d, i = map(
      np.asarray, knn.knn(q, b, 2, impl="xla", compute_dtype=jnp.bfloat16)
  )
  # Returned distances are exact f32 distances of the returned indices.
  exact = ((q[:, None, :].astype(np.float64) - b[i]) ** 2).sum(-1)
  np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-3)
  assert (i[:, 0] == ref_i[:, 0]).mean() > 0.9
  assert np.all(d[:, 0] >= ref_d[:, 0] - 1e-3)
  dp, ip = map(
      np.asarray,
      knn.knn(
          q[:20], b[:40], 2, impl="pallas_interpret", compute_dtype=jnp.bfloat16
      ),
  )
  d2, i2 = map(
      np.asarray,
      knn.knn(q[:20], b[:40], 2, impl="xla", compute_dtype=jnp.bfloat16),
  )
  np.testing.assert_array_equal(ip, i2)


def test_default_dispatch_and_errors():
  q = np.ones((4, 3), np.float32)
  b = np.zeros((2, 3), np.float32)
  d, i = knn.knn(q, b)
  assert d.shape == (4, 1) and i.shape == (4, 1)
  np.testing.assert_allclose(np.asarray(d), 3.0)
  with pytest.raises(ValueError, match="exceeds the bank size"):
    knn.knn(q, b, k=3)
  with pytest.raises(ValueError, match="feature dims"):
    knn.knn(q, np.zeros((5, 2), np.float32))
  with pytest.raises(ValueError, match="impl"):
    knn.knn(q, b, impl="cuda")
  with pytest.raises(ValueError, match="rank 2"):
    knn.knn(q[None], b)


def test_impl_can_be_forced_by_environment(monkeypatch):
  monkeypatch.setenv("SOFTPATCH_JAX_IMPL", "reference")
  assert dispatch.resolve_impl(None, "knn") == "reference"
  assert dispatch.resolve_impl("xla", "knn") == "xla"  # explicit wins
  monkeypatch.setenv("SOFTPATCH_JAX_IMPL", "cuda")
  with pytest.raises(ValueError, match="SOFTPATCH_JAX_IMPL"):
    dispatch.resolve_impl(None, "knn")
  monkeypatch.delenv("SOFTPATCH_JAX_IMPL")
  assert dispatch.resolve_impl(None, "knn") == (
      "xla" if jax.default_backend() == "cpu" else "pallas"
  )
