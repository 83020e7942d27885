"""Memory-bank subsampling (DESIGN §1.5): weighted greedy k-center, random, identity.

``greedy`` is the approximate greedy coreset of PatchCore with SoftPatch's
sampling weight: every point's distance starts as its mean distance to a few
random start points and is multiplied by its weight (1 clean, 0 noise), so
zero-weight points keep distance 0 and are never picked while any selectable
point with positive distance remains. The O(M·n) selection loop runs on device
in ``softpatch_jax.kernels.kcenter``.

Differences from the reference implementation (documented on purpose):
- The weight is applied from the very first pick (the reference applies it only
  from the second pick on, so its first pick can be a noise patch).
- ``num_starts`` defaults to 10, the intended value; the reference's SoftPatch
  sampler passes 128 into that slot by accident. Pass 128 to reproduce it.
- ``num_samples`` returns at least 1 (the reference's ``int(M*fraction)`` can be 0)
  and accepts fraction == 1 (keep everything).
- The result never repeats an index and never holds a zero-weight point. Once
  every remaining distance is 0 (more picks requested than distinct selectable
  points), the plain argmax would pick index 0 again and again, or a zero-weight
  point; such picks are dropped, so the result can be shorter than requested.
- When the request covers every selectable point, all of them are returned in
  index order without running the O(M²) loop (the set is what greedy would give).
"""
from __future__ import annotations

import logging
import operator
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def num_samples(m: int, fraction: float) -> int:
    """Number of points kept for a fraction: max(1, int(m * fraction)) (reference floors)."""
    if not isinstance(fraction, (int, float, np.floating, np.integer)) or isinstance(fraction, bool):
        raise ValueError(f"coreset fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
    if int(m) < 1:
        raise ValueError(f"cannot subsample an empty bank (M={m})")
    return max(1, int(int(m) * float(fraction)))


def identity(m: int) -> jax.Array:
    """All indices 0..m-1 (no subsampling)."""
    return jnp.arange(int(m), dtype=jnp.int32)


def start_indices(m: int, num_starts: int, key: jax.Array) -> jax.Array:
    """min(num_starts, m) distinct random start points, drawn from ``key``."""
    if int(num_starts) < 1:
        raise ValueError(f"num_starts must be >= 1, got {num_starts}")
    s = min(int(num_starts), int(m))
    return jax.random.choice(key, int(m), (s,), replace=False).astype(jnp.int32)


def _resolve_n(m: int, n_select: Union[int, float]) -> int:
    # An int is a count; a float is a fraction of the bank.
    if isinstance(n_select, (float, np.floating)):
        return num_samples(m, n_select)
    try:
        n = operator.index(n_select)
    except TypeError:
        raise ValueError(f"n_select must be an int count or a float fraction, got {n_select!r}")
    if n < 1:
        raise ValueError(f"n_select must be >= 1, got {n}")
    return n


def greedy(proj: jax.Array, n_select: Union[int, float], key: jax.Array,
           sampling_weight: Optional[jax.Array] = None, num_starts: int = 10) -> jax.Array:
    """Weighted approximate greedy k-center subsampling.

    Args:
      proj: (M, d) features to select on (SoftPatch: the 128-d projection).
      n_select: number of points (int) or a fraction of M in (0, 1] (float).
      key: PRNG key for the start points.
      sampling_weight: optional (M,) non-negative weights multiplying distances
        (1 clean / 0 noise); zero-weight points are never selected.
      num_starts: number of random start points (clipped to M).
    Returns:
      int32 indices into proj, in pick order, distinct, at most n_select of them.
    """
    if proj.ndim != 2 or proj.shape[0] < 1:
        raise ValueError(f"coreset.greedy: expected (M, d) features with M >= 1, got shape "
                         f"{tuple(proj.shape)}")
    m = int(proj.shape[0])
    n = _resolve_n(m, n_select)
    w = None
    if sampling_weight is not None:
        w = np.asarray(sampling_weight, np.float32)
        if w.shape != (m,):
            raise ValueError(f"coreset.greedy: sampling_weight shape {w.shape} != ({m},)")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("coreset.greedy: sampling_weight must be finite and >= 0")
    selectable = np.flatnonzero(w > 0) if w is not None else np.arange(m)
    if selectable.size == 0:
        raise ValueError("coreset.greedy: every sampling weight is 0, nothing can be selected")
    if n >= selectable.size:
        if n > selectable.size:
            log.warning("coreset.greedy: %d points requested but only %d are selectable; "
                        "keeping all of them", n, selectable.size)
        return jnp.asarray(selectable, jnp.int32)

    from softpatch_jax import kernels  # the on-device selection loop
    starts = start_indices(m, num_starts, key)
    idx = np.asarray(kernels.kcenter(jnp.asarray(proj, jnp.float32), n, starts,
                                     None if w is None else jnp.asarray(w)))
    # Drop repeats / zero-weight picks, which only happen once all distances are 0.
    _, first = np.unique(idx, return_index=True)
    keep = np.zeros(idx.shape, bool)
    keep[first] = True
    if w is not None:
        keep &= w[idx] > 0
    if not keep.all():
        log.warning("coreset.greedy: only %d distinct selectable points at positive distance; "
                    "returning %d of the %d requested", int(keep.sum()), int(keep.sum()), n)
        idx = idx[keep]
    return jnp.asarray(idx, jnp.int32)


def random(m: int, n: Union[int, float], key: jax.Array,
           sampling_weight: Optional[jax.Array] = None) -> jax.Array:
    """n distinct uniformly random indices (PatchCore-random: choice without replacement).

    n may be a count (int) or a fraction of m (float). With ``sampling_weight``,
    only points of positive weight are drawn from (uniformly among them).
    """
    m = int(m)
    if m < 1:
        raise ValueError(f"coreset.random: cannot subsample an empty bank (M={m})")
    n = _resolve_n(m, n)
    if sampling_weight is None:
        if n > m:
            raise ValueError(f"coreset.random: n={n} exceeds M={m}")
        return jax.random.choice(key, m, (n,), replace=False).astype(jnp.int32)
    w = np.asarray(sampling_weight, np.float32)
    if w.shape != (m,):
        raise ValueError(f"coreset.random: sampling_weight shape {w.shape} != ({m},)")
    selectable = np.flatnonzero(w > 0)
    if n > selectable.size:
        raise ValueError(f"coreset.random: n={n} exceeds the {selectable.size} selectable points")
    pick = jax.random.choice(key, selectable.size, (n,), replace=False)
    return jnp.asarray(selectable, jnp.int32)[pick]
