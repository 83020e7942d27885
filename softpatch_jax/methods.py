"""Methods (discriminator, subsampler, soft weight) and `build_bank`.

A method is a small frozen record: which noise discriminator denoises the
training patches (None: no denoising, PatchCore), which subsampler picks the
memory bank, and whether test distances are re-weighted by the bank's outlier
weights. Adding a method touches one place: a `register_method` call here.

`build_bank` is SoftPatch's training stage (Jiang et al., NeurIPS 2022):
project the patch features to a small dimension, weight every
patch with the discriminator, drop the most outlying ``noise_fraction`` of
patches, and select the bank with the weighted greedy coreset on the same
projection. ``reference_quirks=True`` reproduces the official SoftPatch code
instead (a second projection for the coreset, an unweighted first pick).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import feature_store
from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.kernels import kcenter_pruned


@dataclasses.dataclass(frozen=True)
class Method:
  """name; discriminator (a `denoise.DISCRIMINATORS` key or None);
  subsampler (a `coreset.SUBSAMPLERS` key); soft_weight (re-weight scores)."""

  name: str
  discriminator: Optional[str]
  subsampler: str
  soft_weight: bool

  @property
  def denoises(self) -> bool:
    return self.discriminator is not None


METHODS: Dict[str, Method] = {}
# build_bank's default share of the patches kept in the bank.
CORESET_FRACTION = 0.1
# Short names accepted in configs.
ALIASES = {"softpatch": "softpatch_lof"}
# Evaluate-mode baselines without a memory bank (softpatch_jax.baselines),
# and the PaDiM image filter that 'padim_filter+<method>' runs before any
# method. They are names only here; build_bank never fits them.
BASELINES = ("padim", "cflow")
IMAGE_FILTER = "padim_filter"


def split_filter(name: str) -> Tuple[Optional[str], str]:
  """'padim_filter+patchcore' -> ('padim_filter', 'patchcore');
  'patchcore' -> (None, 'patchcore')."""
  head, plus, rest = str(name).partition("+")
  if plus and head == IMAGE_FILTER:
    return head, rest
  return None, str(name)


def is_baseline(name: str) -> bool:
  """True when the method after any image filter is a `BASELINES` one."""
  return split_filter(name)[1] in BASELINES


def _canonical(name) -> str:
  if isinstance(name, Method):
    return name.name
  filt, base = split_filter(name)
  if filt is not None and split_filter(base)[0] is not None:
    raise ValueError(f"method {name!r}: one image filter per method")
  if base not in BASELINES:
    base = get_method(base).name
  return base if filt is None else f"{filt}+{base}"


def register_method(method: Method) -> Method:
  """Adds `method` to `METHODS`; its discriminator and subsampler must exist."""
  if (
      method.discriminator is not None
      and method.discriminator not in denoise.DISCRIMINATORS
  ):
    raise ValueError(
        f"unknown discriminator {method.discriminator!r}; choose from "
        f"{sorted(denoise.DISCRIMINATORS)}"
    )
  coreset.get_subsampler(method.subsampler)
  METHODS[method.name] = method
  return method


register_method(Method("softpatch_lof", "lof", "greedy", True))
register_method(Method("softpatch_nearest", "nearest", "greedy", True))
register_method(Method("softpatch_gaussian", "gaussian", "greedy", True))
# LOF, nearest and Gaussian scores fused (config.denoise.fusion picks how),
# and one method per fusion mode, so a run can compare them.
register_method(Method("softpatch_fusion", "fusion", "greedy", True))
for _mode in denoise.FUSION_MODES:
  register_method(
      Method(f"softpatch_fusion_{_mode}", f"fusion_{_mode}", "greedy", True)
  )
register_method(Method("patchcore", None, "greedy", False))
register_method(Method("patchcore_random", None, "random", False))
# The full memory bank, no subsampling: an upper reference for small data.
register_method(Method("patchcore_full", None, "identity", False))


def get_method(name) -> Method:
  """A Method by name (or alias); a Method passes through."""
  if isinstance(name, Method):
    return name
  key = ALIASES.get(name, name)
  if key not in METHODS and (is_baseline(key) or split_filter(key)[0]):
    raise ValueError(
        f"method {name!r} runs in evaluate mode only: PaDiM, CFLOW and the "
        "padim_filter image filter have no memory bank to fit, save or "
        "load here; fit mode and saved models take one of "
        f"{', '.join(sorted(METHODS))}"
    )
  if key not in METHODS:
    raise ValueError(
        f"unknown method {name!r}; choose from "
        f"{sorted(METHODS) + sorted(ALIASES) + list(BASELINES)}, or "
        f"'{IMAGE_FILTER}+<method>'"
    )
  return METHODS[key]


def parse_methods(methods) -> List[str]:
  """A comma-separated string or a list of names -> canonical names."""
  if isinstance(methods, str):
    methods = [m.strip() for m in methods.split(",") if m.strip()]
  names = [_canonical(m) for m in methods]
  if not names:
    raise ValueError("config.methods is empty")
  return names


@flax.struct.dataclass
class BankFit:
  """What `build_bank` computed besides the bank, for diagnosis.

  Attributes:
    indices: (n,) selected patch indices into the N*P training patches.
    valid: (n,) which selected entries count (see `coreset`).
    weights: (N, P) discriminator weights, or None without denoising.
    noise: (N, P) patches flagged as noise, or None.
    threshold: the noise threshold on the weights, or None.
  """

  indices: jax.Array
  valid: jax.Array
  weights: Optional[jax.Array] = None
  noise: Optional[jax.Array] = None
  threshold: Optional[jax.Array] = None


def _grid_for(p: int, grid) -> Tuple[int, int]:
  if grid is not None:
    grid = tuple(int(g) for g in grid)
    if grid[0] * grid[1] != p:
      raise ValueError(f"grid {grid} does not hold {p} patches per image")
    return grid
  side = math.isqrt(p)
  if side * side != p:
    raise ValueError(f"pass grid=(h, w): {p} patches per image is not square")
  return side, side


def _weights_stage(method: Method) -> str:
  name = "LOF" if method.discriminator == "lof" else method.discriminator
  return f"{name} weights"


def describe_fit(
    method, n: int, p: int, coreset_fraction: float = CORESET_FRACTION
) -> str:
  """What `build_bank` computes on n images of p patches, for progress logs."""
  method = get_method(method)
  what = f"a bank of all {n * p} patches"
  if method.subsampler != "identity":
    k = coreset.num_samples(n * p, coreset_fraction)
    what = f"a {method.subsampler} coreset of {k} of {n * p} patches"
  if method.denoises:
    what = (
        f"{_weights_stage(method)} over {p} positions x {n} images, then {what}"
    )
  return what


def _as_projection(projection):
  """(W, b) as given, or W alone with a zero bias."""
  if isinstance(projection, (tuple, list)):
    return projection
  return (projection, jnp.zeros((projection.shape[1],), jnp.float32))


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
_PROJECT_ROWS = 16384


def _project(flat, projection):
  """`denoise.project`; host arrays chunk by chunk, their pages released."""
  return denoise.project_chunked(
      flat, projection, _PROJECT_ROWS, feature_store.release
  )


def build_bank(
    feats,
    key: jax.Array,
    method,
    *,
    noise_fraction: float = 0.15,
    coreset_fraction: float = CORESET_FRACTION,
    num_starts: int = 10,
    projection_dim: int = 128,
    lof_k: int = 6,
    fusion: str = "rank",
    soft_weight: Optional[bool] = None,
    grid=None,
    image_size=(224, 224),
    blur_sigma: float = 4.0,
    search: str = "auto",
    projection=None,
    starts=None,
    reference_quirks: bool = False,
    coreset_projection=None,
    progress: Optional[Callable[[str], None]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    coreset_impl: str = "auto",
) -> Tuple[scoring.MemoryBank, BankFit]:
  """Fits a memory bank on (N, P, D) training patch features.

  Args:
    feats: (N, P, D) patch features of the N training images.
    key: PRNG key; the projection and the coreset starts come from it.
    method: a `Method` or its name.
    noise_fraction: share of patches flagged as noise (denoising methods).
    coreset_fraction: share of patches kept in the bank.
    num_starts: random start points of the greedy coreset.
    projection_dim: dimension of the random projection.
    lof_k: neighbours of the LOF discriminator.
    fusion: how the 'fusion' discriminator normalises and combines its
      scores ('rank', 'zscore' or 'vote'; `denoise.fuse_scores`).
    soft_weight: overrides the method's re-weighting flag when not None.
    grid: (h, w) patch grid, h * w == P (default: square).
    image_size, blur_sigma: pixel-map geometry stored in the bank.
    search: the bank's nearest-neighbour search (scoring.MemoryBank).
    projection: an explicit projection, (W (D, d), b (d,)) or W alone,
      instead of drawing one from `key`.
    starts: explicit coreset start indices instead of drawing them.
    reference_quirks: reproduce two quirks of the official SoftPatch code:
      the coreset runs on a second, independent random projection (drawn
      from its own key, or `coreset_projection`), and the greedy
      subsampler's first pick ignores the sampling weight, so it may be a
      noise patch (`coreset.greedy`'s `unweighted_first`). Off: one
      projection serves both stages and noise never enters the bank.
      Methods without a discriminator are unchanged by it.
    coreset_projection: the explicit projection the coreset runs on with
      `reference_quirks`, in the forms of `projection`.
    progress: called with the name of the finished stage ('LOF weights')
      once the discriminator weights are computed (after waiting for them),
      on concrete inputs only, never under jit; for progress lines.
    mesh: a device mesh (`parallel.resolve_mesh`): the discriminator runs
      split over patch positions and the greedy coreset over points
      (`parallel`), with the single-device results. Eager only.
    coreset_impl: 'dense' (every point's distance per pick; the XLA or
      Pallas kernel), 'pruned' (`kernels.kcenter_pruned`: a numpy host
      loop that updates only the points that can become the next pick and
      skips the distances a bound clears; the picks of the float32 numpy
      greedy, which the dense kernels match but for ulp-level near-ties;
      eager and single-device only) or 'auto' (`coreset.resolve_impl`:
      pruned for eager CPU fits of >= 16384 patches, else dense).

  Returns:
    (MemoryBank, BankFit). Pure and jittable (with `method` and the sizes
    static): under jit the bank has a fixed length and invalid coreset
    entries repeat the first pick, which never changes a nearest distance;
    called eagerly, invalid entries are dropped.
  """
  method = get_method(method)
  # Host features stay on the host: only their projection and the selected
  # rows become device arrays, so the (N, P, D) features are never copied
  # (they are most of a fit's peak memory).
  host = isinstance(feats, np.ndarray)
  feats = (
      np.asarray(feats, np.float32) if host else jnp.asarray(feats, jnp.float32)
  )
  if feats.ndim != 3:
    raise ValueError(f"train features must be (N, P, D), got {feats.shape}")
  n, p, d = feats.shape
  if n < 1:
    raise ValueError("cannot fit a memory bank on 0 training images")
  grid = _grid_for(p, grid)
  validation.check_finite(
      feats, "training features", "the backbone weights or images are broken"
  )
  flat = feats.reshape(n * p, d)
  proj_key, coreset_key = jax.random.split(key)
  # One projection serves the noise discriminator and the coreset (the
  # reference accidentally draws a second one for the coreset; see
  # reference_quirks).
  if projection is None:
    projection = denoise.make_projection(proj_key, d, projection_dim)
  reduced = _project(flat, _as_projection(projection))
  coreset_input = reduced
  if coreset_projection is not None and not reference_quirks:
    raise ValueError("coreset_projection is used only with reference_quirks")
  # Without a discriminator the reference has one projection only.
  if reference_quirks and (method.denoises or coreset_projection is not None):
    if coreset_projection is None:
      # Its own key, so the default keys (and starts) stay as they are.
      coreset_projection = denoise.make_projection(
          jax.random.fold_in(proj_key, 1), d, projection_dim
      )
    coreset_input = _project(flat, _as_projection(coreset_projection))

  fit = {}
  sampling_weight = None
  soft = jnp.ones((n * p,), jnp.float32)
  if method.denoises:
    if n < 2:
      raise ValueError(
          f"{method.name} needs at least 2 training images to compare "
          f"patches across images, got {n}"
      )
    weights_fn = denoise.patch_weights
    if mesh is not None:
      weights_fn = functools.partial(parallel.patch_weights, mesh=mesh)
    w = weights_fn(
        reduced.reshape(n, p, reduced.shape[-1]),
        method.discriminator,
        lof_k=lof_k,
        fusion=fusion,
        noise_fraction=noise_fraction,
    )
    noise, soft, t = denoise.denoise(w, noise_fraction)
    sampling_weight = jnp.where(noise, 0.0, 1.0).reshape(-1)
    soft = soft.reshape(-1)
    fit = dict(weights=w, noise=noise, threshold=t)
    if progress is not None and validation.is_concrete(w):
      jax.block_until_ready(w)
      progress(_weights_stage(method))

  n_select = coreset.num_samples(n * p, coreset_fraction)
  extra = {}
  if reference_quirks and method.subsampler == "greedy":
    extra = dict(unweighted_first=True)
  if mesh is not None and method.subsampler == "greedy":
    extra["kcenter_fn"] = functools.partial(parallel.kcenter, mesh=mesh)
  impl = coreset.resolve_impl(coreset_impl, coreset_input, mesh)
  if impl == "pruned" and method.subsampler == "greedy":
    extra["kcenter_fn"] = _pruned_kcenter
  idx, valid = coreset.get_subsampler(method.subsampler)(
      coreset_input,
      n_select,
      coreset_key,
      sampling_weight=sampling_weight,
      num_starts=num_starts,
      starts=starts,
      **extra,
  )
  rows = idx
  if validation.is_concrete(valid):
    rows = coreset.compact((idx, valid))
  if host:
    rows = np.asarray(rows)
  use_soft = method.soft_weight if soft_weight is None else bool(soft_weight)
  bank = scoring.make_bank(
      feature_store.take(flat, rows),
      soft[rows],
      soft_weight=use_soft,
      grid=grid,
      image_size=image_size,
      blur_sigma=blur_sigma,
      search=search,
  )
  return bank, BankFit(indices=idx, valid=valid, **fit)
