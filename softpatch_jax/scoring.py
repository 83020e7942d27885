"""Scoring: memory bank, nearest-neighbour patch scores, image scores, pixel maps.

Data flow (DESIGN §1.6): every test patch feature is matched to its nearest
memory-bank feature by *squared* L2 distance (what faiss ``IndexFlatL2``
returns, and so what the reference scores with). With soft weighting on, the
distance is multiplied by the outlier weight of the matched bank patch. The
image score is the max over its patches; the pixel map is the patch-score grid
bilinearly upsampled (``align_corners=False``) and blurred with a Gaussian of
sigma 4 (scipy ``gaussian_filter`` semantics: reflect padding, truncate 4).
"""

from __future__ import annotations

import functools
from typing import Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import features
from softpatch_jax import kernels


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
  """
  features: jax.Array
  weights: jax.Array
  soft_weight: bool = flax.struct.field(pytree_node=False, default=True)
  grid: Tuple[int, int] = flax.struct.field(pytree_node=False, default=(28, 28))
  image_size: Tuple[int, int] = flax.struct.field(
      pytree_node=False, default=(224, 224))
  blur_sigma: float = flax.struct.field(pytree_node=False, default=4.0)

  @property
  def size(self) -> int:
    return int(self.features.shape[0])


def make_bank(features, weights=None, *, soft_weight=True, grid=(28, 28),
              image_size=(224, 224), blur_sigma=4.0) -> MemoryBank:
  """Builds a MemoryBank, checking shapes and finiteness."""
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(
        f"memory bank features must have shape (M>0, D), got {features.shape}")
  if weights is None:
    weights = jnp.ones((features.shape[0],), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (features.shape[0],):
    raise ValueError(f"memory bank weights must have shape "
                     f"({features.shape[0]},), got {weights.shape}")
  return MemoryBank(features=features, weights=weights,
                    soft_weight=bool(soft_weight),
                    grid=tuple(int(g) for g in grid),
                    image_size=tuple(int(s) for s in image_size),
                    blur_sigma=float(blur_sigma))


def patch_scores(bank: MemoryBank, feats: jax.Array):
  """Per-patch anomaly scores.

  Args:
    bank: the fitted memory bank.
    feats: (B, P, D) test patch features.

  Returns:
    (scores (B, P), nearest bank index (B, P)).
  """
  if feats.ndim != 3 or feats.shape[-1] != bank.features.shape[-1]:
    raise ValueError(
        f"test features must have shape (B, P, {bank.features.shape[-1]}), "
        f"got {feats.shape}")
  return kernels.score_images(bank.features, bank.weights, feats,
                              soft=bank.soft_weight)


def _gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """(n, n) matrix applying scipy.ndimage.gaussian_filter1d (mode='reflect').

  Writing the blur as a dense matrix keeps it exact at the borders (scipy's
  'reflect' is the half-sample symmetric extension) and turns it into two
  small matmuls, which XLA runs fast on every backend.
  """
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  phi = np.exp(-0.5 * (x / sigma) ** 2)
  phi /= phi.sum()
  m = np.zeros((n, n), np.float64)
  for o in range(n):
    for t, wgt in zip(range(o - radius, o + radius + 1), phi):
      # Half-sample symmetric reflection, repeated for kernels wider than n.
      period = 2 * n
      t = t % period
      if t >= n:
        t = period - 1 - t
      m[o, t] += wgt
  return m.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _map_operators(grid, image_size, sigma):
  (h, w), (H, W) = grid, image_size
  # The same align_corners=False interpolation as the feature alignment.
  up_h = features.bilinear_matrix(h, H)
  up_w = features.bilinear_matrix(w, W)
  if sigma and sigma > 0:
    up_h = _gaussian_matrix(H, sigma) @ up_h
    up_w = _gaussian_matrix(W, sigma) @ up_w
  return up_h, up_w


def anomaly_maps(scores: jax.Array, grid, image_size, sigma=4.0) -> jax.Array:
  """(B, h*w) patch scores -> (B, H, W) pixel maps: upsample then blur.

  Both steps are linear and separable, so they fold into one (H, h) and one
  (W, w) matrix: map = A_h @ S @ A_w^T.
  """
  grid = tuple(int(g) for g in grid)
  image_size = tuple(int(s) for s in image_size)
  up_h, up_w = _map_operators(grid, image_size, float(sigma or 0.0))
  s = scores.reshape(scores.shape[0], *grid)
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum("Hh,bhw->bHw", up_h, s, precision=hi)
  return jnp.einsum("bHw,Ww->bHW", out, up_w, precision=hi)


@jax.jit
def score_batch(bank: MemoryBank, feats: jax.Array):
  """Image scores (B,), pixel maps (B, H, W) and patch scores (B, P)."""
  scores, _ = patch_scores(bank, feats)
  maps = anomaly_maps(scores, bank.grid, bank.image_size, bank.blur_sigma)
  return jnp.max(scores, axis=-1), maps, scores
