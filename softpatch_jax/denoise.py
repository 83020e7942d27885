"""Patch-level noise discrimination and denoising (DESIGN §1.3-1.4).

Training patch features are projected to a small dimension, grouped by patch
position across images, and every patch is scored against the patches of the
other images at the same position ('lof', 'nearest' or 'gaussian'). The top
``noise_fraction`` of all weights are marked as noise and never enter the
memory bank; ``max(w, 0)`` is kept for soft re-weighting of scores.

Differences from the reference implementation (documented on purpose):
- ``lof_k`` defaults to 6 and is actually used; the reference's ``--lof_k`` flag
  never reaches its model, which therefore runs LOF with k=5.
- The projection has no bias, like the reference's ``Linear(bias=False)``; a bias
  would not change any distance anyway. The same projection is meant to be used
  for the coreset (the reference draws a second one).
- 'nearest' excludes the point itself exactly. The reference sums the two
  smallest entries of a distance matrix computed by the |a|²+|b|²-2ab expansion,
  so its self-distance is float noise (~1e-3) rather than 0.
- 'gaussian' uses a Cholesky solve instead of an explicit inverse, and clamps the
  squared distance at 0 before the square root (the reference can return NaN).
"""
from __future__ import annotations

import logging
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

_HIGHEST = jax.lax.Precision.HIGHEST
METHODS = ("lof", "nearest", "gaussian")
# Elements of one (positions, N, N) distance block; bounds peak memory (~64 MiB).
_BLOCK_ELEMS = 1 << 24


