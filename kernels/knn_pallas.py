"""Pallas kernel for blocked squared-L2 kNN.

Grid = (query tiles, bank tiles); the bank axis is the inner, sequential
one. The (block_q, kp) output tiles stay resident across it and hold the
running top-k, so no distance tile outlives one grid step. The merge is
k rounds of "take the minimum, lowest index among equals", written with
plain min/where so that it lowers on every Pallas backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from softpatch_jax.kernels import _dispatch
from softpatch_jax.kernels import knn_common

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _knn_kernel(q_ref, qq_ref, b_ref, bb_ref, d_ref, i_ref, *, k, kp, block_n):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    d_ref[...] = jnp.full(d_ref.shape, jnp.inf, _F32)
    i_ref[...] = jnp.full(i_ref.shape, _BIG, jnp.int32)

  dots = jax.lax.dot_general(
      q_ref[...],
      b_ref[...],
      (((1,), (1,)), ((), ())),
      preferred_element_type=_F32,
  )
  d = jnp.maximum(qq_ref[...] - 2.0 * dots + bb_ref[...], 0.0)
  col = j * block_n + jax.lax.broadcasted_iota(jnp.int32, d.shape, 1)
  run_d = d_ref[...]
  run_i = i_ref[...]
  out_d, out_i = [], []
  for _ in range(k):
    m = jnp.minimum(
        jnp.min(run_d, axis=1, keepdims=True), jnp.min(d, axis=1, keepdims=True)
    )
    sel = jnp.minimum(
        jnp.min(jnp.where(run_d == m, run_i, _BIG), axis=1, keepdims=True),
        jnp.min(jnp.where(d == m, col, _BIG), axis=1, keepdims=True),
    )
    out_d.append(m)
    out_i.append(sel)
    run_d = jnp.where(run_i == sel, jnp.inf, run_d)
    d = jnp.where(col == sel, jnp.inf, d)
  for _ in range(kp - k):
    out_d.append(jnp.full_like(out_d[0], jnp.inf))
    out_i.append(jnp.full_like(out_i[0], _BIG))
  d_ref[...] = jnp.concatenate(out_d, axis=1)
  i_ref[...] = jnp.concatenate(out_i, axis=1)


@functools.partial(
    jax.jit,
    static_argnames=("k", "block_q", "block_n", "interpret", "compute_dtype"),
)
def _knn_pallas(queries, bank, k, block_q, block_n, interpret, compute_dtype):
  m, dim = queries.shape
  n = bank.shape[0]
  q, b, qc, bc, qq, bb = knn_common.prep(queries, bank, compute_dtype)
  mp = _dispatch.round_up(m, block_q)
  np_ = _dispatch.round_up(n, block_n)
  dp = _dispatch.round_up(dim, 128) if not interpret else dim
  qc = jnp.pad(qc, ((0, mp - m), (0, dp - dim)))
  bc = jnp.pad(bc, ((0, np_ - n), (0, dp - dim)))
  qq = jnp.pad(qq, (0, mp - m))[:, None]
  bb = jnp.pad(bb, (0, np_ - n), constant_values=jnp.inf)[None, :]
  kp = _next_pow2(k)
  kernel = functools.partial(_knn_kernel, k=k, kp=kp, block_n=block_n)
  d, i = pl.pallas_call(
      kernel,
      grid=(mp // block_q, np_ // block_n),
      in_specs=[
          pl.BlockSpec((block_q, dp), lambda a, c: (a, 0)),
          pl.BlockSpec((block_q, 1), lambda a, c: (a, 0)),
          pl.BlockSpec((block_n, dp), lambda a, c: (c, 0)),
          pl.BlockSpec((1, block_n), lambda a, c: (0, c)),
      ],
      out_specs=[
          pl.BlockSpec((block_q, kp), lambda a, c: (a, 0)),
          pl.BlockSpec((block_q, kp), lambda a, c: (a, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((mp, kp), _F32),
          jax.ShapeDtypeStruct((mp, kp), jnp.int32),
      ],
      interpret=interpret,
  )(qc, qq, bc, bb)
  d, i = d[:m, :k], i[:m, :k]
  if qc.dtype != _F32:
    d, i = knn_common.refine(q, b, d, i, k)
  return d, i


def knn_pallas(
    queries,
    bank,
    k=1,
    *,
    block_q=None,
    block_n=None,
    interpret=False,
    compute_dtype=None,
):
  """Pallas kNN; same contract as ``kernels.knn``."""
  queries, bank = knn_common.validate(queries, bank, k, "knn_pallas")
  m, n = queries.shape[0], bank.shape[0]
  if block_q is None:
    block_q = min(128, _next_pow2(max(m, 16)))
  if block_n is None:
    block_n = min(512, _next_pow2(max(n, 16)))
  block_n = max(int(block_n), _next_pow2(k))
  return _knn_pallas(
      queries,
      bank,
      int(k),
      int(block_q),
      int(block_n),
      bool(interpret),
      compute_dtype,
  )
