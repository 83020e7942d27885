"""Methods (discriminator, subsampler, soft weight): the method registry.

A method is a small frozen record in the `METHODS` registry. Memory-bank
methods (family 'bank') name the discriminator that weights the training
patches (None: no denoising, PatchCore), the subsampler that picks the bank,
and whether test distances are re-weighted by the bank's outlier weights.
The baselines PaDiM and CFLOW are entries of their own families ('padim',
'cflow'; softpatch_jax.baselines fits them). Adding a method touches one
place: a `register_method` call here.

The records of a memory-bank fit live here too (`BankOptions`,
`BankGeometry`, `Draws`, `BankFit`); `banks.build_bank` fits a bank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import flax
import jax

from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import mutual  # registers the 'mutual' discriminator
from softpatch_jax import registry
from softpatch_jax import scoring

BANK = "bank"
# Scores patch features against every training patch (`consensus`).
CONSENSUS = "consensus"


@dataclasses.dataclass(frozen=True)
class Method:
  """name; discriminator (a `denoise.DISCRIMINATORS` key or None);
  subsampler (a `coreset.SUBSAMPLERS` key; None outside the 'bank'
  family); soft_weight (re-weight scores); family: 'bank' for memory-bank
  methods, else the baseline fitter that fits it ('padim', 'cflow')."""

  name: str
  discriminator: Optional[str]
  subsampler: Optional[str]
  soft_weight: bool
  family: str = BANK

  @property
  def denoises(self) -> bool:
    return self.discriminator is not None


METHODS: registry.Registry[Method] = registry.Registry("method")
# Short names accepted in configs.
ALIASES = {"softpatch": "softpatch_lof"}
# The PaDiM image filter that 'padim_filter+<method>' runs before a method.
IMAGE_FILTER = "padim_filter"


def split_filter(name: str) -> Tuple[Optional[str], str]:
  """'padim_filter+patchcore' -> ('padim_filter', 'patchcore');
  'patchcore' -> (None, 'patchcore')."""
  head, plus, rest = str(name).partition("+")
  if plus and head == IMAGE_FILTER:
    return head, rest
  return None, str(name)


def is_baseline(name: str) -> bool:
  """True when the method after any image filter is not a bank method."""
  base = split_filter(name)[1]
  return base in METHODS and METHODS.get(base).family != BANK


def scores_features(name) -> bool:
  """True for the methods that score patch features (memory banks and
  consensus), False for those on raw tap maps (PaDiM, CFLOW)."""
  return family(name) in (BANK, CONSENSUS)


def family(name) -> str:
  """The family of method `name` ('padim_filter+cflow': 'cflow')."""
  base = split_filter(name)[1]
  return get_method(base, bank_only=False).family


def bank_methods() -> List[str]:
  """The names of the memory-bank methods (fit mode, saved models)."""
  return [n for n, m in METHODS.items() if m.family == BANK]


def baselines() -> List[str]:
  """The names of the registered baseline methods (evaluate mode only)."""
  return [n for n, m in METHODS.items() if m.family != BANK]


def _canonical(name) -> str:
  if isinstance(name, Method):
    return name.name
  filt, base = split_filter(name)
  if filt is not None and split_filter(base)[0] is not None:
    raise ValueError(f"method {name!r}: one image filter per method")
  if not is_baseline(base):
    base = get_method(base).name
  return base if filt is None else f"{filt}+{base}"


def register_method(method: Method) -> Method:
  """Adds `method` to `METHODS`; a bank method's discriminator and
  subsampler must exist."""
  if method.family == BANK:
    if method.discriminator is not None:
      denoise.DISCRIMINATORS.get(method.discriminator)
    coreset.get_subsampler(method.subsampler)
  return METHODS.register(method.name, method)


register_method(Method("softpatch_lof", "lof", "greedy", True))
register_method(Method("softpatch_nearest", "nearest", "greedy", True))
register_method(Method("softpatch_gaussian", "gaussian", "greedy", True))
# LOF, nearest and Gaussian scores fused (config.denoise.fusion picks how),
# and one method per fusion mode, so a run can compare them.
register_method(Method("softpatch_fusion", "fusion", "greedy", True))
# Every patch against every other image, anywhere in it (`mutual`).
register_method(Method("softpatch_mutual", "mutual", "greedy", True))
for _mode in denoise.FUSION_MODES:
  register_method(
      Method(f"softpatch_fusion_{_mode}", f"fusion_{_mode}", "greedy", True)
  )
register_method(Method("patchcore", None, "greedy", False))
register_method(Method("patchcore_random", None, "random", False))
# The full memory bank, no subsampling: an upper reference for small data.
register_method(Method("patchcore_full", None, "identity", False))
# Evaluate-mode baselines without a memory bank (softpatch_jax.baselines).
register_method(Method("padim", None, None, False, family="padim"))
register_method(Method("cflow", None, None, False, family="cflow"))
# Consensus nearest neighbours over the full bank (evaluate mode).
register_method(Method("consensus", None, None, False, family=CONSENSUS))


def get_method(name, *, bank_only: bool = True) -> Method:
  """A Method by name (or alias); a Method passes through.

  With `bank_only` (fit mode, saved models) the baselines and image-filter
  names are refused: they have no memory bank.
  """
  if isinstance(name, Method):
    return name
  key = ALIASES.get(name, name)
  if split_filter(key)[0] or (bank_only and is_baseline(key)):
    raise ValueError(
        f"method {name!r} runs in evaluate mode only: PaDiM, CFLOW, "
        "consensus and the padim_filter image filter have no memory bank "
        "to fit, save or load here; fit mode and saved models take one of "
        f"{', '.join(bank_methods())}"
    )
  if key not in METHODS:
    raise ValueError(
        f"unknown method {name!r}; choose from "
        f"{bank_methods() + sorted(ALIASES) + baselines()}, or "
        f"'{IMAGE_FILTER}+<method>'"
    )
  return METHODS.get(key)


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
    outliers: (N, P) patches flagged as outlier patches, or None.
    threshold: the outlier threshold on the weights, or None.
  """

  indices: jax.Array
  valid: jax.Array
  weights: Optional[jax.Array] = None
  outliers: Optional[jax.Array] = None
  threshold: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class BankOptions:
  """The settings of a fit: the discriminator, the coreset and the bank's
  scoring (`soft_weight`, `blur_sigma`, `search` are stored in the bank)."""

  denoise: denoise.DenoiseOptions = dataclasses.field(
      default_factory=denoise.DenoiseOptions
  )
  coreset: coreset.CoresetOptions = dataclasses.field(
      default_factory=coreset.CoresetOptions
  )
  scoring: scoring.ScoringOptions = dataclasses.field(
      default_factory=scoring.ScoringOptions
  )


