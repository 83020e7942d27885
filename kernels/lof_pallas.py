"""Pallas kernel for batched LOF: one position per grid step.

Each step holds one position's (N, D) points. Distances are accumulated
from coordinate differences, column by column, so duplicated points are
exactly 0 apart and d(i, j) == d(j, i) bit for bit. Neighbours are taken
in k rounds of "smallest distance, lowest index among equals" and kept as
an (N, N) 0/1 mask, so k-distance, lrd and LOF are masked row reductions
and no gather is needed inside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from softpatch_jax.kernels import _dispatch

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max
_EPS = 1e-10


def _lof_kernel(x_ref, xt_ref, out_ref, *, k, n_valid, dim):
  n = x_ref.shape[1]

  def acc_dim(c, acc):
    col = x_ref[0, :, pl.ds(c, 1)]  # (N, 1)
    row = xt_ref[0, pl.ds(c, 1), :]  # (1, N)
    diff = col - row
    return acc + diff * diff

  sq = jax.lax.fori_loop(0, dim, acc_dim, jnp.zeros((n, n), _F32))
  d = jnp.sqrt(sq)
  ri = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  ci = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  cand = jnp.where((ri != ci) & (ci < n_valid), d, jnp.inf)
  mask = jnp.zeros((n, n), jnp.bool_)
  kdist = jnp.zeros((n, 1), _F32)
  for _ in range(k):
    m = jnp.min(cand, axis=1, keepdims=True)
    sel = jnp.min(jnp.where(cand == m, ci, _BIG), axis=1, keepdims=True)
    hit = ci == sel
    mask = mask | hit
    cand = jnp.where(hit, jnp.inf, cand)
    kdist = m  # the last round leaves the k-th neighbour distance
  reach = jnp.maximum(kdist.T, d)  # reach(i, j) = max(kdist(j), d(i, j))
  lrd = 1.0 / (
      jnp.sum(jnp.where(mask, reach, 0.0), axis=1, keepdims=True) / k + _EPS
  )
  ratio = jnp.where(mask, lrd.T / lrd, 0.0)
  out_ref[...] = (jnp.sum(ratio, axis=1, keepdims=True) / k).T[None]


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def _lof_pallas(x, k, interpret):
  p, n, dim = x.shape
  # Padded points are excluded from every neighbour set via n_valid.
  np_ = n if interpret else _dispatch.round_up(n, 128)
  xp = jnp.pad(x, ((0, 0), (0, np_ - n), (0, 0)))
  xt = jnp.swapaxes(xp, 1, 2)
  kernel = functools.partial(_lof_kernel, k=k, n_valid=n, dim=dim)
  out = pl.pallas_call(
      kernel,
      grid=(p,),
      in_specs=[
          pl.BlockSpec((1, np_, dim), lambda i: (i, 0, 0)),
          pl.BlockSpec((1, dim, np_), lambda i: (i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((1, 1, np_), lambda i: (i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((p, 1, np_), _F32),
      interpret=interpret,
  )(xp, xt)
  return out[:, 0, :n]


def lof_pallas(x, k, *, interpret=False):
  """Pallas LOF; ``x`` (P, N, D) float32, ``k`` already clamped."""
  return _lof_pallas(x, int(k), bool(interpret))
