"""Pallas kernel for the weighted greedy k-center step.

The coreset sampler of ``kcenter.py`` (README, "Kernels and accelerators").
One ``pallas_call`` per selected point, all picks inside one
``lax.fori_loop``. x is held transposed, (D, M), so every per-point value
is a lane-dense row. The grid runs over blocks of ``block_m`` points; each
grid step owns its block: it computes the distance of its points to the new
centre, applies the sampling weight, lowers the running minimum in place
(input/output aliasing) and writes its block maximum with the first index
that attains it. The small cross-block argmax (largest value, then lowest
index) runs outside the kernel, in jnp.

The squared distance is summed over the features one after the other,
``acc + (x_k - c_k)^2`` for k = 0, 1, ..., in float32 (the coordinate
difference form of ``kcenter_common.dist_to``): a point's distance to
itself and to its exact duplicates is exactly 0, identical rows get
identical values, and the result does not depend on the block sizes, so
the sharded path (``parallel.kcenter``) gets the single-device bits. (A GPU
compiler may fuse the multiply-add, which can move a distance by an ulp
from the numpy greedy's; picks only differ where two distances do.)

Two designs:

* ``triton`` (GPU): a block of x^T is (d_pad, block_m) with block_m a power
  of two; a ``fori_loop`` over chunks of ``d_chunk`` features loads one
  (1, block_m) row per feature (coalesced), so only elementwise work and one
  (1, block_m) row reduction happen in the kernel. Per-block outputs are
  (1, 1) blocks of (nb, 1) arrays.
* ``mosaic_tpu``: blocks (d_pad, block_m) with block_m a multiple of 128;
  each loop step loads one aligned (d_chunk, block_m) tile (d_chunk = 8 f32
  sublanes, 16 for bf16) and adds its rows in order. The per-block max and
  argmax are broadcast over one (8, 128) tile each, of (nb * 8, 128)
  outputs, so every block obeys the (8, 128) rule. The grid axis is
  "parallel": the blocks are independent.

Padding points have weight 0 (so distance 0) and the highest indices, so
the first-occurrence argmax never prefers them; padding features are 0 in
x and in the centre and add exactly 0.
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
from softpatch_jax.kernels.kcenter_common import initial_distance

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max

# Default blocks: Triton, 1024 points per program (4 warps, 8 values per
# thread and feature row); Mosaic TPU, 2048 lanes (a 1 MiB f32 x block at
# D = 128, double-buffered).
_TRITON_BLOCK_M = 1024
_TPU_BLOCK_M = 2048
_TRITON_STAGES = 2


class Plan(NamedTuple):
  """Block sizes of the step kernel and its static on-chip bytes."""

  block_m: int  # points per grid step
  d_chunk: int  # features per step of the in-kernel loop
  d_pad: int  # D padded to a multiple of d_chunk (with zeros)
  num_warps: int  # triton only (0 for mosaic_tpu)
  num_stages: int  # triton only (0 for mosaic_tpu)
  nbytes: int


def _d_chunk(d: int, backend: str, itemsize: int) -> int:
  if backend == "triton":
    return min(8, dispatch.next_pow2(d))
  # One native (sublane, lane) tile: 8 rows of f32, 16 of bf16.
  return 8 * max(1, 4 // itemsize)


def _plan_blocks(block_m, d, backend, itemsize) -> Plan:
  dc = _d_chunk(d, backend, itemsize)
  dp = dispatch.round_up(d, dc)
  if backend == "triton":
    warps = max(1, min(8, block_m // 256))
    stages = _TRITON_STAGES
    # Software pipelining may stage the row loads of a loop step in shared
    # memory (num_stages copies); one f32 (1, block_m) row for a layout
    # conversion of the running minimum; cross-warp max/argmax scratch.
    nbytes = stages * dc * block_m * itemsize + block_m * 4 + 2 * 32 * warps * 4
    return Plan(block_m, dc, dp, warps, stages, nbytes)
  row = 8 * block_m * 4  # a (1, block_m) f32 block fills 8 sublanes
  nbytes = 2 * (
      dp * block_m * itemsize  # x^T block
      + 3 * row  # w, dist in, dist out
      + dispatch.round_up(dp, 8) * 128 * itemsize  # centre, lane-padded
      + 2 * 8 * 128 * 4  # block max, block argmax
  )
  # Live values: the chunk as f32, its difference and square; the running
  # sum, the new minimum, the index row and the masked indices.
  nbytes += 3 * dc * block_m * 4 + 4 * row
  return Plan(block_m, dc, dp, 0, 0, nbytes)


def plan(
    m: int,
    d: int,
    backend: str | None = None,
    *,
    block_m: int | None = None,
    itemsize: int = 4,
) -> Plan:
  """Block plan of the step kernel for M points of D features.

  `itemsize` is the bytes of one stored coordinate (4 for f32, 2 for bf16).
  ``nbytes`` is a conservative static estimate of on-chip memory:

  * triton: shared memory per program. The kernel has no dot; its loop
    loads ``d_chunk`` rows of ``block_m`` points per step, which software
    pipelining may stage in shared memory ``num_stages`` times, plus one f32
    (1, block_m) row for a layout conversion and the cross-warp scratch of
    the block max / argmax.
  * mosaic_tpu: VMEM, i.e. 2x (double buffering) every input and output
    block (a (1, n) f32 row counts as 8 sublanes, the (d_pad, 1) centre as
    128 lanes) plus the largest live values of one loop step.

  Without an explicit `block_m` the default block is halved until the
  estimate fits the backend's budget.
  """
  backend = dispatch.pallas_backend(backend)
  if backend == "triton":
    limit = dispatch.GPU_SMEM_BYTES
    fit = dispatch.next_pow2(max(m, 128))
    default, low = min(_TRITON_BLOCK_M, fit), 128
  else:
    limit = dispatch.TPU_VMEM_BYTES
    default = min(_TPU_BLOCK_M, dispatch.round_up(max(m, 1), 128))
    low = 128
  if block_m is not None:
    block_m = int(block_m)
    ok = block_m > 0 and (
        block_m & (block_m - 1) == 0
        if backend == "triton"
        else block_m % 128 == 0
    )
    if not ok:
      rule = "a power of two" if backend == "triton" else "a multiple of 128"
      raise ValueError(
          f"kernels.kcenter: block_m={block_m} must be {rule} on {backend}"
      )
    return _plan_blocks(block_m, d, backend, itemsize)
  p = _plan_blocks(default, d, backend, itemsize)
  while p.nbytes > limit and p.block_m > low:
    p = _plan_blocks(max(low, p.block_m // 2), d, backend, itemsize)
  return p


def _block_argmax(new, b, block_m):
  """(max, first index attaining it), both (1, 1), of a (1, block_m) row."""
  top = jnp.max(new, axis=1, keepdims=True)
  col = b * block_m + jax.lax.broadcasted_iota(jnp.int32, new.shape, 1)
  idx = jnp.min(jnp.where(new == top, col, _BIG), axis=1, keepdims=True)
  return top, idx


def _update(chunk, p, w_ref, dist_ref, out_ref):
  """Sums the squared differences chunk by chunk, lowers the running min
  in place and returns the block's (max, first index attaining it)."""
  acc = jax.lax.fori_loop(
      0, p.d_pad // p.d_chunk, chunk, jnp.zeros((1, p.block_m), _F32)
  )
  new = jnp.minimum(dist_ref[...], jnp.sqrt(acc) * w_ref[...])
  out_ref[...] = new
  return _block_argmax(new, pl.program_id(0), p.block_m)