@dataclasses.dataclass(frozen=True)
class BankGeometry:
  """grid: the (h, w) patch grid, h * w == P (None: square); image_size:
  the (H, W) network input, the size of the pixel maps."""

  grid: Optional[Tuple[int, int]] = None
  image_size: Tuple[int, int] = (224, 224)

  def resolve(self, p: int) -> BankGeometry:
    """This geometry with the grid of P patches per image filled in."""
    size = tuple(int(s) for s in self.image_size)
    if self.grid is not None:
      grid = tuple(int(g) for g in self.grid)
      if grid[0] * grid[1] != p:
        raise ValueError(f"grid {grid} does not hold {p} patches per image")
      return BankGeometry(grid, size)
    side = math.isqrt(p)
    if side * side != p:
      raise ValueError(f"pass grid=(h, w): {p} patches per image is not square")
    return BankGeometry((side, side), size)


@dataclasses.dataclass(frozen=True)
class Draws:
  """Explicit random draws instead of those from the fit's key (tests and
  reference parity). projection: (W (D, d), b (d,)) or W alone; starts:
  the coreset's start indices; coreset_projection: the projection the
  coreset runs on with `reference_quirks`, in the forms of `projection`."""

  projection: Any = None
  starts: Any = None
  coreset_projection: Any = None


def weights_stage(method: Method) -> str:
  name = "LOF" if method.discriminator == "lof" else method.discriminator
  return f"{name} weights"


def describe_fit(
    method,
    n: int,
    p: int,
    options: coreset.CoresetOptions = coreset.CoresetOptions(),
) -> str:
  """What `build_bank` computes on n images of p patches, for progress logs."""
  method = get_method(method)
  what = f"a bank of all {n * p} patches"
  if method.subsampler != "identity":
    k = coreset.num_samples(n * p, options.fraction)
    what = f"a {method.subsampler} coreset of {k} of {n * p} patches"
  if method.denoises:
    what = (
        f"{weights_stage(method)} over {p} positions x {n} images, then {what}"
    )
  return what
