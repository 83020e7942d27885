"""Mutual scoring: a discriminator that compares every patch with every image.

SoftPatch's discriminators compare a patch only with the patches of the
other images at the same position (Jiang et al., NeurIPS 2022, Sec. 3.2).
A defect that several training images share, or one that sits at a
different place in each image, then hides among its neighbours. Mutual
scoring instead asks, for each training patch, how far the *closest patch
of each other image* is, anywhere in that image, and averages the closest
part of those per-image distances (the idea of MuSc, Li et al., ICLR 2024,
which scores unlabelled test images against each other; here the training
images score each other).

A normal patch has a close match in almost every other image, so all its
per-image distances are small. A defect patch has close matches only in
the few images that share its defect: the average over the closest
`1 - overlap` share of the images reaches beyond them as long as fewer
than that share of the images carry a similar defect. With 40 % of the
training images injected and defects of several kinds, no one kind fills
half of the images.

The weights are the averaged distance divided by its median over all
patches, so an ordinary patch weighs about 1, as SoftPatch's soft weights
expect. Cost: (N P)^2 d multiply-adds over N images of P patches in d
projected dimensions, blocked so that at most about 64 MiB of distances
exist at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softpatch_jax import denoise

_HIGHEST = jax.lax.Precision.HIGHEST
# Elements of one (queries, N, P) distance block; bounds peak memory.
_BLOCK_ELEMS = 1 << 24
# The share of the other images averaged over (closest first).
NEAREST_SHARE = 0.5


def per_image_distances(x: jax.Array) -> jax.Array:
  """(N, P, d) -> (N, P, N): distance from each patch to the closest patch
  of each image (anywhere in it); a patch's own image gets +inf."""
  n, p, d = x.shape
  flat = x.reshape(n * p, d)
  # Centring shrinks |x|^2 and so the cancellation error of the expansion.
  flat = flat - jnp.mean(flat, axis=0)
  sq = jnp.sum(flat * flat, axis=-1)
  block = int(max(1, min(n * p, _BLOCK_ELEMS // max(1, n * p))))
  pad = -(n * p) % block
  rows = jnp.arange(n * p + pad)
  queries = jnp.pad(flat, ((0, pad), (0, 0)))

  def one(args):
    q, r = args  # (B, d), (B,)
    g = jnp.matmul(q, flat.T, precision=_HIGHEST)
    d2 = jnp.sum(q * q, axis=-1)[:, None] + sq[None, :] - 2.0 * g
    d2 = jnp.min(d2.reshape(-1, n, p), axis=-1)  # (B, N)
    own = (r // p)[:, None] == jnp.arange(n)[None, :]
    return jnp.where(own, jnp.inf, jnp.sqrt(jnp.maximum(d2, 0.0)))

  out = jax.lax.map(
      one,
      (queries.reshape(-1, block, d), rows.reshape(-1, block)),
  )
  return out.reshape(-1, n)[: n * p].reshape(n, p, n)


def num_nearest(n_images: int, share: float = NEAREST_SHARE) -> int:
  """How many of the other n_images - 1 images are averaged: ceil(share *
  (n - 1)), at least 1."""
  if n_images < 2:
    raise ValueError(
        f"mutual scoring needs at least 2 training images, got {n_images}"
    )
  return max(1, int(math.ceil(float(share) * (n_images - 1))))


def mutual_scores(x: jax.Array, share: float = NEAREST_SHARE) -> jax.Array:
  """(N, P, d) -> (N, P): the mean distance to the closest patch of the
  closest `num_nearest(N, share)` other images."""
  k = num_nearest(x.shape[0], share)
  dist = per_image_distances(x)
  closest = -jax.lax.top_k(-dist, k)[0]  # (N, P, k), ascending
  return jnp.mean(closest, axis=-1)


@denoise.register_discriminator("mutual")
def mutual(x: jax.Array, options: denoise.DenoiseOptions) -> jax.Array:
  """(P, N, d) -> (P, N): mutual scores over their median (about 1)."""
  del options
  s = mutual_scores(jnp.transpose(x, (1, 0, 2)))
  s = s / jnp.maximum(jnp.median(s), 1e-12)
  return jnp.transpose(s)
