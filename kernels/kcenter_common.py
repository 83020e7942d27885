"""Helpers shared by the k-center paths (kcenter.py) and the Pallas kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def dist_to(x, c):
  """Euclidean distance of every row of x to c, from coordinate differences.

  The difference form (rather than ||x||^2 - 2 x.c + ||c||^2) makes the
  distance of a point to itself and to its exact duplicates exactly 0, and
  identical rows get bit-identical distances, so ties stay ties.
  """
  diff = x.astype(_F32) - c.astype(_F32)[None, :]
  return jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, axis=1), 0.0))


def initial_distance(x, start_idx, w):
  """mean over starts of the distance to each start, times w.

  The sum runs sequentially over the starts on every path, so all paths
  round identically.
  """

  def body(j, acc):
    s = start_idx[j]
    return acc + dist_to(x, x[s])

  acc = jax.lax.fori_loop(
      0, start_idx.shape[0], body, jnp.zeros((x.shape[0],), _F32)
  )
  return acc / start_idx.shape[0] * w
