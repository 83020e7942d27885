"""Batched PatchCore/SoftPatch patch scoring against a memory bank."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softpatch_jax.kernels import _dispatch
from softpatch_jax.kernels.knn import knn


@functools.partial(jax.jit, static_argnames=("soft", "impl", "compute_dtype"))
def _score(bank_feats, bank_weights, feats, soft, impl, compute_dtype):
  b, p, dim = feats.shape
  d, idx = knn(feats.reshape(b * p, dim), bank_feats, 1, impl=impl,
                       compute_dtype=compute_dtype)
  d, idx = d[:, 0], idx[:, 0]
  if soft:
    d = d * bank_weights[idx]
  return d.reshape(b, p), idx.reshape(b, p)


def score_images(bank_feats, bank_weights, feats, soft: bool = True, *,
                 impl: str | None = None, compute_dtype=None):
  """Patch scores for a batch of images in one jitted call.

  Args:
    bank_feats: (M, D) memory bank features.
    bank_weights: (M,) patch weights of the bank entries (SoftPatch's
      clamped LOF weights); only used when ``soft``.
    feats: (B, P, D) test patch features.
    soft: multiply each patch's nearest squared distance by the weight of
      its nearest bank entry.
    impl, compute_dtype: forwarded to ``kernels.knn``.

  Returns:
    (patch_scores (B, P) float32, nn_idx (B, P) int32). The image score is
    ``patch_scores.max(axis=1)``.
  """
  bank_feats = jnp.asarray(bank_feats)
  bank_weights = jnp.asarray(bank_weights, jnp.float32)
  feats = jnp.asarray(feats)
  _dispatch.check_rank("bank_feats", "score_images", bank_feats, 2)
  _dispatch.check_rank("feats", "score_images", feats, 3)
  if bank_weights.shape != (bank_feats.shape[0],):
    raise ValueError(
        f"kernels.score_images: bank_weights shape {tuple(bank_weights.shape)}"
        f" != ({bank_feats.shape[0]},) for bank {tuple(bank_feats.shape)}")
  if feats.shape[2] != bank_feats.shape[1]:
    raise ValueError(
        f"kernels.score_images: feats {tuple(feats.shape)} and bank "
        f"{tuple(bank_feats.shape)} differ in feature dim")
  path = _dispatch.resolve_impl(impl, "score_images")
  cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
  return _score(bank_feats.astype(jnp.float32), bank_weights,
                feats.astype(jnp.float32), bool(soft), path, cdt)
