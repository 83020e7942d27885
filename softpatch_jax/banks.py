"""Fitting a memory bank: project -> weigh -> select -> gather.

SoftPatch's training stage (Jiang et al., NeurIPS 2022): project the patch
features to a small dimension, weigh every patch with the method's
discriminator, drop the most outlying ``noise_fraction`` of patches (the
outlier patches), select the bank with the weighted greedy coreset on the
same projection, and gather the selected rows. `fit_core` is that sequence,
pure and jittable; `build_bank` is its eager driver, which decides where the
stages run (`placement_for`: host features, a device mesh, the pruned host
greedy) and reports progress. ``coreset.reference_quirks`` reproduces the
official SoftPatch code instead (a second projection for the coreset, an
unweighted first pick).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import feature_store
from softpatch_jax import methods
from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.kernels import kcenter_pruned


def _gather_rows(flat, rows):
  return flat[rows]


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where `fit_core`'s stages run. The defaults keep everything on the
  default device, pure and jittable; `build_bank` sets them for host
  features, a device mesh and the pruned host greedy.

  project(flat, (W, b)); patch_weights(projected, discriminator, options);
  kcenter: the greedy coreset's loop (None: `kernels.kcenter`); take(flat,
  rows): the bank's rows; progress(stage): called once the discriminator
  weights are computed (eagerly only).
  """

  project: Callable = denoise.project
  patch_weights: Callable = denoise.patch_weights
  kcenter: Optional[Callable] = None
  take: Callable = _gather_rows
  progress: Optional[Callable[[str], None]] = None


def _as_projection(projection):
  """(W, b) as given, or W alone with a zero bias."""
  if isinstance(projection, (tuple, list)):
    return projection
  return (projection, jnp.zeros((projection.shape[1],), jnp.float32))


def draw_projections(
    key, dim: int, method: methods.Method, options, draws: methods.Draws
):
  """(projection, coreset projection or None) of a fit; `key` is the
  projection key of `fit_core` (`options`: `coreset.CoresetOptions`).

  One projection serves the discriminator and the coreset. With
  `reference_quirks` (and a discriminator, or an explicit coreset
  projection) the coreset runs on a second one, as the reference
  accidentally does, drawn from its own key so the default keys (and
  starts) stay as they are.
  """
  second = draws.coreset_projection
  if second is not None and not options.reference_quirks:
    raise ValueError("coreset_projection is used only with reference_quirks")
  first = draws.projection
  if first is None:
    first = denoise.make_projection(key, dim, options.projection_dim)
  if not options.reference_quirks or not (
      method.denoises or second is not None
  ):
    return _as_projection(first), None
  if second is None:
    second = denoise.make_projection(
        jax.random.fold_in(key, 1), dim, options.projection_dim
    )
  return _as_projection(first), _as_projection(second)


def weigh(
    reduced,
    shape,
    method: methods.Method,
    options: denoise.DenoiseOptions,
    placement: Placement,
):
  """(weights, outliers, soft weights, threshold) of the (N * P, d)
  projected patches of `shape` (N, P) (`options`:
  `denoise.DenoiseOptions`), or None for a method without a
  discriminator."""
  if not method.denoises:
    return None
  n, p = shape
  if n < 2:
    raise ValueError(
        f"{method.name} needs at least 2 training images to compare "
        f"patches across images, got {n}"
    )
  reduced = reduced.reshape(n, p, reduced.shape[-1])
  w = placement.patch_weights(reduced, method.discriminator, options)
  outliers, soft, t = denoise.denoise(w, options.noise_fraction)
  if placement.progress is not None and validation.is_concrete(w):
    jax.block_until_ready(w)
    placement.progress(methods.weights_stage(method))
  return w, outliers, soft, t


def select(
    points,
    key,
    sampling_weight,
    method: methods.Method,
    options,
    draws,
    kcenter,
):
  """The subsampler's (indices, valid) over `points` (`options`:
  `coreset.CoresetOptions`; `kcenter`: the greedy loop or None)."""
  extra = {}
  if method.subsampler == "greedy":
    extra = dict(unweighted_first=options.reference_quirks)
    if kcenter is not None:
      extra["kcenter_fn"] = kcenter
  return coreset.get_subsampler(method.subsampler)(
      points,
      coreset.num_samples(points.shape[0], options.fraction),
      key,
      sampling_weight=sampling_weight,
      num_starts=options.num_starts,
      starts=draws.starts,
      **extra,
  )


def gather(
    flat, soft, selection, method: methods.Method, options, geometry, take
):
  """The MemoryBank of the selected rows (`options`: `BankOptions`)."""
  idx, valid = selection
  rows = idx
  if validation.is_concrete(valid):
    rows = coreset.compact((idx, valid))
  sc = options.scoring
  use_soft = method.soft_weight if sc.soft_weight is None else sc.soft_weight
  return scoring.make_bank(
      take(flat, rows),
      soft[rows],
      soft_weight=use_soft,
      grid=geometry.grid,
      image_size=geometry.image_size,
      blur_sigma=sc.blur_sigma,
      search=sc.search,
  )


def check_features(feats) -> Tuple[int, int, int]:
  """(N, P, D) of training features; ValueError for a bad shape."""
  if feats.ndim != 3:
    raise ValueError(f"train features must be (N, P, D), got {feats.shape}")
  if feats.shape[0] < 1:
    raise ValueError("cannot fit a memory bank on 0 training images")
  return tuple(int(s) for s in feats.shape)