def _triton_kernel(
    c_ref, xt_ref, w_ref, dist_ref, out_ref, bmax_ref, bidx_ref, *, p
):
  dc = p.d_chunk

  def chunk(k, acc):
    base = pl.multiple_of(k * dc, dc)
    for r in range(dc):  # one coalesced (1, block_m) row per feature
      row = xt_ref[pl.ds(base + r, 1), :].astype(_F32)
      diff = row - c_ref[pl.ds(base + r, 1), :].astype(_F32)
      acc = acc + diff * diff
    return acc

  top, idx = _update(chunk, p, w_ref, dist_ref, out_ref)
  bmax_ref[...] = top
  bidx_ref[...] = idx


def _tpu_kernel(
    c_ref, xt_ref, w_ref, dist_ref, out_ref, bmax_ref, bidx_ref, *, p
):
  dc = p.d_chunk

  def chunk(k, acc):
    base = pl.multiple_of(k * dc, dc)
    diff = xt_ref[pl.ds(base, dc), :].astype(_F32) - c_ref[
        pl.ds(base, dc), :
    ].astype(_F32)
    sq = diff * diff
    for r in range(dc):  # features in order, as in the triton design
      acc = acc + sq[r : r + 1, :]
    return acc

  top, idx = _update(chunk, p, w_ref, dist_ref, out_ref)
  bmax_ref[...] = jnp.broadcast_to(top, bmax_ref.shape)
  bidx_ref[...] = jnp.broadcast_to(idx, bidx_ref.shape)


