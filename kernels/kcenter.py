"""Weighted approximate greedy k-center (coreset selection).

Semantics (all paths):
  d(x, c) = sqrt(sum_k (x_k - c_k)^2)             Euclidean
  dist    = mean_j d(x, x[start_idx[j]]) * w      (weight from the start)
  repeat n_select times:
    i = argmax(dist)            (first occurrence)
    record i
    dist = min(dist, d(x, x[i]) * w)
With w = 0 for outlier patches their distance is 0 from the start, so they
are only ever picked once every clean point is at distance 0 as well.

An explicit ``first`` index replaces the first argmax: it is recorded
first and the loop continues as above (dist = min(dist, d(x, x[first]) * w)
and so on). With 0/1 weights and ``first`` = the argmax of the unweighted
initial distance this is exactly the official SoftPatch code's sampler,
which leaves the weight out of the initial distance.

Paths: ``kcenter_reference`` (plain jnp loop, difference form), the XLA
path (per selected point one matvec over x in the expanded
||x||^2 - 2 x.c + ||c||^2 form, which XLA runs about twice as fast as the
difference form on CPU, followed by fused weight/min/argmax over (M,)
vectors, so x is read once per iteration; exact duplicates are mapped to
one representative so ties stay exact; optional bf16 storage of x), and
the Pallas kernel (``kcenter_pallas.py``). No path forms an M x M matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import kcenter_common
from softpatch_jax.kernels import kcenter_pallas

_F32 = jnp.float32


def validate(x, n_select, start_idx, sampling_weight, op):
  x = jnp.asarray(x)
  dispatch.check_rank("x", op, x, 2)
  m = x.shape[0]
  if m == 0:
    raise ValueError(f"kernels.{op}: x is empty, shape {tuple(x.shape)}")
  if not isinstance(n_select, (int, np.integer)) or n_select < 0:
    raise ValueError(
        f"kernels.{op}: n_select must be an int >= 0, got {n_select!r}"
    )
  start_idx = jnp.asarray(start_idx)
  if start_idx.ndim != 1 or start_idx.shape[0] == 0:
    raise ValueError(
        f"kernels.{op}: start_idx must be a non-empty 1-d index "
        f"array, got shape {tuple(start_idx.shape)}"
    )
  if not jnp.issubdtype(start_idx.dtype, jnp.integer):
    raise ValueError(
        f"kernels.{op}: start_idx must be integer, got {start_idx.dtype}"
    )
  if sampling_weight is None:
    w = jnp.ones((m,), _F32)
  else:
    w = jnp.asarray(sampling_weight, _F32)
    if w.shape != (m,):
      raise ValueError(
          f"kernels.{op}: sampling_weight shape {tuple(w.shape)} "
          f"!= ({m},) to match x {tuple(x.shape)}"
      )
  return x.astype(_F32), int(n_select), start_idx.astype(jnp.int32), w


def check_first(first, m, op):
  """None, or `first` as an int32 scalar; range-checked when concrete."""
  if first is None:
    return None
  first = jnp.asarray(first)
  if first.ndim != 0 or not jnp.issubdtype(first.dtype, jnp.integer):
    raise ValueError(
        f"kernels.{op}: first must be a scalar integer index, got "
        f"{first.dtype} of shape {tuple(first.shape)}"
    )
  if not isinstance(first, jax.core.Tracer) and not 0 <= int(first) < m:
    raise ValueError(f"kernels.{op}: first={int(first)} is not in [0, {m})")
  return first.astype(jnp.int32)


_dist_to = kcenter_common.dist_to
initial_distance = kcenter_common.initial_distance


@functools.partial(jax.jit, static_argnames=("n_select",))
def _kcenter_reference(x, n_select, start_idx, w, first=None):
  dist = initial_distance(x, start_idx, w)
  sel = jnp.zeros((n_select,), jnp.int32)
  lo = 0
  if first is not None:
    sel = sel.at[0].set(first)
    dist = jnp.minimum(dist, _dist_to(x, x[first]) * w)
    lo = 1

  def body(t, carry):
    dist, sel = carry
    i = jnp.argmax(dist).astype(jnp.int32)
    sel = sel.at[t].set(i)
    dist = jnp.minimum(dist, _dist_to(x, x[i]) * w)
    return dist, sel

  _, sel = jax.lax.fori_loop(lo, n_select, body, (dist, sel))
  return sel


def kcenter_reference(
    x, n_select: int, start_idx, sampling_weight=None, *, first=None
):
  """Plain-jnp weighted greedy k-center -> (n_select,) int32 indices."""
  x, n_select, start_idx, w = validate(
      x, n_select, start_idx, sampling_weight, "kcenter_reference"
  )
  first = check_first(first, x.shape[0], "kcenter_reference")
  if n_select == 0:
    return jnp.zeros((0,), jnp.int32)
  return _kcenter_reference(x, n_select, start_idx, w, first)


def duplicate_representative(x):
  """rep[j] = lowest index among the exact duplicates of row j.

  rep[j] = j for a unique row. Rows are grouped by an exact integer hash of
  their bit patterns, then checked for equality with their sorted
  neighbour, so no float rounding is involved. O(M log M), done once.
  """
  m, d = x.shape
  bits = jax.lax.bitcast_convert_type(x.astype(_F32), jnp.uint32)
  mult = (
      jnp.arange(d, dtype=jnp.uint32) * jnp.uint32(2654435761)
      + jnp.uint32(0x9E3779B1)
  ) | jnp.uint32(1)
  h1 = jnp.sum(bits * mult, axis=1, dtype=jnp.uint32)
  h2 = jnp.sum(
      (bits ^ (bits >> 15)) * (mult * jnp.uint32(0x85EBCA6B)),
      axis=1,
      dtype=jnp.uint32,
  )
  order = jnp.lexsort((jnp.arange(m), h2, h1))  # stable: index ascending
  xs = x[order]
  same = jnp.concatenate(
      [jnp.zeros((1,), bool), jnp.all(xs[1:] == xs[:-1], axis=1)]
  )
  # Head of each run = first (lowest-index) member; propagate it forward.
  head_pos = jax.lax.cummax(jnp.where(same, 0, jnp.arange(m)), axis=0)
  rep_sorted = order[head_pos]
  return jnp.zeros((m,), jnp.int32).at[order].set(rep_sorted.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("n_select", "storage_dtype"))
def _kcenter_xla(x, n_select, start_idx, w, storage_dtype, first=None):
  rep = duplicate_representative(x)
  dist = initial_distance(x, start_idx, w)
  # Centring shrinks the norms and so the cancellation error of the Gram
  # form below; distances are translation invariant.
  xc = x - jnp.mean(x, axis=0, keepdims=True)
  if storage_dtype is not None:
    # Halves the bytes read per iteration; norms from the stored values.
    xc = xc.astype(storage_dtype)
  xx = jnp.sum(jnp.square(xc.astype(_F32)), axis=1)
  i0 = jnp.argmax(dist).astype(jnp.int32) if first is None else first

  def body(t, carry):
    dist, sel, i = carry
    sel = sel.at[t].set(i)
    c = jax.lax.dynamic_index_in_dim(xc, i, keepdims=False)
    # The bandwidth-bound pass: one matvec over x (||x-c||^2 expanded),
    # then weight, running min and argmax fuse over (M,) vectors.
    dots = jax.lax.dot_general(
        xc, c, (((1,), (0,)), ((), ())), preferred_element_type=_F32
    )
    sq = jnp.maximum(xx - 2.0 * dots + xx[i], 0.0)
    # Exact duplicates share their representative's value (the matvec may
    # round identical rows differently), and the centre's own group is
    # exactly 0 away, as in the difference form.
    sq = jnp.where(rep == rep[i], 0.0, sq[rep])
    dist = jnp.minimum(dist, jnp.sqrt(sq) * w)
    return dist, sel, jnp.argmax(dist).astype(jnp.int32)

  _, sel, _ = jax.lax.fori_loop(
      0, n_select, body, (dist, jnp.zeros((n_select,), jnp.int32), i0)
  )
  return sel


def kcenter(
    x,
    n_select: int,
    start_idx,
    sampling_weight=None,
    impl: str | None = None,
    *,
    storage_dtype=None,
    first=None,
):
  """Weighted approximate greedy k-center.

  Args:
    x: (M, d) features (typically the 128-d projection).
    n_select: number of centres to pick.
    start_idx: (S,) int indices of the random starting points.
    sampling_weight: (M,) weights (1 clean, 0 outlier patch) or None (all ones).
    impl: None (the platform's default, `dispatch.DEFAULT_IMPL`), 'xla',
      'pallas', 'pallas_interpret' or 'reference'.
    storage_dtype: None (float32) or jnp.bfloat16 to store x in bf16 with
      f32 accumulation (XLA and Pallas paths). Selections may then differ
      from float32 where two candidates are within bf16 resolution.
    first: None (the first pick is the argmax of the weighted initial
      distance) or a scalar int index (may be traced) forced as the first
      pick; the loop then continues as usual. The Pallas kernel has no
      forced first pick: with `first`, the Pallas paths run the XLA path.

  Returns:
    (n_select,) int32 indices into x, in selection order.
  """
  x, n_select, start_idx, w = validate(
      x, n_select, start_idx, sampling_weight, "kcenter"
  )
  first = check_first(first, x.shape[0], "kcenter")
  path = dispatch.resolve_impl(impl, "kcenter")
  if first is not None and path.startswith("pallas"):
    path = "xla"
  if n_select == 0:
    return jnp.zeros((0,), jnp.int32)
  sdt = None if storage_dtype is None else jnp.dtype(storage_dtype)
  if sdt is not None and sdt == jnp.dtype(_F32):
    sdt = None
  if path == "reference":
    return _kcenter_reference(x, n_select, start_idx, w, first)
  if path == "xla":
    return _kcenter_xla(x, n_select, start_idx, w, sdt, first)
  return kcenter_pallas.kcenter_pallas(
      x,
      n_select,
      start_idx,
      w,
      backend=dispatch.pallas_backend(),
      interpret=(path == "pallas_interpret"),
      storage_dtype=sdt,
  )
