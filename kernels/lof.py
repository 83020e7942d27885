"""Batched Local Outlier Factor, one independent LOF per position.

``lof(x)[p]`` equals ``-sklearn.neighbors.LocalOutlierFactor(n_neighbors=k)
.fit(x[p]).negative_outlier_factor_`` (euclidean metric):
  * k is clamped to [1, N-1] as sklearn does;
  * neighbours of a point are the k nearest *other* points; equal distances
    are ordered by index. sklearn's heap keeps an arbitrary member of a tie,
    but exactly tied distances only arise from duplicated points, and
    duplicates of one point have identical k-distance and lrd, so the LOF
    values do not depend on which member is kept;
  * k-distance(o) = distance to o's k-th neighbour,
    reach(p, o) = max(k-distance(o), d(p, o)),
    lrd(p) = 1 / (mean_o reach(p, o) + 1e-10),
    LOF(p) = mean_o lrd(o) / lrd(p).
Distances between duplicated points are exactly 0 on every path (sklearn's
are too); that matters because lrd then saturates at 1e10.

Paths: ``lof_reference`` (plain jnp, (P, N, N, D) differences, tests only),
the XLA path (positions in chunks; a Gram-matrix pass proposes k + margin
candidates per point, whose distances are then recomputed exactly from
differences), and the Pallas kernel in ``lof_pallas.py`` (k nearest others
per tile of points in the kernel, the LOF arithmetic on them in jnp).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings

import jax
import jax.numpy as jnp

from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import lof_pallas

_F32 = jnp.float32
_EPS = 1e-10  # sklearn's guard in the lrd denominator


def effective_k(k: int, n: int) -> int:
  """sklearn's clamp: n_neighbors_ = max(1, min(k, n - 1))."""
  return max(1, min(int(k), n - 1))


def _validate(x, k, op):
  x = jnp.asarray(x)
  dispatch.check_rank("x", op, x, 3)
  if x.shape[1] < 2:
    raise ValueError(
        f"kernels.{op}: need at least 2 points per position, got x shape "
        f"{tuple(x.shape)}"
    )
  if int(k) < 1:
    raise ValueError(f"kernels.{op}: k must be >= 1, got {k!r}")
  if int(k) > x.shape[1]:
    warnings.warn(
        f"kernels.{op}: n_neighbors ({k}) is greater than the number of "
        f"samples ({x.shape[1]}); using n_samples - 1 = {x.shape[1] - 1}."
    )
  return x.astype(_F32), effective_k(k, x.shape[1])


def _lex_k_smallest(d, idx, k):
  """k smallest along the last axis, ordered by (distance, index)."""
  ds, ids = jax.lax.sort((d, idx), dimension=d.ndim - 1, num_keys=2)
  return ds[..., :k], ids[..., :k]


def lof_from_neighbours(nd, nbr):
  """LOF from (..., N, k) ascending neighbour distances and indices."""
  gather = jnp.vectorize(lambda v, i: v[i], signature="(n),(n,k)->(n,k)")
  kdist = nd[..., -1]
  reach = jnp.maximum(gather(kdist, nbr), nd)
  lrd = 1.0 / (jnp.mean(reach, axis=-1) + _EPS)
  return jnp.mean(gather(lrd, nbr) / lrd[..., None], axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def _lof_reference(x, k):
  n = x.shape[1]
  diff = x[:, :, None, :] - x[:, None, :, :]
  d = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  eye = jnp.eye(n, dtype=bool)
  d = jnp.where(eye, jnp.inf, d)  # a point is not its own neighbour
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), d.shape)
  nd, nbr = _lex_k_smallest(d, idx, k)
  return lof_from_neighbours(nd, nbr)


def lof_reference(x, k: int):
  """Plain-jnp LOF per position: x (P, N, D) -> (P, N) float32."""
  x, keff = _validate(x, k, "lof_reference")
  return _lof_reference(x, keff)