def make_step(nb, p: Plan, backend: str, interpret: bool):
  """The per-pick step over `nb` blocks of ``p.block_m`` points.

  step(c, xt, w, dist) with c the (d_pad, 1) centre, xt the (d_pad,
  nb * block_m) transposed points, w and dist (1, nb * block_m) f32 ->
  (new dist (1, nb * block_m), its max, the lowest index attaining it).
  """
  bm, dp = p.block_m, p.d_pad
  tpu = backend == "mosaic_tpu"
  kernel = functools.partial(_tpu_kernel if tpu else _triton_kernel, p=p)
  tile = (8, 128) if tpu else (1, 1)
  if interpret:
    params = None
  elif tpu:
    params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  else:
    params = plt.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)
  call = pl.pallas_call(
      kernel,
      grid=(nb,),
      in_specs=[
          pl.BlockSpec((dp, 1), lambda b: (0, 0)),
          pl.BlockSpec((dp, bm), lambda b: (0, b)),
          pl.BlockSpec((1, bm), lambda b: (0, b)),
          pl.BlockSpec((1, bm), lambda b: (0, b)),
      ],
      out_specs=[
          pl.BlockSpec((1, bm), lambda b: (0, b)),
          pl.BlockSpec(tile, lambda b: (b, 0)),
          pl.BlockSpec(tile, lambda b: (b, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((1, nb * bm), _F32),
          jax.ShapeDtypeStruct((nb * tile[0], tile[1]), _F32),
          jax.ShapeDtypeStruct((nb * tile[0], tile[1]), jnp.int32),
      ],
      input_output_aliases={3: 0},  # running min updated in place
      interpret=interpret,
      compiler_params=params,
  )

  def step(c, xt, w, dist):
    dist, bmax, bidx = call(c, xt, w, dist)
    bmax, bidx = bmax[:: tile[0], 0], bidx[:: tile[0], 0]
    top = jnp.max(bmax)
    return dist, top, jnp.min(jnp.where(bmax == top, bidx, _BIG))

  return step


def transposed(x, p: Plan, mp: int):
  """x (M, D) -> (d_pad, mp): zero rows and features appended."""
  m, d = x.shape
  return jnp.pad(x, ((0, mp - m), (0, p.d_pad - d))).T


def column(c, p: Plan):
  """A (D,) centre -> the (d_pad, 1) centre block."""
  return jnp.pad(c, (0, p.d_pad - c.shape[0]))[:, None]


@functools.partial(
    jax.jit,
    static_argnames=("n_select", "p", "backend", "interpret", "storage_dtype"),
)
def _kcenter_pallas(
    x, n_select, start_idx, w, p, backend, interpret, storage_dtype
):
  m = x.shape[0]
  if storage_dtype is not None:
    x = x.astype(storage_dtype)
  dist = initial_distance(x, start_idx, w)
  mp = dispatch.round_up(m, p.block_m)
  xt = transposed(x, p, mp)
  wp = jnp.pad(w, (0, mp - m))[None, :]
  distp = jnp.pad(dist, (0, mp - m))[None, :]
  step = make_step(mp // p.block_m, p, backend, interpret)

  def body(t, carry):
    distp, sel, i = carry
    sel = sel.at[t].set(i)
    c = jax.lax.dynamic_slice_in_dim(xt, i, 1, axis=1)  # (d_pad, 1)
    distp, _, nxt = step(c, xt, wp, distp)
    return distp, sel, nxt

  i0 = jnp.argmax(dist).astype(jnp.int32)
  sel = jnp.zeros((n_select,), jnp.int32)
  # The last pick needs no update after it.
  _, sel, last = jax.lax.fori_loop(0, n_select - 1, body, (distp, sel, i0))
  return sel.at[n_select - 1].set(last)


def kcenter_pallas(
    x,
    n_select,
    start_idx,
    w,
    *,
    backend: str | None = None,
    interpret: bool = False,
    storage_dtype=None,
    block_m: int | None = None,
):
  """Pallas weighted greedy k-center; inputs validated by ``kcenter``.

  Args:
    x: (M, D) float32 points.
    n_select: number of centres (>= 1).
    start_idx: (S,) int32 starting points.
    w: (M,) float32 sampling weights.
    backend: 'triton' or 'mosaic_tpu' (None: the current jax backend's).
    interpret: run that design in the Pallas interpreter (on any machine).
    storage_dtype: None (f32) or jnp.bfloat16 to store x in bf16 (f32
      arithmetic).
    block_m: points per grid step (None: ``plan``'s).

  Returns:
    (n_select,) int32 indices, as ``kcenter.kcenter_reference``.
  """
  backend = dispatch.pallas_backend(backend)
  m, d = x.shape
  if int(n_select) == 0:
    return jnp.zeros((0,), jnp.int32)
  itemsize = 4 if storage_dtype is None else jnp.dtype(storage_dtype).itemsize
  p = plan(m, d, backend, block_m=block_m, itemsize=itemsize)
  if not interpret:
    dispatch.check_budget(
        "kcenter", backend, p.nbytes, f"block_m={p.block_m}, d={d}"
    )
  return _kcenter_pallas(
      x,
      int(n_select),
      start_idx,
      w,
      p,
      backend,
      bool(interpret),
      storage_dtype,
  )
