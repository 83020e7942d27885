"""Pallas kernel for batched LOF (README, "Kernel paths per backend").

Two passes. The kernel finds, for every point of every position, its k
nearest *other* points of the same position (ascending distance, lowest
index among equal distances) and their distances; the LOF arithmetic on
those (P, N, k) neighbour lists is a few gathers and means, done in jnp with
the arithmetic of ``lof.lof_from_neighbours``.

Distances are summed from coordinate differences, ``acc + (x_c - y_c)^2``
for c = 0, 1, ... in float32, then square-rooted: duplicated points are
exactly 0 apart and d(i, j) == d(j, i) bit for bit (the same squares are
added in the same order), which LOF needs because lrd saturates at 1e10 on
duplicates. Neighbours are taken in k rounds of "smallest distance, then
lowest index among the points at that distance", with no sort or top-k.

Two designs:

* ``triton`` (GPU): grid (position, tile of ``block_r`` points). x is padded
  to N' = next_pow2(N) points and ``d_pad`` features (zeros add exactly 0)
  and also passed transposed, (P, d_pad, N'). A ``fori_loop`` over chunks of
  ``block_d`` features loads, per feature, a (block_r, 1) column of the
  tile's points and a (1, N') row of all points and accumulates the
  (block_r, N') squared distances in registers; k rounds of min / where /
  min then write (block_r, k_pad) distance and index blocks. Every shape is a
  power of two and no program touches another's output.
* ``mosaic_tpu``: grid (position, tile of ``block_r`` points), both
  "parallel". The block of x is a whole position, (N8, D) with N8 = N
  rounded up to 8 sublanes (the full array dims, so any D is allowed). A
  ``fori_loop`` over the tile's points in aligned groups of 8 (stopping at
  the group holding point N - 1) loads an (8, D) tile; each of its points
  is subtracted from all points and the squares reduced over the lanes,
  giving an (N8, 1) column of distances; the k rounds reduce that column
  over sublanes into one (1, 128) row, and the group stores one (8, 128)
  tile of each lane-dense (block_r, 128) output block. Indices are compared
  as float32 (exact below 2^24): no integer reduction. The lane reduction's
  fixed order keeps d(i, j) == d(j, i).

Padded points are never neighbours: their index is >= N, which the kernels
mask to +inf before the first round.
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

_F32 = jnp.float32
_EPS = 1e-10  # sklearn's guard in the lrd denominator

# Triton: a (16, 256) f32 tile is 32 values per thread at 4 warps; bigger
# tiles would spill the distance, candidate and index tiles out of registers.
_TRITON_TILE = 4096
_TRITON_BLOCK_R = 16
_TRITON_BLOCK_D = 8
_TRITON_STAGES = 2
# Mosaic TPU: rows per grid step; each step loops over its rows.
_TPU_BLOCK_R = 128
_LANES = 128


class Plan(NamedTuple):
  """Block sizes of the neighbour kernel and its static on-chip bytes."""

  block_r: int  # points (rows) per grid step
  block_d: int  # features per loop step (triton; the whole D on mosaic_tpu)
  n_pad: int  # points per position held by a grid step (all of them)
  n_rows: int  # rows of the outputs: N rounded up to block_r
  d_pad: int  # features after padding with zeros
  k_pad: int  # lanes of the neighbour outputs
  num_warps: int  # triton only (0 for mosaic_tpu)
  num_stages: int  # triton only (0 for mosaic_tpu)
  nbytes: int


def _triton_plan(n, d, k, block_r, block_d) -> Plan:
  n_pad = dispatch.next_pow2(max(n, 2))
  block_r = min(block_r, n_pad)
  block_d = min(block_d, dispatch.next_pow2(d))
  d_pad = dispatch.round_up(d, block_d)
  k_pad = dispatch.next_pow2(k)
  tile = block_r * n_pad
  warps = max(1, min(8, tile // 1024))
  stages = _TRITON_STAGES
  nbytes = (
      # One f32 / int32 tile each for a layout conversion or cross-warp
      # reduction of the distances, the candidates and the index compare.
      3 * tile * 4
      # The per-feature column and row loads of one loop step, staged
      # num_stages times by software pipelining.
      + stages * block_d * (block_r + n_pad) * 4
      # The (block_r, k_pad) distance and index outputs.
      + 2 * block_r * k_pad * 4
  )
  return Plan(
      block_r,
      block_d,
      n_pad,
      dispatch.round_up(n, block_r),
      d_pad,
      k_pad,
      warps,
      stages,
      nbytes,
  )


def _tpu_plan(n, d, k, block_r) -> Plan:
  n8 = dispatch.round_up(n, 8)
  block_r = min(dispatch.round_up(block_r, 8), n8)
  k_pad = dispatch.round_up(k, _LANES)
  d_lanes = dispatch.round_up(d, _LANES)
  col = n8 * _LANES * 4  # an (N8, 1) f32 column fills a lane-padded tile
  nbytes = 2 * (
      n8 * d_lanes * 4  # the position's points
      + 2 * block_r * k_pad * 4  # distance and index outputs
  )
  # Live values of one row: the loaded (N8, D) points, their difference and
  # its square; the distance, candidate and index columns and the mask.
  nbytes += 3 * n8 * d_lanes * 4 + 4 * col
  return Plan(
      block_r,
      d,
      n8,
      dispatch.round_up(n, block_r),
      d,
      k_pad,
      0,
      0,
      nbytes,
  )


def plan(
    n: int,
    d: int,
    k: int,
    backend: str | None = None,
    *,
    block_r: int | None = None,
    block_d: int | None = None,
) -> Plan:
  """Block plan of the neighbour kernel for positions of N points in D dims.

  ``nbytes`` is a conservative static estimate of on-chip memory:

  * triton: shared memory per program. The kernel has no dot; it counts one
    f32 tile of (block_r, N') for each of the distance, candidate and index
    tensors (Triton may convert their layouts or reduce them across warps
    through shared memory), the column / row loads of one feature chunk
    times ``num_stages`` (software pipelining) and the two output tiles.
  * mosaic_tpu: VMEM, i.e. 2x (double buffering) the position's (N8, D)
    block (lanes padded to 128) and the two (block_r, k_pad) output blocks,
    plus the live values of one row: the loaded (N8, D) points, their
    difference and its square, and four lane-padded (N8, 1) columns.

  Without an explicit `block_r` the triton default (16) is halved until the
  (block_r, N') tile holds at most 4096 values or 1 row; an explicit triton
  `block_r` must be a power of two. On mosaic_tpu `block_r` (default 128)
  is rounded up to a multiple of 8 and capped at N8.
  """
  backend = dispatch.pallas_backend(backend)
  n, d, k = int(n), int(d), int(k)
  if backend == "triton":
    if block_r is None:
      n_pad = dispatch.next_pow2(max(n, 2))
      block_r = _TRITON_BLOCK_R
      while block_r > 1 and block_r * n_pad > _TRITON_TILE:
        block_r //= 2
    elif block_r & (block_r - 1):
      raise ValueError(f"kernels.lof: block_r={block_r} is not a power of 2")
    block_d = _TRITON_BLOCK_D if block_d is None else block_d
    return _triton_plan(n, d, k, block_r, block_d)
  block_r = _TPU_BLOCK_R if block_r is None else block_r
  return _tpu_plan(n, d, k, block_r)


def _triton_kernel(x_ref, xt_ref, nd_ref, nbr_ref, *, k, n_valid, d_chunks):
  """Neighbours of one tile of rows: x block (block_r, d_pad), xt (d_pad, N')."""
  block_r, block_d = x_ref.shape[0], x_ref.shape[1] // d_chunks
  n_pad = xt_ref.shape[1]
  k_pad = nd_ref.shape[1]

  def chunk(c, acc):
    for j in range(block_d):
      f = c * block_d + j
      diff = x_ref[:, pl.ds(f, 1)] - xt_ref[pl.ds(f, 1), :]
      acc = acc + diff * diff
    return acc

  sq = jax.lax.fori_loop(0, d_chunks, chunk, jnp.zeros((block_r, n_pad), _F32))
  ri = pl.program_id(1) * block_r + jax.lax.broadcasted_iota(
      jnp.int32, (block_r, n_pad), 0
  )
  ci = jax.lax.broadcasted_iota(jnp.int32, (block_r, n_pad), 1)
  cand = jnp.where((ri != ci) & (ci < n_valid), jnp.sqrt(sq), jnp.inf)
  ki = jax.lax.broadcasted_iota(jnp.int32, (block_r, k_pad), 1)

  def one_round(r, carry):
    cand, nd, nbr = carry
    m = jnp.min(cand, axis=1, keepdims=True)
    sel = jnp.min(jnp.where(cand == m, ci, n_pad), axis=1, keepdims=True)
    cand = jnp.where(ci == sel, jnp.inf, cand)
    return cand, jnp.where(ki == r, m, nd), jnp.where(ki == r, sel, nbr)

  _, nd, nbr = jax.lax.fori_loop(
      0,
      k,
      one_round,
      (
          cand,
          jnp.zeros((block_r, k_pad), _F32),
          jnp.zeros((block_r, k_pad), jnp.int32),
      ),
  )
  nd_ref[...] = nd
  nbr_ref[...] = nbr


def _tpu_kernel(x_ref, nd_ref, nbr_ref, *, k, n_valid):
  """Neighbours of one tile of rows; x block is the whole position (N8, D)."""
  n8 = x_ref.shape[0]
  block_r, k_pad = nd_ref.shape
  r0 = pl.program_id(1) * block_r
  jj = jax.lax.broadcasted_iota(jnp.int32, (n8, 1), 0)
  jf = jj.astype(_F32)
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, k_pad), 1)
  sub = jax.lax.broadcasted_iota(jnp.int32, (8, k_pad), 0)

  def one_point(xi, g):
    """(1, k_pad) distances and indices of the k nearest others of x[g]."""
    diff = x_ref[...] - xi
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=1, keepdims=True))
    cand = jnp.where((jj != g) & (jj < n_valid), dist, jnp.inf)

    def one_round(r, c):
      cand, nd, nbr = c
      m = jnp.min(cand, axis=0, keepdims=True)
      sel = jnp.min(jnp.where(cand == m, jf, float(n8)), axis=0, keepdims=True)
      cand = jnp.where(jf == sel, jnp.inf, cand)
      nd = jnp.where(lane == r, m, nd)
      nbr = jnp.where(lane == r, sel.astype(jnp.int32), nbr)
      return cand, nd, nbr

    zeros = jnp.zeros((1, k_pad), _F32), jnp.zeros((1, k_pad), jnp.int32)
    _, nd, nbr = jax.lax.fori_loop(0, k, one_round, (cand, *zeros))
    return nd, nbr

  def one_group(gi, carry):
    # Rows move in aligned groups of 8 sublanes: one (8, D) load and one
    # (8, k_pad) store per output block, no unaligned dynamic slices.
    base = pl.multiple_of(gi * 8, 8)
    rows = x_ref[pl.ds(pl.multiple_of(r0 + base, 8), 8), :]
    nd8 = jnp.zeros((8, k_pad), _F32)
    nbr8 = jnp.zeros((8, k_pad), jnp.int32)
    for j in range(8):
      nd, nbr = one_point(rows[j : j + 1, :], r0 + base + j)
      nd8 = jnp.where(sub == j, nd, nd8)
      nbr8 = jnp.where(sub == j, nbr, nbr8)
    nd_ref[pl.ds(base, 8), :] = nd8
    nbr_ref[pl.ds(base, 8), :] = nbr8
    return carry

  # Groups past the last real point are skipped (their output rows are
  # dropped); points of the last group past N read zero padding.
  # (lax.div: the count is positive, and // would lower a sign op.)
  groups = jax.lax.div(jnp.minimum(block_r, n_valid - r0 + 7), 8)
  jax.lax.fori_loop(0, groups, one_group, 0)