def make_projection(key: jax.Array, in_dim: int = 1024, out_dim: int = 128
                    ) -> Tuple[jax.Array, jax.Array]:
    """Random linear map with torch ``Linear`` init: W ~ U(±1/sqrt(in_dim)).

    Returns (W (in_dim, out_dim), b (out_dim,)); b is zero because the reference
    projection has no bias (distances are translation invariant regardless).
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"make_projection: bad dims in_dim={in_dim}, out_dim={out_dim}")
    bound = 1.0 / np.sqrt(in_dim)
    w = jax.random.uniform(key, (in_dim, out_dim), jnp.float32, -bound, bound)
    return w, jnp.zeros((out_dim,), jnp.float32)


def project(feats: jax.Array, proj: Tuple[jax.Array, jax.Array]) -> jax.Array:
    """(..., in_dim) @ W + b -> (..., out_dim), in full float32 precision."""
    w, b = proj
    if feats.shape[-1] != w.shape[0]:
        raise ValueError(f"project: features have dim {feats.shape[-1]}, projection expects "
                         f"{w.shape[0]} (shape {tuple(feats.shape)})")
    return jnp.matmul(feats, w, precision=_HIGHEST) + b


def check_finite(x, name: str = "features") -> None:
    """Raise ValueError if a concrete array holds NaN/inf (no-op under tracing)."""
    if isinstance(x, jax.core.Tracer):
        return
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))
    if bad:
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN/inf) in array of shape "
                         f"{tuple(np.shape(x))}")


def _positions_chunk(n: int, per_pos: int) -> int:
    return int(max(1, _BLOCK_ELEMS // max(1, per_pos)))


def nearest_other_distance(x: jax.Array) -> jax.Array:
    """(P, N, d) -> (P, N): Euclidean distance to the nearest *other* point in the same group.

    Positions are processed in chunks so only a (chunk, N, N) block exists at a time.
    """
    p, n, _ = x.shape

    def one(xp):  # (N, d)
        # Centring shrinks |x|^2 and so the cancellation error of the expansion;
        # taking |x|^2 from the Gram diagonal makes duplicates come out at exactly 0.
        xp = xp - jnp.mean(xp, axis=0)
        g = jnp.matmul(xp, xp.T, precision=_HIGHEST)
        sq = jnp.diagonal(g)
        d2 = sq[:, None] + sq[None, :] - 2.0 * g
        d2 = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d2)
        return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0))

    return jax.lax.map(one, x, batch_size=min(p, _positions_chunk(n, n * n)))


def gaussian_distance(x: jax.Array, reg: float = 0.01) -> jax.Array:
    """(P, N, d) -> (P, N): Mahalanobis distance (not squared) to the per-position Gaussian.

    The Gaussian is fitted on all N points of the position, the point itself
    included, with the unbiased covariance + reg·I (as the reference does).
    """
    p, n, d = x.shape
    eye = jnp.eye(d, dtype=x.dtype)

    def one(xp):  # (N, d)
        delta = xp - jnp.mean(xp, axis=0)
        cov = jnp.matmul(delta.T, delta, precision=_HIGHEST) / (n - 1) + reg * eye
        chol = jnp.linalg.cholesky(cov)
        # |L^{-1} delta|^2 == delta^T cov^{-1} delta, without forming the inverse.
        z = jax.lax.linalg.triangular_solve(chol, delta.T, left_side=True, lower=True)
        return jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=0), 0.0))

    return jax.lax.map(one, x, batch_size=min(p, _positions_chunk(n, d * d + n * d)))


def effective_lof_k(lof_k: int, n_images: int) -> int:
    """k actually used for LOF, clamped like sklearn: max(1, min(k, n - 1)), with a warning."""
    if int(lof_k) < 1:
        raise ValueError(f"lof_k must be >= 1, got {lof_k}")
    if n_images < 2:
        raise ValueError(f"LOF needs at least 2 training images (3+ recommended), got {n_images}")
    k = max(1, min(int(lof_k), n_images - 1))
    if k != int(lof_k):
        log.warning("lof_k=%d >= number of training images (%d); using k=%d for LOF",
                    lof_k, n_images, k)
    return k


def patch_weights(proj_feats: jax.Array, method: str = "lof", lof_k: int = 6) -> jax.Array:
    """Per-patch noise weights.

    Args:
      proj_feats: (N images, P positions, d) projected patch features.
      method: 'lof' (Local Outlier Factor with k=lof_k, per position), 'nearest'
        (distance to the nearest other image's patch + 1) or 'gaussian'
        (Mahalanobis distance to the per-position Gaussian + 1).
    Returns:
      (N, P) float32 weights; larger = more likely noise.
    """
    if method not in METHODS:
        raise ValueError(f"patch_weights: unknown method {method!r}; expected one of {METHODS}")
    if proj_feats.ndim != 3:
        raise ValueError(f"patch_weights: expected (N, P, d) features, got shape "
                         f"{tuple(proj_feats.shape)}")
    n, p, d = proj_feats.shape
    if n < 2:
        raise ValueError(f"patch_weights: need at least 2 training images to compare patches "
                         f"across images, got N={n} (shape {tuple(proj_feats.shape)})")
    if p < 1 or d < 1:
        raise ValueError(f"patch_weights: empty features, shape {tuple(proj_feats.shape)}")
    check_finite(proj_feats, "patch_weights: projected features")
    x = jnp.transpose(jnp.asarray(proj_feats, jnp.float32), (1, 0, 2))  # (P, N, d)
    if method == "lof":
        from softpatch_jax import kernels  # imported lazily: only this method needs it
        out = kernels.lof(x, effective_lof_k(lof_k, n))
    elif method == "nearest":
        out = nearest_other_distance(x) + 1.0
    else:
        out = gaussian_distance(x) + 1.0
    return jnp.transpose(out).astype(jnp.float32)


def noise_threshold(w: jax.Array, noise_fraction: float = 0.15) -> jax.Array:
    """t = quantile(w, 1 - noise_fraction) over all weights, linear interpolation
    (same as torch.quantile / np.quantile defaults). Patches with w > t are noise."""
    if not 0.0 <= float(noise_fraction) < 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    return jnp.quantile(jnp.ravel(w), 1.0 - float(noise_fraction))


def denoise(weights: jax.Array, noise_fraction: float = 0.15
            ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """-> (noise_mask = w > t, soft weights max(w, 0), the threshold t)."""
    t = noise_threshold(weights, noise_fraction)
    return weights > t, jnp.maximum(weights, 0.0), t
