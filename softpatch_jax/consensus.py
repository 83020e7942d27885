"""Consensus nearest neighbours: a patch is normal when several images agree.

PatchCore scores a test patch by its distance to the single nearest training
patch. When a defective image sits in the training set, its defect patches
are in the bank, and a test patch showing that defect finds itself there: in
the overlap protocol (the injected images are also test images) the
distance is exactly 0, and soft weights cannot lift 0 (SoftPatch, Jiang et
al., NeurIPS 2022, Sec. 4.1, Table 6).

The consensus score asks more than one image. For a test patch it takes the
distance to the closest patch of *each* training image (anywhere in it) and
keeps the k-th smallest of those per-image (squared) distances. A normal test patch
has close matches in most training images, so the k-th distance stays small.
A defect has close matches only in the few training images that share it;
with k larger than that number its score is the distance to a normal
image. The bank keeps every training patch (no coreset: a k-center coreset
keeps one representative of each pattern and so removes exactly the
agreement the score counts), so a fit costs nothing and a test patch costs
N * P distances, for N training images of P patches.

k is fixed a priori (3: a patch must be matched in three other images); it
needs N > k training images. The image score is the maximum over patches,
the pixel map the patch scores upsampled and blurred (`pixel_maps`), as for
every memory bank.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import pixel_maps
from softpatch_jax import scoring
from softpatch_jax import settings
from softpatch_jax import validation

_HIGHEST = jax.lax.Precision.HIGHEST
# Elements of one (queries, bank rows) distance block; bounds peak memory.
_BLOCK_ELEMS = 1 << 24


@dataclasses.dataclass(frozen=True)
class ConsensusOptions:
  """config.consensus. k: the per-image distance kept (1 = PatchCore on the
  full bank); it must be below the number of training images."""

  k: int = 3

  def __post_init__(self):
    settings.set_field(self, "k", settings.check_int(self.k, "consensus.k", 1))


@flax.struct.dataclass
class ConsensusModel:
  """Every training patch, image by image: features (N, P, D)."""

  features: jax.Array
  k: int = flax.struct.field(pytree_node=False)
  grid: Tuple[int, int] = flax.struct.field(pytree_node=False)
  image_size: Tuple[int, int] = flax.struct.field(pytree_node=False)
  blur_sigma: float = flax.struct.field(pytree_node=False)

  @property
  def n_images(self) -> int:
    return int(self.features.shape[0])


def fit(
    train_feats,
    options: ConsensusOptions,
    grid,
    image_size,
    blur_sigma: float = scoring.ScoringOptions.blur_sigma,
) -> ConsensusModel:
  """The model of (N, P, D) training features; N must exceed options.k."""
  feats = jnp.asarray(train_feats, jnp.float32)
  if feats.ndim != 3:
    raise ValueError(f"train features must be (N, P, D), got {feats.shape}")
  n, p, _ = feats.shape
  if n <= options.k:
    raise ValueError(
        f"consensus scoring with k={options.k} needs more than {options.k} "
        f"training images, got {n}: add images or lower "
        "--config.consensus.k"
    )
  grid = tuple(int(g) for g in grid)
  if grid[0] * grid[1] != p:
    raise ValueError(f"grid {grid} does not hold {p} patches per image")
  validation.check_finite(feats, "training features")
  size = tuple(int(s) for s in image_size)
  return ConsensusModel(feats, int(options.k), grid, size, float(blur_sigma))


def per_image_distances(bank: jax.Array, queries: jax.Array) -> jax.Array:
  """(N, P, D) bank, (Q, D) queries -> (Q, N): the squared distance from
  each query to the closest patch of each bank image (squared, as the
  memory banks' nearest-neighbour scores are: `scoring`)."""
  n, p, d = bank.shape
  flat = bank.reshape(n * p, d)
  sq = jnp.sum(flat * flat, axis=-1)
  q_rows = queries.shape[0]
  block = int(max(1, min(q_rows, _BLOCK_ELEMS // max(1, n * p))))
  pad = -q_rows % block
  qs = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, block, d)

  def one(q):
    g = jnp.matmul(q, flat.T, precision=_HIGHEST)
    d2 = jnp.sum(q * q, axis=-1)[:, None] + sq[None, :] - 2.0 * g
    return jnp.maximum(jnp.min(d2.reshape(-1, n, p), -1), 0.0)

  return jax.lax.map(one, qs).reshape(-1, n)[:q_rows]


def kth_smallest(x: jax.Array, k: int) -> jax.Array:
  """The k-th smallest entry (1-based) along the last axis."""
  return -jax.lax.top_k(-x, k)[0][..., k - 1]


@jax.jit
def patch_scores(model: ConsensusModel, feats: jax.Array) -> jax.Array:
  """(B, P, D) test features -> (B, P) consensus scores: the k-th smallest
  squared per-image distance."""
  b, p, d = feats.shape
  dist = per_image_distances(model.features, feats.reshape(b * p, d))
  return kth_smallest(dist, model.k).reshape(b, p)


@jax.jit
def score(model: ConsensusModel, feats: jax.Array):
  """(B, P, D) features -> (image scores (B,), pixel maps (B, H, W))."""
  s = patch_scores(model, feats)
  maps = pixel_maps.anomaly_maps(
      s, model.grid, model.image_size, model.blur_sigma
  )
  return s.max(axis=-1), maps


@dataclasses.dataclass(frozen=True)
class ConsensusScorer:
  """A fitted consensus model in the one prediction loop (`inference`)."""

  source: ClassVar[str] = "features"
  model: ConsensusModel

  def __call__(self, feats) -> tuple:
    return score(self.model, jnp.asarray(feats))

  @property
  def positions(self) -> int:
    return int(np.prod(self.model.grid))
