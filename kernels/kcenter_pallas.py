"""Pallas kernel for the weighted greedy k-center step.

One ``pallas_call`` per selected point, gridded over row blocks of x:
each block reads its rows once, computes the distance to the new centre,
applies the sampling weight, lowers the running minimum in place
(input/output aliasing) and emits its block maximum with the first index
that attains it. The tiny cross-block argmax runs outside the kernel, all
inside one ``lax.fori_loop``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from softpatch_jax.kernels import _dispatch
from softpatch_jax.kernels.kcenter_common import initial_distance

_F32 = jnp.float32
_BIG = jnp.iinfo(jnp.int32).max


def _step_kernel(
    c_ref, xt_ref, w_ref, dist_ref, out_dist_ref, bmax_ref, bidx_ref, *, block_m
):
  b = pl.program_id(0)
  # x is held transposed, (d, block_m), so the per-point results are
  # lane-dense rows.
  diff = xt_ref[...].astype(_F32) - c_ref[...].astype(_F32)
  d = jnp.sqrt(jnp.sum(diff * diff, axis=0, keepdims=True))  # (1, block_m)
  new = jnp.minimum(dist_ref[...], d * w_ref[...])
  out_dist_ref[...] = new
  m = jnp.max(new, axis=1, keepdims=True)
  col = b * block_m + jax.lax.broadcasted_iota(jnp.int32, new.shape, 1)
  bmax_ref[...] = m
  bidx_ref[...] = jnp.min(jnp.where(new == m, col, _BIG), axis=1, keepdims=True)


def _make_step(nb, block_m, dim, interpret):
  kernel = functools.partial(_step_kernel, block_m=block_m)
  return pl.pallas_call(
      kernel,
      grid=(nb,),
      in_specs=[
          pl.BlockSpec((dim, 1), lambda b: (0, 0)),
          pl.BlockSpec((dim, block_m), lambda b: (0, b)),
          pl.BlockSpec((1, block_m), lambda b: (0, b)),
          pl.BlockSpec((1, block_m), lambda b: (0, b)),
      ],
      out_specs=[
          pl.BlockSpec((1, block_m), lambda b: (0, b)),
          pl.BlockSpec((1, 1), lambda b: (b, 0)),
          pl.BlockSpec((1, 1), lambda b: (b, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((1, nb * block_m), _F32),
          jax.ShapeDtypeStruct((nb, 1), _F32),
          jax.ShapeDtypeStruct((nb, 1), jnp.int32),
      ],
      input_output_aliases={3: 0},  # running min updated in place
      interpret=interpret,
  )


@functools.partial(
    jax.jit,
    static_argnames=("n_select", "block_m", "interpret", "storage_dtype"),
)
def _kcenter_pallas(
    x, n_select, start_idx, w, block_m, interpret, storage_dtype
):
  m, dim = x.shape
  if storage_dtype is not None:
    x = x.astype(storage_dtype)
  dist = initial_distance(x, start_idx, w)
  mp = _dispatch.round_up(m, block_m)
  nb = mp // block_m
  # Padding points get weight 0 (distance 0) and the highest indices, so
  # the first-occurrence argmax never prefers them.
  xt = jnp.pad(x, ((0, mp - m), (0, 0))).T
  wp = jnp.pad(w, (0, mp - m))[None, :]
  distp = jnp.pad(dist, (0, mp - m))[None, :]
  step = _make_step(nb, block_m, dim, interpret)

  def body(t, carry):
    distp, sel, i = carry
    sel = sel.at[t].set(i)
    c = jax.lax.dynamic_slice_in_dim(xt, i, 1, axis=1)  # (d, 1)
    distp, bmax, bidx = step(c, xt, wp, distp)
    top = jnp.max(bmax)
    nxt = jnp.min(jnp.where(bmax == top, bidx, _BIG))
    return distp, sel, nxt

  i0 = jnp.argmax(dist).astype(jnp.int32)
  _, sel, _ = jax.lax.fori_loop(
      0, n_select, body, (distp, jnp.zeros((n_select,), jnp.int32), i0)
  )
  return sel


def kcenter_pallas(
    x,
    n_select,
    start_idx,
    w,
    *,
    interpret=False,
    storage_dtype=None,
    block_m=None,
):
  """Pallas weighted greedy k-center; inputs validated by ``kcenter``."""
  m = x.shape[0]
  if block_m is None:
    block_m = 128 if interpret else 2048
    block_m = min(block_m, _dispatch.round_up(m, 128))
  return _kcenter_pallas(
      x,
      int(n_select),
      start_idx,
      w,
      int(block_m),
      bool(interpret),
      storage_dtype,
  )