def _chunk_neighbours(xc, k, margin):
  """Exact (distance, index)-ordered k nearest others for a chunk (c, N, D)."""
  c, n, _ = xc.shape
  kc = min(n - 1, k + margin)
  # Centring per position shrinks the norms, and so the cancellation error
  # of the Gram form used to pick candidates.
  xm = xc - jnp.mean(xc, axis=1, keepdims=True)
  sq = jnp.sum(xm * xm, axis=-1)
  gram = jnp.einsum("cid,cjd->cij", xm, xm, preferred_element_type=_F32)
  approx = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
  approx = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, approx)
  _, cand = jax.lax.top_k(-approx, kc)  # (c, N, kc)
  cand = cand.astype(jnp.int32)
  rows = jax.vmap(lambda a, i: a[i])(xc, cand)  # (c, N, kc, D)
  diff = xc[:, :, None, :] - rows
  d = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  return _lex_k_smallest(d, cand, k)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "margin", "count"))
def _lof_xla(x, k, chunk, margin, start=0, count=None):
  """LOF of the positions [start, start + count) of x (default: all).

  Each chunk gathers its positions from x itself, so no padded or sliced
  copy of x is made (x is most of this op's memory). Positions past the end
  repeat the last one and are dropped; positions never interact, so the
  result does not depend on the split.
  """
  p, n, _ = x.shape
  count = p if count is None else count
  nc = -(-count // chunk)

  def one_chunk(i):
    pos = jnp.minimum(start + i * chunk + jnp.arange(chunk), p - 1)
    nd, nbr = _chunk_neighbours(jnp.take(x, pos, axis=0), k, margin)
    return lof_from_neighbours(nd, nbr)

  out = jax.lax.map(one_chunk, jnp.arange(nc, dtype=jnp.int32))
  return out.reshape(nc * chunk, n)[:count]


def _lof_xla_threaded(x, k, chunk, margin):
  """The XLA path with the positions split over host threads.

  XLA:CPU runs the top-k and the gathers of one program on one core; the
  positions are independent, so contiguous ranges of them run as separate
  executions in parallel (XLA releases the GIL). Every range has the same
  length (the last one runs past the end), so they share one compiled
  program, and the result is bit-identical to one call.

  Under a transformation (``jax.jit``, ``vmap``, ...) ``x`` is a tracer,
  which host threads cannot execute: the positions then stay in one traced
  call of ``_lof_xla``, with the same result.
  """
  p = x.shape[0]
  workers = min(os.cpu_count() or 1, p // max(chunk, 1))
  if (
      isinstance(x, jax.core.Tracer)
      or workers <= 1
      or jax.default_backend() != "cpu"
  ):
    return _lof_xla(x, k, chunk, margin)
  step = dispatch.round_up(-(-p // workers), chunk)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    outs = list(
        ex.map(
            lambda a: _lof_xla(x, k, chunk, margin, a, step),
            range(0, p, step),
        )
    )
  return jnp.concatenate(outs, axis=0)[:p]


def lof(
    x, k: int, impl: str | None = None, *, chunk: int = 16, margin: int = 4
):
  """LOF of every point within its own position group.

  Args:
    x: (P, N, D) features: P positions, N images, D dims.
    k: n_neighbors (clamped to N - 1 like sklearn).
    impl: None (the platform's default, `dispatch.DEFAULT_IMPL`), 'xla',
      'pallas', 'pallas_interpret' or 'reference'.
    chunk: positions per step of the XLA path (bounds memory at
      chunk * N * N floats).
    margin: extra candidates per point taken from the Gram-form distances
      before the exact recomputation (XLA path); guards against rounding
      reordering near-equal neighbours.

  Returns:
    (P, N) float32 LOF scores (1 = inlier, larger = more outlying).
  """
  x, keff = _validate(x, k, "lof")
  path = dispatch.resolve_impl(impl, "lof")
  if x.shape[0] == 0:
    return jnp.zeros((0, x.shape[1]), _F32)
  if path == "reference":
    return _lof_reference(x, keff)
  if path == "xla":
    return _lof_xla_threaded(x, keff, int(min(chunk, x.shape[0])), int(margin))
  return lof_pallas.lof_pallas(
      x,
      keff,
      backend=dispatch.pallas_backend(),
      interpret=(path == "pallas_interpret"),
  )
