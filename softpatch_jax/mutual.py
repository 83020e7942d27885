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
projected dimensions, blocked as `consensus.per_image_distances` is (at
most about 64 MiB of distances at a time).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softpatch_jax import consensus
from softpatch_jax import denoise

# The share of the other images averaged over (closest first).
NEAREST_SHARE = 0.5


def per_image_distances(x: jax.Array) -> jax.Array:
  """(N, P, d) -> (N, P, N): distance from each patch to the closest patch
  of each image (anywhere in it); a patch's own image gets +inf."""
  n, p, d = x.shape
  # Centring shrinks |x|^2 and so the cancellation error of the expansion.
  x = x - jnp.mean(x.reshape(n * p, d), axis=0)
  d2 = consensus.per_image_distances(x, x.reshape(n * p, d)).reshape(n, p, n)
  own = jnp.arange(n)[:, None, None] == jnp.arange(n)[None, None, :]
  return jnp.where(own, jnp.inf, jnp.sqrt(d2))


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
