"""Memory-bank subsamplers: weighted greedy k-center, random, identity.

Every subsampler returns a fixed-length pair ``(indices, valid)``: int32
indices into the M points and a boolean mask of the entries that count. The
length depends only on static sizes, so each subsampler can be jitted,
vmapped and sharded; `compact` drops the invalid entries on the host.

``greedy`` is PatchCore's approximate greedy coreset with SoftPatch's sampling
weight (Jiang et al., NeurIPS 2022): every point's distance starts as
its mean distance to a few random start points and is multiplied by its weight
(1 clean, 0 outlier patch), so zero-weight points keep distance 0 and are never picked
while any selectable point at positive distance remains. The O(M n) selection
loop runs on the device in `softpatch_jax.kernels.kcenter`.

Differences from the reference implementation (README, "Deliberate
differences"):
- The weight is applied from the very first pick (the reference applies it
  only from the second pick on, so its first pick can be an outlier patch).
  ``greedy(..., unweighted_first=True)`` reproduces the official SoftPatch
  code: the first pick is the argmax of the unweighted mean distance to the
  starts (it may be a zero-weight point, and it is then kept as valid), and
  the weighted loop continues from it.
- ``num_starts`` defaults to 10, the intended value; the reference's SoftPatch
  sampler passes 128 into that slot by accident. Pass 128 to reproduce it.
- ``num_samples`` returns at least 1 (the reference's ``int(M*fraction)`` can
  be 0) and accepts fraction == 1 (keep everything).
- Invalid entries: once every remaining distance is 0 (more picks requested
  than distinct selectable points), the plain argmax would pick index 0 again
  and again, or a zero-weight point; such picks are marked invalid.
- When the request covers every selectable point, all of them are returned in
  index order without running the loop (the set greedy would give).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable, Optional, Tuple, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import registry
from softpatch_jax import settings
from softpatch_jax import validation
from softpatch_jax.kernels import kcenter as kcenter_lib
from softpatch_jax.kernels import kcenter_common

Selection = Tuple[jax.Array, jax.Array]  # (indices (n,) int32, valid (n,))

IMPLS = ("auto", "dense", "pruned")
# 'auto' runs the pruned host greedy from this many points on: below it the
# dense kernel's fixed cost per pick is lower.
PRUNED_MIN_POINTS = 16384


@dataclasses.dataclass(frozen=True)
class CoresetOptions:
  """config.coreset: how the memory bank is selected.

  fraction: share of the patches kept in the bank, in (0, 1].
  num_starts: random start points of the greedy coreset. The reference's
    SoftPatch sampler passes 128 here by accident; 10 is the intended value.
  projection_dim: dimension of the random projection.
  reference_quirks: True reproduces the official SoftPatch code exactly: the
    coreset runs on a second random projection, and its first pick ignores
    the outlier weight (so it can be an outlier patch). Off: one
    projection, outlier patches never kept.
  impl: 'auto', 'dense' or 'pruned' (`resolve_impl`). pruned: an exact
    greedy on the host that updates only the points that can become the
    next pick (kernels/kcenter_pruned.py; the float32 numpy greedy's
    picks), one device only; auto runs it for eager CPU fits of >= 16384
    patches, where it is 3-20x faster (README, "Benchmarks").
  """

  fraction: float = 0.1
  num_starts: int = 10
  projection_dim: int = 128
  reference_quirks: bool = False
  impl: str = "auto"

  def __post_init__(self):
    frac = settings.check_float(
        self.fraction, "coreset.fraction", 0.0, 1.0, lo_open=True
    )
    settings.set_field(self, "fraction", frac)
    for name in ("num_starts", "projection_dim"):
      v = settings.check_int(getattr(self, name), f"coreset.{name}", 1)
      settings.set_field(self, name, v)
    settings.set_field(self, "reference_quirks", bool(self.reference_quirks))
    settings.check_choice(self.impl, "coreset.impl", IMPLS)


# fn(points (M, d), n_select, key, *, sampling_weight=None, num_starts=,
# starts=None, ...) -> Selection.
SUBSAMPLERS: registry.Registry[Callable[..., Selection]] = registry.Registry(
    "subsampler"
)


def register_subsampler(name: str):
  """Decorator: adds a subsampler to `SUBSAMPLERS` under `name`."""

  def wrap(fn):
    return SUBSAMPLERS.register(name, fn)

  return wrap


def get_subsampler(name: str) -> Callable[..., Selection]:
  return SUBSAMPLERS.get(name)


def resolve_impl(impl: str, n_points: int, eager: bool, mesh=None) -> str:
  """'dense' or 'pruned' for the greedy over n_points (config.coreset.impl).

  'auto' is 'pruned' (`kernels.kcenter_pruned`, a numpy host loop with the
  float32 numpy greedy's picks) for `eager` (concrete) points on CPU, one
  device and >= PRUNED_MIN_POINTS of them; 'dense' (the XLA or Pallas
  kernel) under jit, on accelerators and with a mesh.
  """
  if impl not in IMPLS:
    raise ValueError(f"coreset_impl must be one of {IMPLS}, got {impl!r}")
  if impl == "pruned" and mesh is not None:
    raise ValueError("coreset_impl='pruned' runs on one device; drop mesh")
  if impl != "auto":
    return impl
  host = eager and jax.default_backend() == "cpu"
  big = n_points >= PRUNED_MIN_POINTS
  return "pruned" if host and big and mesh is None else "dense"


def num_samples(m: int, fraction: float) -> int:
  """Points kept for a fraction: max(1, int(m * fraction)), as the reference."""
  if not isinstance(
      fraction, (int, float, np.floating, np.integer)
  ) or isinstance(fraction, bool):
    raise ValueError(
        f"coreset fraction must be a number in (0, 1], got {fraction!r}"
    )
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
  if int(m) < 1:
    raise ValueError(f"cannot subsample an empty bank (M={m})")
  return max(1, int(int(m) * float(fraction)))


def start_indices(m: int, num_starts: int, key: jax.Array) -> jax.Array:
  """min(num_starts, m) distinct random start points, drawn from ``key``."""
  if int(num_starts) < 1:
    raise ValueError(f"num_starts must be >= 1, got {num_starts}")
  s = min(int(num_starts), int(m))
  return jax.random.choice(key, int(m), (s,), replace=False).astype(jnp.int32)


def compact(selection: Selection) -> jax.Array:
  """The valid indices of a selection, in order (host sync; not jittable)."""
  idx, valid = selection
  valid = np.asarray(valid)
  if valid.all():
    return jnp.asarray(idx, jnp.int32)
  return jnp.asarray(np.asarray(idx)[valid], jnp.int32)


def _resolve_n(m: int, n_select: Union[int, float]) -> int:
  # An int is a count; a float is a fraction of the bank.
  if isinstance(n_select, (float, np.floating)):
    return num_samples(m, n_select)
  try:
    n = operator.index(n_select)
  except TypeError:
    raise ValueError(
        f"n_select must be an int count or a float fraction, got {n_select!r}"
    ) from None
  if n < 1:
    raise ValueError(f"n_select must be >= 1, got {n}")
  return n


def _check_weight(w, m: int, op: str):
  if w is None:
    return None
  w = jnp.asarray(w, jnp.float32)
  if w.shape != (m,):
    raise ValueError(
        f"coreset.{op}: sampling_weight shape {tuple(w.shape)} != ({m},)"
    )
  if validation.is_concrete(w):
    wn = np.asarray(w)
    if not np.all(np.isfinite(wn)) or np.any(wn < 0):
      raise ValueError(f"coreset.{op}: sampling_weight must be finite and >= 0")
    if not np.any(wn > 0):
      raise ValueError(
          f"coreset.{op}: every sampling weight is 0, nothing can be selected"
      )
  return w


def _all_selectable(w, m: int, n: int) -> Selection:
  """The first n points of positive weight in index order, padded."""
  if w is None:
    idx = jnp.minimum(jnp.arange(n, dtype=jnp.int32), m - 1)
    return idx, jnp.arange(n) < m
  idx = jnp.nonzero(w > 0, size=n, fill_value=0)[0].astype(jnp.int32)
  valid = jnp.arange(n) < jnp.sum(w > 0)
  return jnp.where(valid, idx, idx[0]), valid


def _first_occurrence(idx, m: int):
  """valid[t]: idx[t] does not occur among idx[:t]. O(m + n)."""
  t = jnp.arange(idx.shape[0], dtype=jnp.int32)
  first = jnp.full((m,), idx.shape[0], jnp.int32).at[idx].min(t)
  return first[idx] == t


def _greedy_starts(m: int, key, num_starts: int, starts) -> jax.Array:
  """Explicit `starts`, or `start_indices` drawn from `key`, checked."""
  if starts is None:
    if key is None:
      raise ValueError("coreset.greedy: pass a PRNG key or explicit starts")
    starts = start_indices(m, num_starts, key)
  starts = jnp.asarray(starts, jnp.int32)
  if starts.ndim != 1 or starts.shape[0] < 1:
    raise ValueError(
        "coreset.greedy: starts must be a non-empty 1-d index array, got "
        f"shape {tuple(starts.shape)}"
    )
  return starts


def _check_points(proj) -> int:
  if proj.ndim != 2 or proj.shape[0] < 1:
    raise ValueError(
        "coreset.greedy: expected (M, d) features with M >= 1, got shape "
        f"{tuple(proj.shape)}"
    )
  return int(proj.shape[0])


def _kcenter_selection(x, n, starts, w, first, kcenter_fn) -> Selection:
  """The k-center loop's picks as a Selection (see `greedy`)."""
  m = x.shape[0]
  idx = (kcenter_fn or kcenter_lib.kcenter)(x, n, starts, w, first=first)
  valid = _first_occurrence(idx, m)
  if first is not None:
    valid &= (w[idx] > 0) | (jnp.arange(n) == 0)
  elif w is not None:
    valid &= w[idx] > 0
  return jnp.where(valid, idx, idx[0]), valid


def _unweighted_first(x, n, starts, w, kcenter_fn) -> Selection:
  """`greedy` with the reference's first pick (ignoring the weight)."""
  m = x.shape[0]
  d0 = kcenter_common.initial_distance(x, starts, jnp.ones((m,), jnp.float32))
  first = jnp.argmax(d0).astype(jnp.int32)
  # Short-cut only when every point is requested, so the result never
  # depends on whether the forced first pick is a zero-weight point.
  if n >= m:
    # The first pick joins the selectable points, whatever its weight.
    w_sel = jnp.where(jnp.arange(m) == first, jnp.maximum(w, 1.0), w)
    return _all_selectable(w_sel, m, n)
  return _report(n, *_kcenter_selection(x, n, starts, w, first, kcenter_fn))


def _weighted(x, n, starts, w, kcenter_fn) -> Selection:
  """`greedy` with the weight from the first pick on."""
  m = x.shape[0]
  run = functools.partial(_kcenter_selection, x, n, starts, w, None, kcenter_fn)
  n_selectable = m if w is None else jnp.sum(w > 0)
  if not validation.is_concrete(n_selectable):
    return jax.lax.cond(
        n >= n_selectable, lambda: _all_selectable(w, m, n), run
    )
  n_selectable = int(n_selectable)
  if n >= n_selectable:
    # Every selectable point is requested: skip the O(M n) loop.
    if n > n_selectable:
      logging.warning(
          "coreset.greedy: %d points requested but only %d are selectable; "
          "keeping all of them",
          n,
          n_selectable,
      )
    return _all_selectable(w, m, n)
  return _report(n, *run())


@register_subsampler("greedy")
def greedy(
    proj: jax.Array,
    n_select: Union[int, float],
    key: Optional[jax.Array] = None,
    *,
    sampling_weight: Optional[jax.Array] = None,
    num_starts: int = CoresetOptions.num_starts,
    starts: Optional[jax.Array] = None,
    unweighted_first: bool = False,
    kcenter_fn: Optional[Callable[..., jax.Array]] = None,
) -> Selection:
  """Weighted approximate greedy k-center subsampling.

  Args:
    proj: (M, d) features to select on (SoftPatch: the 128-d projection).
    n_select: number of points (int) or a fraction of M in (0, 1] (float).
    key: PRNG key for the start points (unused when `starts` is given).
    sampling_weight: optional (M,) non-negative weights multiplying distances
      (1 clean / 0 outlier patch); zero-weight points are never selected.
    num_starts: number of random start points (clipped to M).
    starts: explicit (S,) start indices instead of drawing them from `key`.
    unweighted_first: reproduce the official SoftPatch code's first pick:
      the argmax of the mean distance to the starts without the weight, so
      it may be a zero-weight point (it is then valid); the later picks are
      weighted as usual. Exact for 0/1 weights; no effect without weights.
    kcenter_fn: the selection loop, `kernels.kcenter.kcenter` by default;
      `parallel.kcenter` bound to a mesh splits the points over devices.

  Returns:
    (indices (n,) int32 in pick order, valid (n,) bool). Valid indices are
    distinct and of positive weight (but for an `unweighted_first` first
    pick); invalid entries repeat the first pick.
  """
  m = _check_points(proj)
  n = _resolve_n(m, n_select)
  w = _check_weight(sampling_weight, m, "greedy")
  starts = _greedy_starts(m, key, num_starts, starts)
  x = jnp.asarray(proj, jnp.float32)
  if unweighted_first and w is not None:
    return _unweighted_first(x, n, starts, w, kcenter_fn)
  return _weighted(x, n, starts, w, kcenter_fn)


def _report(n: int, idx, valid) -> Selection:
  """Warns (eagerly) when fewer than n of the picks are valid."""
  if not validation.is_concrete(valid):
    return idx, valid
  n_valid = int(np.asarray(valid).sum())
  if n_valid < n:
    logging.warning(
        "coreset.greedy: only %d distinct selectable points at positive "
        "distance; returning %d of the %d requested",
        n_valid,
        n_valid,
        n,
    )
  return idx, valid


@register_subsampler("random")
def random(
    proj: Union[jax.Array, int],
    n_select: Union[int, float],
    key: jax.Array,
    *,
    sampling_weight: Optional[jax.Array] = None,
    **unused,
) -> Selection:
  """n distinct uniformly random indices (PatchCore-random).

  `proj` is the (M, d) features or just M. With `sampling_weight`, points of
  weight 0 are never drawn (uniform among the others).
  """
  del unused
  m = int(proj) if isinstance(proj, (int, np.integer)) else int(proj.shape[0])
  if m < 1:
    raise ValueError(f"coreset.random: cannot subsample an empty bank (M={m})")
  n = _resolve_n(m, n_select)
  w = _check_weight(sampling_weight, m, "random")
  if n > m:
    raise ValueError(f"coreset.random: n={n} exceeds M={m}")
  if w is None:
    idx = jax.random.choice(key, m, (n,), replace=False).astype(jnp.int32)
    return idx, jnp.ones((n,), bool)
  if validation.is_concrete(w) and n > int(np.sum(np.asarray(w) > 0)):
    raise ValueError(
        f"coreset.random: n={n} exceeds the "
        f"{int(np.sum(np.asarray(w) > 0))} selectable points"
    )
  p = (w > 0).astype(jnp.float32)
  idx = jax.random.choice(key, m, (n,), replace=False, p=p / jnp.sum(p))
  idx = idx.astype(jnp.int32)
  valid = w[idx] > 0
  return jnp.where(valid, idx, idx[0]), valid


@register_subsampler("identity")
def identity(
    proj: Union[jax.Array, int],
    n_select=None,
    key=None,
    *,
    sampling_weight: Optional[jax.Array] = None,
    **unused,
) -> Selection:
  """Every point (of positive weight), in index order: no subsampling."""
  del n_select, key, unused
  m = int(proj) if isinstance(proj, (int, np.integer)) else int(proj.shape[0])
  if m < 1:
    raise ValueError(f"coreset.identity: empty bank (M={m})")
  w = _check_weight(sampling_weight, m, "identity")
  return _all_selectable(w, m, m)