def fit_core(
    feats,
    key: jax.Array,
    method,
    options: methods.BankOptions = methods.BankOptions(),
    geometry: methods.BankGeometry = methods.BankGeometry(),
    draws: methods.Draws = methods.Draws(),
    placement: Placement = Placement(),
) -> Tuple[scoring.MemoryBank, methods.BankFit]:
  """project -> weigh -> select -> gather on (N, P, D) float32 features.

  Pure and jittable with the default `placement` (with `method` and the
  sizes static): under jit the bank has a fixed length and invalid coreset
  entries repeat the first pick, which never changes a nearest distance;
  called eagerly, invalid entries are dropped. `build_bank` is the driver.
  """
  method = methods.get_method(method)
  n, p, d = check_features(feats)
  geometry = geometry.resolve(p)
  validation.check_finite(
      feats, "training features", "the backbone weights or images are broken"
  )
  flat = feats.reshape(n * p, d)
  proj_key, coreset_key = jax.random.split(key)
  proj, second = draw_projections(proj_key, d, method, options.coreset, draws)
  reduced = placement.project(flat, proj)
  points = reduced if second is None else placement.project(flat, second)
  fit, weight, soft = {}, None, jnp.ones((n * p,), jnp.float32)
  weighed = weigh(reduced, (n, p), method, options.denoise, placement)
  if weighed is not None:
    w, outliers, soft, t = weighed
    weight = jnp.where(outliers, 0.0, 1.0).reshape(-1)
    soft = soft.reshape(-1)
    fit = dict(weights=w, outliers=outliers, threshold=t)
  selection = select(
      points,
      coreset_key,
      weight,
      method,
      options.coreset,
      draws,
      placement.kcenter,
  )
  bank = gather(
      flat, soft, selection, method, options, geometry, placement.take
  )
  return bank, methods.BankFit(*selection, **fit)


# --------------------------------------------------------------------------
# The eager driver.


def _pruned_kcenter(x, n_select, starts, w, first=None):
  """`kernels.kcenter_pruned` on concrete arrays, as a `coreset.greedy` loop."""
  if not validation.is_concrete(x) or not validation.is_concrete(w):
    raise ValueError("coreset_impl='pruned' runs eagerly, not under jit")
  host = lambda a: None if a is None else np.asarray(a)
  first = None if first is None else int(first)
  idx = kcenter_pruned.kcenter_pruned(
      host(x), int(n_select), host(starts), host(w), first=first
  )
  return jnp.asarray(idx, jnp.int32)


# Rows per projection chunk of host features: 64 MiB of 1024-d float32.
PROJECT_ROWS = 16384


def _project(flat, projection):
  """`denoise.project`; host arrays chunk by chunk, their pages released."""
  return denoise.project_chunked(
      flat, projection, PROJECT_ROWS, feature_store.release
  )


def _take_host(flat, rows):
  return feature_store.take(flat, np.asarray(rows))


def placement_for(
    feats, options: coreset.CoresetOptions, mesh=None, progress=None
) -> Placement:
  """Where `build_bank` runs the stages on `feats` (`options`:
  `coreset.CoresetOptions`): host features stay on the host (projected in
  chunks, only the selected rows gathered), a mesh splits the discriminator
  and the greedy over devices, and `coreset.resolve_impl` may pick the
  pruned host greedy."""
  n, p, _ = check_features(feats)
  eager = validation.is_concrete(feats)
  impl = coreset.resolve_impl(options.impl, n * p, eager, mesh)
  kcenter, weights = None, denoise.patch_weights
  if mesh is not None:
    kcenter = functools.partial(parallel.kcenter, mesh=mesh)
    weights = functools.partial(parallel.patch_weights, mesh=mesh)
  if impl == "pruned":
    kcenter = _pruned_kcenter
  host = isinstance(feats, np.ndarray)
  take = _take_host if host else _gather_rows
  return Placement(_project, weights, kcenter, take, progress)


def build_bank(
    feats,
    key: jax.Array,
    method,
    options: methods.BankOptions = methods.BankOptions(),
    geometry: methods.BankGeometry = methods.BankGeometry(),
    *,
    draws: methods.Draws = methods.Draws(),
    progress: Optional[Callable[[str], None]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Tuple[scoring.MemoryBank, methods.BankFit]:
  """Fits a memory bank on (N, P, D) training patch features: `fit_core`
  with the stages placed by `placement_for`.

  Args:
    feats: (N, P, D) patch features of the N training images. A numpy array
      (or a file-mapped one, `feature_store`) stays on the host: only its
      projection and the selected rows become device arrays, so the
      features (most of a fit's peak memory) are never copied.
    key: PRNG key; the projection and the coreset starts come from it.
    method: a `Method` or its name.
    options: the discriminator, coreset and scoring settings.
    geometry: the patch grid and the pixel maps' size stored in the bank.
    draws: explicit projections / coreset starts instead of the key's.
    progress: called with the name of the finished stage ('LOF weights')
      once the discriminator weights are computed, eagerly only.
    mesh: a device mesh (`parallel.resolve_mesh`): the discriminator runs
      split over patch positions and the greedy coreset over points, with
      the single-device results. Eager only.

  Returns:
    (MemoryBank, methods.BankFit), as `fit_core`.
  """
  method = methods.get_method(method)
  if isinstance(feats, np.ndarray):
    feats = np.asarray(feats, np.float32)
  else:
    feats = jnp.asarray(feats, jnp.float32)
  placement = placement_for(feats, options.coreset, mesh, progress)
  return fit_core(feats, key, method, options, geometry, draws, placement)
