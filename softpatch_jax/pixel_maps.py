"""Pixel maps: patch-score grids upsampled and blurred to the input size.

The map of an image is its patch-score grid bilinearly upsampled
(``align_corners=False``, as the feature alignment) and blurred with a
Gaussian (scipy ``gaussian_filter`` semantics: reflect padding, truncate 4).
Memory banks (`scoring`), PaDiM and CFLOW share it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import features


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
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
def map_operators(grid, image_size, sigma):
  (h, w), (hh, ww) = grid, image_size
  # The same align_corners=False interpolation as the feature alignment.
  up_h = features.bilinear_matrix(h, hh)
  up_w = features.bilinear_matrix(w, ww)
  if sigma and sigma > 0:
    up_h = gaussian_matrix(hh, sigma) @ up_h
    up_w = gaussian_matrix(ww, sigma) @ up_w
  return up_h, up_w


def anomaly_maps(scores: jax.Array, grid, image_size, sigma) -> jax.Array:
  """(B, h*w) patch scores -> (B, H, W) pixel maps: upsample then blur.

  Both steps are linear and separable, so they fold into one (H, h) and one
  (W, w) matrix: map = A_h @ S @ A_w^T.
  """
  grid = tuple(int(g) for g in grid)
  image_size = tuple(int(s) for s in image_size)
  up_h, up_w = map_operators(grid, image_size, float(sigma or 0.0))
  s = scores.reshape(scores.shape[0], *grid)
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum("Hh,bhw->bHw", up_h, s, precision=hi)
  return jnp.einsum("bHw,Ww->bHW", out, up_w, precision=hi)
