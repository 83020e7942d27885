"""The 'gaussian' discriminator's distance: leave-one-out and shrunk.

SoftPatch (Jiang et al., NeurIPS 2022) scores a patch by its Mahalanobis
distance to the Gaussian of the patches at its position. Fitted in sample,
as the reference does, that distance says nothing when the images are few:
with N images in d projected dimensions and N <= d, every point has the same
leverage, and the weights are nearly constant (3.84-3.85 reported with up
to 128 training images) whatever the data. `distance` therefore scores each point by
the Gaussian of the *other* N - 1 points (leave-one-out), its covariance
shrunk towards a multiple of the identity with the Ledoit-Wolf intensity,
plus reg * I (README, "Deliberate differences"). One Cholesky factor per
position serves all N points: removing a point is a rank-one downdate, so
Sherman-Morrison gives every leave-one-out distance in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# Floor of 1 - c q (Sherman-Morrison's denominator, > 0 in exact arithmetic).
_TINY = 1e-12


def ledoit_wolf(delta: jax.Array, scatter: jax.Array):
  """(alpha, mu) of centred points delta (N, d), scatter = delta^T delta.

  The Ledoit-Wolf estimate (1 - alpha) S + alpha mu I of the covariance
  S = scatter / N, with mu = trace(S) / d; the same alpha as
  sklearn.covariance.ledoit_wolf_shrinkage. 0 when every point is equal.
  """
  n, d = delta.shape
  emp = scatter / n
  mu = jnp.trace(emp) / d
  emp_sq = jnp.sum(emp * emp)
  spread = emp_sq / d - mu * mu  # |S - mu I|_F^2 / d
  norms = jnp.sum(delta * delta, axis=1)
  # (1/N^2) sum_i |x_i x_i^T - S|_F^2 / d, the variance of S's entries.
  beta = jnp.minimum((jnp.sum(norms * norms) / n - emp_sq) / (d * n), spread)
  safe = jnp.where(spread > 0, spread, 1.0)
  alpha = jnp.where(spread > 0, jnp.clip(beta / safe, 0.0, 1.0), 0.0)
  return alpha, mu


def _squared(xp: jax.Array, reg: float, in_sample: bool) -> jax.Array:
  """(N, d) -> (N,) squared Mahalanobis distances at one position."""
  n, d = xp.shape
  delta = xp - jnp.mean(xp, axis=0)
  scatter = jnp.matmul(delta.T, delta, precision=_HIGHEST)
  eye = jnp.eye(d, dtype=xp.dtype)
  if in_sample:  # the reference: unbiased covariance of all N, + reg I
    b, alpha, m = scatter / (n - 1) + reg * eye, 0.0, 1.0
  else:
    alpha, mu = ledoit_wolf(delta, scatter)
    m = max(n - 2, 1)  # N - 1 points left: unbiased divisor N - 2
    b = (1.0 - alpha) * scatter / m + (alpha * mu + reg) * eye
  chol = jnp.linalg.cholesky(b)
  # |L^{-1} delta|^2 == delta^T b^{-1} delta, without forming the inverse.
  z = jax.lax.linalg.triangular_solve(chol, delta.T, left_side=True, lower=True)
  q = jnp.sum(z * z, axis=0)
  if in_sample:
    return q
  # Without point i: mean m - delta_i / (N-1), so x_i - m_-i = delta_i N/(N-1);
  # scatter minus N/(N-1) delta_i delta_i^T, so the covariance is
  # b - c delta_i delta_i^T and Sherman-Morrison gives q / (1 - c q).
  c = (1.0 - alpha) * n / ((n - 1) * m)
  return (n / (n - 1)) ** 2 * q / jnp.maximum(1.0 - c * q, _TINY)


def distance(
    x: jax.Array, reg: float = 0.01, *, in_sample: bool = False, batch: int = 1
) -> jax.Array:
  """(P, N, d) -> (P, N): Mahalanobis distance (not squared) per position.

  Default: point i against the Gaussian of the other N - 1 points at its
  position, covariance (1 - alpha) S_-i + (alpha mu + reg) I, with S_-i the
  unbiased covariance of the others (divisor max(N - 2, 1)) and alpha, mu
  the Ledoit-Wolf intensity and target of all N (`ledoit_wolf`).
  in_sample=True: the reference's fit on all N points (unbiased covariance
  + reg I). `batch` positions are scored at a time (bounds peak memory).
  """
  p = x.shape[0]

  def one(xp):
    return jnp.sqrt(jnp.maximum(_squared(xp, reg, in_sample), 0.0))

  return jax.lax.map(one, x, batch_size=max(1, min(p, batch)))
