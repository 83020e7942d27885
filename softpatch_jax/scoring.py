"""The memory bank and THE scoring function: kNN patch scores, image scores, maps.

SoftPatch scoring (Jiang et al., NeurIPS 2022; README, "The research API"):
every test patch feature is matched to its nearest memory-bank feature by
*squared* L2 distance (what faiss ``IndexFlatL2`` returns, and so what the
reference scores with). With soft weighting on, the distance is multiplied by
the outlier weight of the matched bank patch. The image score is the max over
its patches; the pixel map is the patch-score grid bilinearly upsampled
(``align_corners=False``) and blurred with a Gaussian of sigma 4 (scipy
``gaussian_filter`` semantics: reflect padding, truncate 4).

`score` is the one scoring path: evaluation, threshold fitting and the predict
command all call it, with a search strategy (`SEARCH_STRATEGIES`) that
`choose_search` picks at the edge: the dense kNN in one program (the
default, jittable), in chunks under a memory budget (the same result, bit
for bit when chunks are whole kNN tiles, see `chunk_plan`), the exact
pruned host search for large banks on CPU (`kernels/knn_pruned.py`), or
sharded over a device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import parallel
from softpatch_jax import pixel_maps
from softpatch_jax import registry
from softpatch_jax import settings
from softpatch_jax import validation
from softpatch_jax.kernels import knn as knn_lib
from softpatch_jax.kernels import knn_pruned

SEARCHES = ("auto", "dense", "pruned")
# 'auto' picks the pruned host search from this size on: below it the dense
# product is short anyway, and the bound needs features much wider than its
# projection (knn_pruned.PROJ_DIM) to save work.
PRUNED_MIN_ROWS = 4096
# Blur sigmas from here on are refused: the blur matrix would be all border.
MAX_BLUR_SIGMA = 1e4
PRUNED_MIN_DIM = 512


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """config.scoring: test-time scoring.

  soft_weight: re-weight nearest distances by the bank's outlier weights;
    None: the method's own choice (on for softpatch_*, off for patchcore*).
  blur_sigma: sigma of the Gaussian over the pixel maps, in [0, 1e4).
  memory_budget_mb: a bank larger than this many MiB is scanned in chunks
    (same scores, bounded memory); 0: no limit.
  search: nearest-neighbour search at test time (`SEARCHES`, stored in the
    bank): 'auto' the pruned host search (`PrunedSearch`, about 3x faster
    on CPU, README "Benchmarks") for banks of >= 4096 rows on CPU, else the
    dense kNN; 'dense' or 'pruned' force one (see `choose_search`).
  """

  soft_weight: Optional[bool] = None
  blur_sigma: float = 4.0
  memory_budget_mb: float = 1024.0
  search: str = "auto"

  def __post_init__(self):
    if self.soft_weight is not None:
      settings.set_field(self, "soft_weight", bool(self.soft_weight))
    sigma = settings.check_float(
        self.blur_sigma, "scoring.blur_sigma", 0.0, MAX_BLUR_SIGMA, hi_open=True
    )
    settings.set_field(self, "blur_sigma", sigma)
    budget = settings.check_float(
        self.memory_budget_mb, "scoring.memory_budget_mb", 0.0
    )
    settings.set_field(self, "memory_budget_mb", budget)
    settings.check_choice(self.search, "scoring.search", SEARCHES)

  def max_bank_rows(self, dim: int) -> Optional[int]:
    """The memory budget as rows of `dim` features (None: no limit)."""
    return rows_for_budget(dim, self.memory_budget_mb)


@flax.struct.dataclass
class MemoryBank:
  """A fitted memory bank: a pytree, so it can be passed through `jax.jit`.

  Attributes:
    features: (M, D) bank patch features (the full-dimensional features, not
      the 128-d projection used to select them).
    weights: (M,) outlier weights of the bank patches (LOF / nearest /
      gaussian score, clipped at 0); all ones for PatchCore.
    soft_weight: multiply nearest distances by the matched bank weight.
    grid: (h, w) patch grid of one image.
    image_size: (H, W) of the network input, the size of the pixel maps.
    blur_sigma: sigma of the Gaussian applied to the pixel maps.
    search: 'dense', 'pruned' or 'auto': what `choose_search` runs.
  """

  features: jax.Array
  weights: jax.Array
  soft_weight: bool = flax.struct.field(pytree_node=False, default=True)
  grid: Tuple[int, int] = flax.struct.field(pytree_node=False, default=(28, 28))
  image_size: Tuple[int, int] = flax.struct.field(
      pytree_node=False, default=(224, 224)
  )
  blur_sigma: float = flax.struct.field(
      pytree_node=False, default=ScoringOptions.blur_sigma
  )
  search: str = flax.struct.field(pytree_node=False, default="auto")

  @property
  def size(self) -> int:
    return int(self.features.shape[0])


def make_bank(
    features,
    weights=None,
    *,
    soft_weight=True,
    grid=(28, 28),
    image_size=(224, 224),
    blur_sigma=ScoringOptions.blur_sigma,
    features_on_host=False,
    search=ScoringOptions.search,
) -> MemoryBank:
  """Builds a MemoryBank, checking shapes.

  With `features_on_host`, the features stay a numpy array: a chunked
  `score` then moves one chunk at a time to the device.
  """
  features = (np.asarray if features_on_host else jnp.asarray)(
      features, np.float32
  )
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(
        f"memory bank features must have shape (M>0, D), got {features.shape}"
    )
  if weights is None:
    weights = jnp.ones((features.shape[0],), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (features.shape[0],):
    raise ValueError(
        "memory bank weights must have shape "
        f"({features.shape[0]},), got {weights.shape}"
    )
  if blur_sigma is None or not float(blur_sigma) >= 0:
    raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma!r}")
  if search not in SEARCHES:
    raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
  grid, image_size = (tuple(int(v) for v in t) for t in (grid, image_size))
  meta = (bool(soft_weight), grid, image_size, float(blur_sigma), str(search))
  return MemoryBank(features, weights, *meta)


def _nearest(bank_feats, queries, block_n=None, block_q=None):
  d, i = knn_lib.knn(queries, bank_feats, k=1, block_n=block_n, block_q=block_q)
  return d[:, 0], i[:, 0]


def _soft(dist, idx, weights, soft):
  return dist * weights[idx] if soft else dist


# Re-exported: the maps of every method (`pixel_maps`).
anomaly_maps = pixel_maps.anomaly_maps


def _outputs(scores, grid, image_size, sigma):
  return jnp.max(scores, axis=-1), anomaly_maps(scores, grid, image_size, sigma)


@jax.jit
def _score_whole(bank: MemoryBank, feats):
  """One compiled program: nearest neighbours, soft weights, max, maps."""
  b, p, d = feats.shape
  dist, idx = _nearest(bank.features, feats.reshape(b * p, d))
  scores = _soft(dist, idx, bank.weights, bank.soft_weight).reshape(b, p)
  img, maps = _outputs(scores, bank.grid, bank.image_size, bank.blur_sigma)
  return img, maps, scores


@jax.jit
def _merge(best_d, best_i, d, i, offset):
  # Strictly smaller only: on a tie the earlier chunk (lower bank index)
  # wins, as in one unchunked argmin.
  better = d < best_d
  return jnp.where(better, d, best_d), jnp.where(better, i + offset, best_i)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _outputs_jit(scores, grid, image_size, sigma):
  return _outputs(scores, grid, image_size, sigma)


def rows_for_budget(dim: int, memory_budget_mb: Optional[float]):
  """Bank rows of `dim` float32 features that fit a budget; None: no limit."""
  if memory_budget_mb is None or float(memory_budget_mb) <= 0:
    return None
  return max(1, int(float(memory_budget_mb) * 2**20) // (4 * int(dim)))


def chunk_plan(m: int, max_bank_rows: Optional[int]):
  """(chunk_rows, tile_rows) for a bank of m rows, or None: no chunking.

  The kNN kernel scans the bank in tiles. Chunks are whole multiples of the
  tile an unchunked scan uses, so every distance comes from the same tile
  computation and the nearest neighbours and distances are bit-identical to
  the unchunked ones (tested). Only a limit below one tile (1024 rows, 4 MiB
  for 1024-d features) needs smaller tiles; the nearest neighbours are then
  the same and the distances equal to float rounding (~1e-7 relative).
  """
  if max_bank_rows is None or int(max_bank_rows) >= m:
    return None
  rows = int(max_bank_rows)
  if rows < 1:
    raise ValueError(f"max_bank_rows must be >= 1, got {max_bank_rows}")
  tile = int(knn_lib.default_blocks(1, m, 1)[1])
  if rows >= tile:
    return (rows // tile) * tile, tile
  tile = max(8, (rows // 8) * 8)
  return tile, tile


# --------------------------------------------------------------------------
# Search strategies: how `score` finds every test patch's nearest bank row.
# Each has a `name` (recorded in results) and `score(bank, feats)` -> (image
# scores, maps, patch scores); `choose_search` picks one at the edge.

SEARCH_STRATEGIES = registry.Registry("search strategy")


def _register(cls):
  return SEARCH_STRATEGIES.register(cls.name, cls)


def _finish(bank: MemoryBank, scores):
  """(image scores, maps, patch scores) of (B, P) patch scores."""
  img, maps = _outputs_jit(
      scores, bank.grid, bank.image_size, float(bank.blur_sigma)
  )
  return img, maps, scores


def _scores_outputs(bank: MemoryBank, dist, idx, shape):
  return _finish(
      bank, _soft(dist, idx, bank.weights, bank.soft_weight).reshape(shape)
  )


@_register
@dataclasses.dataclass(frozen=True)
class DenseSearch:
  """The dense blocked kNN (XLA or Pallas) of the whole bank in one
  program: jittable, the default."""

  name: ClassVar[str] = "dense"

  def score(self, bank: MemoryBank, feats):
    return _score_whole(bank, feats)


@_register
@dataclasses.dataclass(frozen=True)
class ChunkedSearch:
  """The dense kNN over chunks of at most `max_bank_rows` bank rows
  (`chunk_plan`), so a bank over a memory budget is never multiplied
  against the queries at once; the nearest rows of one scan. Jittable (the
  chunks become one program); None or a bank within the limit: one scan."""

  name: ClassVar[str] = "chunked"
  max_bank_rows: Optional[int] = None

  def score(self, bank: MemoryBank, feats):
    m = bank.features.shape[0]
    plan = chunk_plan(m, self.max_bank_rows)
    if plan is None:
      return _score_whole(bank, feats)
    rows, tile = plan
    b, p, d = feats.shape
    q = feats.reshape(b * p, d)
    best_d = jnp.full((b * p,), jnp.inf, jnp.float32)
    best_i = jnp.zeros((b * p,), jnp.int32)
    for start in range(0, m, rows):
      dist, idx = _nearest(bank.features[start : start + rows], q, tile)
      best_d, best_i = _merge(best_d, best_i, dist, idx, jnp.int32(start))
    # Nearest distances are bit-identical to one scan when chunks are whole
    # tiles; the maps then agree to float rounding (a separate program).
    return _scores_outputs(bank, best_d, best_i, (b, p))


@_register
@dataclasses.dataclass(frozen=True)
class PrunedSearch:
  """The exact pruned host search (kernels/knn_pruned.py): the dense kNN's
  nearest rows to float rounding, about 3x faster on CPU, a copy of the
  bank in host memory. Traced (under jit) it runs the dense scan."""

  name: ClassVar[str] = "pruned"

  def score(self, bank: MemoryBank, feats):
    if not all(map(validation.is_concrete, (feats, bank.features))):
      return _score_whole(bank, feats)
    b, p, d = feats.shape
    index = knn_pruned.cached_index(bank.features)
    dist, idx = knn_pruned.nearest(index, np.asarray(feats).reshape(b * p, d))
    weights = np.asarray(bank.weights)
    scores = jnp.asarray(_soft(dist, idx, weights, bank.soft_weight))
    return _finish(bank, scores.reshape(b, p))


@_register
@dataclasses.dataclass(frozen=True)
class ShardedSearch:
  """The bank split over the devices of `mesh` (`parallel.nearest`): each
  scans its slice, a global merge keeps the nearest row; one device's
  scores, bit for bit, 1/n of the bank per device. Eager only."""

  name: ClassVar[str] = "sharded"
  mesh: Optional[jax.sharding.Mesh] = None

  def score(self, bank: MemoryBank, feats):
    if self.mesh is None:
      raise ValueError("the 'sharded' search needs a device mesh")
    b, p, d = feats.shape
    dist, idx = parallel.nearest(
        bank.features, feats.reshape(b * p, d), self.mesh, _nearest
    )
    return _scores_outputs(bank, jnp.asarray(dist), jnp.asarray(idx), (b, p))


def _host_search(bank: MemoryBank, plan) -> bool:
  """True where the pruned host search serves `bank` (MemoryBank.search)."""
  if bank.search == "dense" or not validation.is_concrete(bank.features):
    return False  # traced (under jit): the dense kNN, the same nearest rows
  if bank.search == "pruned":
    return True
  m, d = bank.features.shape
  return (
      plan is None
      and jax.default_backend() == "cpu"
      and m >= PRUNED_MIN_ROWS
      and d >= PRUNED_MIN_DIM
  )


def choose_search(
    bank: MemoryBank,
    options: ScoringOptions = ScoringOptions(),
    mesh: Optional[jax.sharding.Mesh] = None,
):
  """The search strategy for `bank` (decided at the edge, eagerly).

  With a mesh: `ShardedSearch`. Else the bank's `search` ('pruned'; 'auto':
  pruned on CPU for banks of >= PRUNED_MIN_ROWS rows of >= PRUNED_MIN_DIM
  dims that need no chunking), then `ChunkedSearch` when the bank is over
  `options.memory_budget_mb`, else `DenseSearch`.
  """
  if mesh is not None:
    return ShardedSearch(mesh)
  m, d = bank.features.shape
  max_rows = options.max_bank_rows(d)
  plan = chunk_plan(m, max_rows)
  if _host_search(bank, plan):
    return PrunedSearch()
  if plan is None:
    return DenseSearch()
  return ChunkedSearch(max_rows)


def _as_strategy(search):
  if search is None:
    return DenseSearch()
  if isinstance(search, str):
    return SEARCH_STRATEGIES.get(search)()
  return search


def _check_feats(bank: MemoryBank, feats) -> None:
  d = bank.features.shape[1]
  if feats.ndim != 3 or feats.shape[-1] != d:
    raise ValueError(
        f"features must have shape (B, P, {d}) for this memory bank, got "
        f"{tuple(feats.shape)}"
    )
  p = feats.shape[1]
  if p != bank.grid[0] * bank.grid[1]:
    raise ValueError(
        f"features have {p} patches per image, but the bank's grid "
        f"{bank.grid} has {bank.grid[0] * bank.grid[1]}"
    )


def score(bank: MemoryBank, feats, search=None):
  """Scores test patch features against a memory bank.

  Args:
    bank: the fitted memory bank.
    feats: (B, P, D) test patch features, P = grid[0] * grid[1].
    search: a search strategy (`choose_search`; a `SEARCH_STRATEGIES` object
      or name); None: `DenseSearch`, one compiled scan of the whole bank.

  Returns:
    (image scores (B,), pixel maps (B, H, W), patch scores (B, P)).

  Pure and jittable with the dense and chunked searches: under `jax.jit`
  the chunks become one program and the whole bank lives on the device;
  called eagerly, only one chunk of a chunked bank is multiplied against
  the queries at a time.
  """
  feats = jnp.asarray(feats, jnp.float32)
  _check_feats(bank, feats)
  return _as_strategy(search).score(bank, feats)