def _neighbours_triton(x, k, pl_, interpret):
  p, n, d = x.shape
  xp = jnp.pad(x, ((0, 0), (0, pl_.n_pad - n), (0, pl_.d_pad - d)))
  xt = jnp.swapaxes(xp, 1, 2)
  kernel = functools.partial(
      _triton_kernel, k=k, n_valid=n, d_chunks=pl_.d_pad // pl_.block_d
  )
  out_block = pl.BlockSpec(
      (None, pl_.block_r, pl_.k_pad), lambda i, t: (i, t, 0)
  )
  params = {}
  if not interpret:
    params["compiler_params"] = plt.CompilerParams(
        num_warps=pl_.num_warps, num_stages=pl_.num_stages
    )
  return pl.pallas_call(
      kernel,
      grid=(p, pl_.n_rows // pl_.block_r),
      in_specs=[
          pl.BlockSpec((None, pl_.block_r, pl_.d_pad), lambda i, t: (i, t, 0)),
          pl.BlockSpec((None, pl_.d_pad, pl_.n_pad), lambda i, t: (i, 0, 0)),
      ],
      out_specs=[out_block, out_block],
      out_shape=[
          jax.ShapeDtypeStruct((p, pl_.n_rows, pl_.k_pad), _F32),
          jax.ShapeDtypeStruct((p, pl_.n_rows, pl_.k_pad), jnp.int32),
      ],
      interpret=interpret,
      **params,
  )(xp, xt)


def _neighbours_tpu(x, k, pl_, interpret):
  p, n, d = x.shape
  xp = jnp.pad(x, ((0, 0), (0, pl_.n_pad - n), (0, 0)))
  kernel = functools.partial(_tpu_kernel, k=k, n_valid=n)
  out_block = pl.BlockSpec(
      (None, pl_.block_r, pl_.k_pad), lambda i, t: (i, t, 0)
  )
  params = {}
  if not interpret:
    params["compiler_params"] = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel")
    )
  return pl.pallas_call(
      kernel,
      grid=(p, pl_.n_rows // pl_.block_r),
      in_specs=[pl.BlockSpec((None, pl_.n_pad, d), lambda i, t: (i, 0, 0))],
      out_specs=[out_block, out_block],
      out_shape=[
          jax.ShapeDtypeStruct((p, pl_.n_rows, pl_.k_pad), _F32),
          jax.ShapeDtypeStruct((p, pl_.n_rows, pl_.k_pad), jnp.int32),
      ],
      interpret=interpret,
      **params,
  )(xp)


def _lof_from_neighbours(nd, nbr):
  """LOF from (P, N, k) neighbour distances / indices, as lof.py computes it."""
  gather = jax.vmap(lambda v, i: v[i])  # per position: (N,), (N, k) -> (N, k)
  kdist = nd[..., -1]
  reach = jnp.maximum(gather(kdist, nbr), nd)
  lrd = 1.0 / (jnp.mean(reach, axis=-1) + _EPS)
  return jnp.mean(gather(lrd, nbr) / lrd[..., None], axis=-1)


@functools.partial(
    jax.jit, static_argnames=("k", "backend", "interpret", "pl_")
)
def _neighbours(x, k, backend, interpret, pl_):
  n = x.shape[1]
  if backend == "triton":
    nd, nbr = _neighbours_triton(x, k, pl_, interpret)
  else:
    nd, nbr = _neighbours_tpu(x, k, pl_, interpret)
  return nd[:, :n, :k], nbr[:, :n, :k]


def _prepare(x, k, backend, interpret, block_r, block_d):
  backend = dispatch.pallas_backend(backend)
  x = jnp.asarray(x, _F32)
  dispatch.check_rank("x", "lof", x, 3)
  p, n, d = x.shape
  k = int(k)
  if not 1 <= k < n:
    raise ValueError(f"kernels.lof: need 1 <= k < N, got k={k}, N={n}")
  pl_ = plan(n, d, k, backend, block_r=block_r, block_d=block_d)
  if not interpret:
    dispatch.check_budget(
        "lof", backend, pl_.nbytes, f"{pl_} for x shape {(p, n, d)}"
    )
  return x, k, backend, bool(interpret), pl_


@functools.partial(
    jax.jit, static_argnames=("k", "backend", "interpret", "pl_")
)
def _lof(x, k, backend, interpret, pl_):
  return _lof_from_neighbours(*_neighbours(x, k, backend, interpret, pl_))


def neighbours_pallas(
    x,
    k,
    *,
    backend: str | None = None,
    interpret: bool = False,
    block_r: int | None = None,
    block_d: int | None = None,
):
  """The kernel's pass: (P, N, k) neighbour distances and indices.

  Row i of position p lists the k nearest other points of x[p, i] by
  ascending distance, the lowest index first among equal distances.
  Arguments as for ``lof_pallas``.
  """
  return _neighbours(*_prepare(x, k, backend, interpret, block_r, block_d))


def lof_pallas(
    x,
    k,
    *,
    backend: str | None = None,
    interpret: bool = False,
    block_r: int | None = None,
    block_d: int | None = None,
):
  """Pallas LOF; ``x`` (P, N, D) float32, ``k`` already clamped to [1, N-1].

  Args:
    x: (P, N, D) points, one LOF per position.
    k: number of neighbours, 1 <= k <= N - 1.
    backend: 'triton' or 'mosaic_tpu' (None: the design for the current jax
      backend, see ``dispatch.pallas_backend``).
    interpret: run that design in the Pallas interpreter (any machine).
    block_r, block_d: override the block sizes of ``plan``.

  Returns:
    (P, N) float32 LOF scores.
  """
  return _lof(*_prepare(x, k, backend, interpret, block_r, block_d))
