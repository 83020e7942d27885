"""Pallas kernels for blocked squared-L2 kNN, one design per backend.

Both designs compute, for a tile of queries, (query, bank) distance tiles
``||q||^2 - 2 q.b + ||b||^2`` (clamped at 0; README, "Kernels") and merge
each tile into a running top-k that is k rounds of "take the minimum, the
lowest bank index among equals", written with min/where only (no sort, no
top_k, no concatenate) so that it lowers on Triton and on Mosaic TPU. No
distance tile outlives its merge; the full M x N matrix never exists.

* ``triton`` (GPUs): the grid is the query tiles only, since Triton runs
  grid programs in parallel, in any order. Each program loops over the
  bank tiles, and inside that over chunks of the feature dimension, with
  ``lax.fori_loop``, so that only (block_q + block_n) x block_d operand
  tiles pass through shared memory. The running top-k is a loop-carried
  (block_q, kp) value written once at the end.
* ``mosaic_tpu`` (TPUs): grid = (query tiles "parallel", bank tiles
  "arbitrary", feature chunks "arbitrary"). The dot accumulates in a VMEM
  scratch tile over the feature chunks; after the last chunk the tile is
  merged into the running top-k held in the (block_q, 128) output blocks,
  which stay resident while the sequential bank axis revisits them.

Rows are padded outside the kernels: padded bank rows get a +inf norm, so
their distance is +inf and they never beat a real row; the feature
dimension is padded with zeros, which adds nothing to any dot product.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import knn_common

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max
_HIGHEST = jax.lax.Precision.HIGHEST
_DOT_DIMS = (((1,), (1,)), ((), ()))

# Triton launch parameters; `plan` budgets shared memory for them.
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 3
# Triton's dot needs every dimension >= 16.
_TRITON_MIN = 16
# Mosaic TPU: feature chunks up to this many lanes per grid step.
_TPU_MAX_BLOCK_D = 1024
_LANES = 128
# Merge rounds up to this k are unrolled.
_UNROLL_K = 8


class Plan(NamedTuple):
  """Block sizes of one kNN kernel launch and their on-chip memory bytes."""

  backend: str
  block_q: int  # query rows per tile (per grid program on Triton)
  block_n: int  # bank rows per tile
  block_d: int  # feature columns per chunk of the dot
  kp: int  # width of the running top-k / output block
  nbytes: int  # static on-chip memory estimate (see `plan`)


def _triton_block_d(d: int) -> int:
  # 32 unless 16 pads the feature dimension less (e.g. d = 7 or 40).
  return min((32, 16), key=lambda c: (dispatch.round_up(d, c), -c))


class Blocks(NamedTuple):
  """Explicit tile sizes of a kNN launch (None: `plan`'s choice)."""

  block_q: int | None = None
  block_n: int | None = None
  block_d: int | None = None


def _triton_plan(m, n, d, k, blocks: Blocks, itemsize: int) -> Plan:
  pow2 = lambda v: dispatch.next_pow2(max(int(v), _TRITON_MIN))
  bq = pow2(blocks.block_q or min(64, m))
  bn = pow2(blocks.block_n or min(128, n))
  bd = pow2(blocks.block_d or _triton_block_d(d))
  kp = dispatch.next_pow2(k)
  nbytes = (
      TRITON_NUM_STAGES * (bq + bn) * bd * itemsize
      + bq * bn * 4
      + 2 * bq * kp * 4
  )
  return Plan("triton", bq, bn, bd, kp, int(nbytes))


def _tpu_plan(m, n, d, k, blocks: Blocks, itemsize: int) -> Plan:
  bq = dispatch.round_up(blocks.block_q or min(256, m), 8)
  bn = dispatch.round_up(blocks.block_n or min(512, n), _LANES)
  if blocks.block_d:
    bd = dispatch.round_up(blocks.block_d, _LANES)
  else:
    chunks = -(-dispatch.round_up(d, _LANES) // _TPU_MAX_BLOCK_D)
    bd = dispatch.round_up(-(-d // chunks), _LANES)
  kp = dispatch.round_up(k, _LANES)
  tile = bq * bn * 4
  nbytes = (
      2 * (bq + bn) * bd * itemsize  # query and bank blocks
      + 2 * bq * _LANES * 4  # (block_q, 1) query norms
      + 2 * 8 * bn * 4  # (1, block_n) bank norms
      + 2 * 2 * bq * kp * 4  # two (block_q, kp) outputs
      + tile  # accumulator scratch
      + 4 * tile  # live intermediates
  )
  return Plan("mosaic_tpu", bq, bn, bd, kp, int(nbytes))


_PLANS = {"triton": _triton_plan, "mosaic_tpu": _tpu_plan}


def plan(
    m: int,
    n: int,
    d: int,
    k: int,
    backend: str | None = None,
    blocks: Blocks = Blocks(),
    itemsize: int = 4,
) -> Plan:
  """Block sizes for an (m, d) x (n, d) top-k search on `backend`.

  Defaults: Triton 64 x 128 tiles with 32-column feature chunks (powers of
  two, >= 16 for the dot); Mosaic TPU 256 x 512 tiles with up to 1024-lane
  feature chunks and a 128-lane top-k block. Both shrink to small inputs.
  The query and bank tile sizes depend on (m, n) only, never on d, so that
  ``parallel.knn_blocks`` (no d) can mirror them. Explicit `blocks` are
  rounded up to what the backend accepts (Triton: powers of two >= 16;
  Mosaic TPU: block_q a multiple of 8, block_n and block_d of 128).

  ``nbytes`` is a conservative static estimate of on-chip memory:
    * triton: shared memory per program: the dot operand tiles
      ``(block_q + block_n) * block_d * itemsize`` times ``num_stages``
      (software-pipelined loads), plus one f32 (block_q, block_n) tile for
      the layout conversion of the dot result before the row reductions,
      plus the two (block_q, kp) running top-k values.
    * mosaic_tpu: VMEM: 2x (double buffering) each input block (the norm
      blocks padded to the (8, 128) tile: (block_q, 1) takes 128 lanes,
      (1, block_n) 8 sublanes) and each (block_q, kp) output block, the f32
      (block_q, block_n) accumulator scratch, and four live f32
      (block_q, block_n) intermediates (dot result, distances, column
      indices, masks).
  """
  backend = dispatch.pallas_backend(backend)
  if backend not in _PLANS:
    raise ValueError(
        f"kernels.knn: backend={backend!r} is not one of "
        f"{dispatch.PALLAS_BACKENDS}"
    )
  m, n, d = max(int(m), 1), max(int(n), 1), max(int(d), 1)
  return _PLANS[backend](m, n, d, int(k), blocks, itemsize)


def _merge_topk(run_d, run_i, d, col, k):
  """k smallest of a running top-k and a distance tile, ties -> lower index.

  run_d/run_i: (rows, kp) ascending, padded with (+inf, BIG); d/col: a
  (rows, cols) tile and its bank indices. Each round takes the minimum of
  both, then the lowest index holding it, and removes that entry (distance
  +inf, index BIG) so that it cannot be picked twice. Returns (rows, kp).
  Small k is unrolled; a larger one loops, to keep the kernel code small.
  """
  slot = jax.lax.broadcasted_iota(jnp.int32, run_d.shape, 1)

  def one_round(r, carry):
    run_d, run_i, d, col, out_d, out_i = carry
    best = jnp.minimum(
        jnp.min(run_d, axis=1, keepdims=True), jnp.min(d, axis=1, keepdims=True)
    )
    sel = jnp.minimum(
        jnp.min(jnp.where(run_d == best, run_i, _BIG), axis=1, keepdims=True),
        jnp.min(jnp.where(d == best, col, _BIG), axis=1, keepdims=True),
    )
    out_d = jnp.where(slot == r, best, out_d)
    out_i = jnp.where(slot == r, sel, out_i)
    taken = run_i == sel
    run_d = jnp.where(taken, jnp.inf, run_d)
    run_i = jnp.where(taken, _BIG, run_i)
    taken = col == sel
    d = jnp.where(taken, jnp.inf, d)
    col = jnp.where(taken, _BIG, col)
    return run_d, run_i, d, col, out_d, out_i

  carry = (
      run_d,
      run_i,
      d,
      col,
      jnp.full(run_d.shape, jnp.inf, _F32),
      jnp.full(run_i.shape, _BIG, jnp.int32),
  )
  if k <= _UNROLL_K:
    for r in range(k):
      carry = one_round(r, carry)
  else:
    carry = jax.lax.fori_loop(0, k, one_round, carry)
  return carry[4], carry[5]


def _triton_kernel(
    q_ref, qq_ref, b_ref, bb_ref, d_ref, i_ref, *, k, block_n, block_d
):
  block_q, dp = q_ref.shape
  n_tiles = b_ref.shape[0] // block_n
  d_chunks = dp // block_d
  qq = qq_ref[...]  # (block_q, 1)

  def bank_tile(j, carry):
    start = pl.multiple_of(j * block_n, block_n)

    def d_chunk(c, acc):
      cs = pl.multiple_of(c * block_d, block_d)
      qc = q_ref[:, pl.ds(cs, block_d)]
      bc = b_ref[pl.ds(start, block_n), pl.ds(cs, block_d)]
      return acc + jax.lax.dot_general(
          qc, bc, _DOT_DIMS, precision=_HIGHEST, preferred_element_type=_F32
      )

    dots = jax.lax.fori_loop(
        0, d_chunks, d_chunk, jnp.zeros((block_q, block_n), _F32)
    )
    bb = bb_ref[:, pl.ds(start, block_n)]  # (1, block_n)
    dist = jnp.maximum(qq - 2.0 * dots + bb, 0.0)
    col = start + jax.lax.broadcasted_iota(jnp.int32, dist.shape, 1)
    return _merge_topk(*carry, dist, col, k)

  init = (
      jnp.full(d_ref.shape, jnp.inf, _F32),
      jnp.full(i_ref.shape, _BIG, jnp.int32),
  )
  best_d, best_i = jax.lax.fori_loop(0, n_tiles, bank_tile, init)
  d_ref[...] = best_d
  i_ref[...] = best_i


def _tpu_kernel(
    q_ref, qq_ref, b_ref, bb_ref, d_ref, i_ref, acc_ref, *, k, block_n
):
  j, c = pl.program_id(1), pl.program_id(2)

  @pl.when((j == 0) & (c == 0))
  def _init_topk():
    d_ref[...] = jnp.full(d_ref.shape, jnp.inf, _F32)
    i_ref[...] = jnp.full(i_ref.shape, _BIG, jnp.int32)

  @pl.when(c == 0)
  def _init_acc():
    acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

  acc_ref[...] += jax.lax.dot_general(
      q_ref[...],
      b_ref[...],
      _DOT_DIMS,
      precision=_HIGHEST,
      preferred_element_type=_F32,
  )

  @pl.when(c == pl.num_programs(2) - 1)
  def _merge():
    dist = jnp.maximum(qq_ref[...] - 2.0 * acc_ref[...] + bb_ref[...], 0.0)
    col = j * block_n + jax.lax.broadcasted_iota(jnp.int32, dist.shape, 1)
    d_ref[...], i_ref[...] = _merge_topk(d_ref[...], i_ref[...], dist, col, k)


def _triton_call(p: Plan, k: int, shapes, interpret: bool):
  """The Triton design's pallas_call over padded (mp, dp) x (np_, dp)."""
  (mp, np_, dp), (bq, bn, bd, kp) = shapes, p[1:5]
  kernel = functools.partial(_triton_kernel, k=k, block_n=bn, block_d=bd)
  params = plt.CompilerParams(
      num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES
  )
  out_spec = pl.BlockSpec((bq, kp), lambda i: (i, 0))
  return pl.pallas_call(
      kernel,
      grid=(mp // bq,),
      in_specs=[
          pl.BlockSpec((bq, dp), lambda i: (i, 0)),
          pl.BlockSpec((bq, 1), lambda i: (i, 0)),
          pl.BlockSpec((np_, dp), lambda i: (0, 0)),  # sliced in-kernel
          pl.BlockSpec((1, np_), lambda i: (0, 0)),
      ],
      out_specs=[out_spec, out_spec],
      out_shape=_out_shape(mp, kp),
      compiler_params=None if interpret else params,
      interpret=interpret,
  )


def _tpu_call(p: Plan, k: int, shapes, interpret: bool):
  """The Mosaic TPU design's pallas_call over padded inputs."""
  (mp, np_, dp), (bq, bn, bd, kp) = shapes, p[1:5]
  kernel = functools.partial(_tpu_kernel, k=k, block_n=bn)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary")
  )
  out_spec = pl.BlockSpec((bq, kp), lambda i, j, c: (i, 0))
  return pl.pallas_call(
      kernel,
      grid=(mp // bq, np_ // bn, dp // bd),
      in_specs=[
          pl.BlockSpec((bq, bd), lambda i, j, c: (i, c)),
          pl.BlockSpec((bq, 1), lambda i, j, c: (i, 0)),
          pl.BlockSpec((bn, bd), lambda i, j, c: (j, c)),
          pl.BlockSpec((1, bn), lambda i, j, c: (0, j)),
      ],
      out_specs=[out_spec, out_spec],
      out_shape=_out_shape(mp, kp),
      scratch_shapes=[pltpu.VMEM((bq, bn), _F32)],
      compiler_params=None if interpret else params,
      interpret=interpret,
  )


def _out_shape(mp: int, kp: int):
  return [
      jax.ShapeDtypeStruct((mp, kp), _F32),
      jax.ShapeDtypeStruct((mp, kp), jnp.int32),
  ]


@functools.partial(
    jax.jit,
    static_argnames=("k", "p", "interpret", "compute_dtype"),
)
def _knn_pallas(queries, bank, k, p, interpret, compute_dtype):
  m, dim = queries.shape
  n = bank.shape[0]
  q, b, qc, bc, qq, bb = knn_common.prep(queries, bank, compute_dtype)
  mp = dispatch.round_up(m, p.block_q)
  np_ = dispatch.round_up(n, p.block_n)
  dp = dispatch.round_up(dim, p.block_d)
  qc = jnp.pad(qc, ((0, mp - m), (0, dp - dim)))
  bc = jnp.pad(bc, ((0, np_ - n), (0, dp - dim)))
  qq = jnp.pad(qq, (0, mp - m))[:, None]
  bb = jnp.pad(bb, (0, np_ - n), constant_values=jnp.inf)[None, :]
  call = _triton_call if p.backend == "triton" else _tpu_call
  d, i = call(p, k, (mp, np_, dp), interpret)(qc, qq, bc, bb)
  d, i = d[:m, :k], i[:m, :k]
  if qc.dtype != _F32:
    d, i = knn_common.refine(q, b, d, i, k)
  return d, i


def knn_pallas(
    queries,
    bank,
    k=1,
    *,
    blocks: Blocks = Blocks(),
    backend: str | None = None,
    interpret: bool = False,
    compute_dtype=None,
):
  """Pallas kNN; same contract as ``kernels.knn``.

  Args:
    queries, bank, k, compute_dtype: as ``kernels.knn``.
    blocks: tile sizes; None entries pick ``plan``'s, explicit ones are
      rounded up to what the backend accepts (see ``plan``).
    backend: 'triton' or 'mosaic_tpu' (``dispatch.PALLAS_BACKENDS``);
      None: the design for the current jax backend.
    interpret: run that design in the Pallas interpreter (any machine).
  """
  queries, bank = knn_common.validate(queries, bank, k, "knn_pallas")
  backend = dispatch.pallas_backend(backend)
  m, dim = queries.shape
  n = bank.shape[0]
  if m == 0:
    return jnp.zeros((0, k), _F32), jnp.zeros((0, k), jnp.int32)
  cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
  if cdt is not None and cdt == jnp.dtype(_F32):
    cdt = None
  itemsize = 4 if cdt is None else cdt.itemsize
  p = plan(m, n, dim, int(k), backend, blocks, itemsize)
  if not interpret:
    dispatch.check_budget(
        "knn",
        backend,
        p.nbytes,
        f"(block_q={p.block_q}, block_n={p.block_n}, block_d={p.block_d})",
    )
  return _knn_pallas(queries, bank, int(k), p, bool(interpret), cdt)
