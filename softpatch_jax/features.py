"""Local patch features: patchify, bilinear resize, adaptive pooling, `embed`.

PatchCore / SoftPatch locally aware patch features (Jiang et al., NeurIPS
2022; README, "The research API"). `embed` runs a backbone and turns its
taps into one feature per patch.

All functions are pure and jittable (shapes and sizes are static Python ints).
Layout is NHWC throughout. The numerics follow the torch reference ops
(``nn.Unfold``, ``F.interpolate(mode='bilinear', align_corners=False)``,
``F.adaptive_avg_pool1d``) to float32 rounding.
"""

from __future__ import annotations

import functools
import dataclasses
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Accelerators default to reduced-precision matmuls; the pooling / resize
# matrices must be applied in full float32 to keep torch parity.
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_rank4(x, name):
  if x.ndim != 4:
    raise ValueError(
        f"{name}: expected a (B, h, w, C) array, got shape {tuple(x.shape)}"
    )


def patchify(fmap: jax.Array, patchsize: int = 3, stride: int = 1) -> jax.Array:
  """Every ``patchsize``² neighbourhood of an NHWC map, flattened like torch ``Unfold``.

  Zero padding is ``(patchsize - 1) // 2`` on each side, as in PatchCore's PatchMaker.
  Args:
    fmap: (B, h, w, C).
  Returns:
    (B, h_out, w_out, C * patchsize * patchsize), each vector ordered channel-major,
    then kernel row, then kernel column. For odd patchsize and stride 1, h_out == h.
  """
  _check_rank4(fmap, "patchify")
  if patchsize < 1 or stride < 1:
    raise ValueError(
        f"patchify: patchsize ({patchsize}) and stride ({stride}) must be >= 1"
    )
  b, h, w, c = fmap.shape
  pad = (patchsize - 1) // 2
  h_out = (h + 2 * pad - patchsize) // stride + 1
  w_out = (w + 2 * pad - patchsize) // stride + 1
  if h_out < 1 or w_out < 1:
    raise ValueError(
        f"patchify: map {(h, w)} too small for patchsize {patchsize}"
    )
  xp = jnp.pad(fmap, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shifts = []
  for ky in range(patchsize):
    for kx in range(patchsize):
      shifts.append(
          xp[
              :,
              ky : ky + (h_out - 1) * stride + 1 : stride,
              kx : kx + (w_out - 1) * stride + 1 : stride,
              :,
          ]
      )
  # (B, h_out, w_out, C, k*k): channel-major then (row, col) like Unfold.
  patches = jnp.stack(shifts, axis=-1)
  return patches.reshape(b, h_out, w_out, c * patchsize * patchsize)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) interpolation matrix of torch's align_corners=False bilinear rule."""
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum(
      scale * (dst + 0.5) - 0.5, 0.0
  )  # torch clamps negatives to 0
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of (B, h, w, F) to (B, H, W, F), = torch interpolate(align_corners=False).

  No antialiasing (torch's default), so downsampling matches torch too. Implemented
  as two small dense interpolation matrices (separable), applied in float32.
  """
  _check_rank4(x, "resize_bilinear")
  out_h, out_w = int(size[0]), int(size[1])
  if out_h < 1 or out_w < 1:
    raise ValueError(f"resize_bilinear: bad output size {tuple(size)}")
  _, h, w, _ = x.shape
  if (h, w) == (out_h, out_w):
    return x
  mh = jnp.asarray(bilinear_matrix(h, out_h), x.dtype)
  mw = jnp.asarray(bilinear_matrix(w, out_w), x.dtype)
  y = jnp.einsum("Hh,bhwf->bHwf", mh, x, precision=_HIGHEST)
  return jnp.einsum("Ww,bHwf->bHWf", mw, y, precision=_HIGHEST)


@functools.lru_cache(maxsize=64)
def _pool_bins(length: int, out: int):
  """Bin bounds of torch adaptive pooling: bin i spans [floor(i*L/out), ceil((i+1)*L/out))."""
  i = np.arange(out, dtype=np.int64)
  start = (i * length) // out
  end = -((-(i + 1) * length) // out)  # integer ceil, no float rounding
  return start, end


@functools.lru_cache(maxsize=64)
def _pool_matrix(length: int, out: int) -> np.ndarray:
  """(L, out) averaging matrix of adaptive pooling."""
  start, end = _pool_bins(length, out)
  m = np.zeros((length, out), np.float64)
  for j in range(out):
    m[start[j] : end[j], j] = 1.0 / (end[j] - start[j])
  return m.astype(np.float32)


# Bins never overlap more than a few elements; up to this width a sum of K
# strided takes is much cheaper than the dense (L, out) matmul (measured ~30x on
# CPU for L=4608 -> 1024); wider bins fall back to the matmul.
_MAX_TAKE_WIDTH = 16


def adaptive_avg_pool1d(x: jax.Array, out: int) -> jax.Array:
  """torch ``adaptive_avg_pool1d`` over the last axis: (..., L) -> (..., out)."""
  length = x.shape[-1]
  if out < 1 or length < 1:
    raise ValueError(f"adaptive_avg_pool1d: bad sizes L={length}, out={out}")
  if length == out:
    return x
  if length % out == 0:
    # Equal, disjoint bins: a reshape + mean is exact and cheap.
    return x.reshape(*x.shape[:-1], out, length // out).mean(axis=-1)
  start, end = _pool_bins(length, out)
  count = end - start
  width = int(count.max())
  if width > _MAX_TAKE_WIDTH:
    m = jnp.asarray(_pool_matrix(length, out), x.dtype)
    return jnp.matmul(x, m, precision=_HIGHEST)
  acc = None
  for k in range(width):
    # k-th element of every bin (clipped index, zero weight past the bin's end).
    idx = np.minimum(start + k, length - 1)
    wk = np.where(k < count, 1.0 / count, 0.0).astype(np.float32)
    term = jnp.take(x, idx, axis=-1) * jnp.asarray(wk, x.dtype)
    acc = term if acc is None else acc + term
  return acc


def patch_features(
    maps: Sequence[jax.Array],
    patchsize: int = 3,
    pretrain_embed_dim: int = 1024,
    target_embed_dim: int = 1024,
):
  """PatchCore / SoftPatch patch embedding of a list of backbone maps.

  Args:
    maps: list of (B, h_l, w_l, C_l) feature maps; the first map's grid is the
      reference grid every other layer is resized to.
  Returns:
    ((B, H*W, target_embed_dim) float32, (H, W)).

  Each layer is patchified, pooled to ``pretrain_embed_dim``, resized to the
  reference grid, stacked to (..., n_layers, pretrain) and pooled again to
  ``target_embed_dim``. The reference resizes before pooling; both maps are
  linear and act on different axes, so they commute -- pooling first is the same
  result up to float rounding while the coarse layer's 9·C vectors are never
  upsampled (4x less memory and work for a stride-16 layer).
  """
  if len(maps) == 0:
    raise ValueError("patch_features: need at least one feature map")
  for i, m in enumerate(maps):
    _check_rank4(m, f"patch_features: maps[{i}]")
  b = maps[0].shape[0]
  if any(m.shape[0] != b for m in maps):
    raise ValueError(
        f"patch_features: batch sizes differ: {[tuple(m.shape) for m in maps]}"
    )
  per_layer = []
  ref_hw = None
  for m in maps:
    p = patchify(m.astype(jnp.float32), patchsize)
    if ref_hw is None:
      ref_hw = p.shape[1:3]
    p = adaptive_avg_pool1d(p, pretrain_embed_dim)
    per_layer.append(resize_bilinear(p, ref_hw))
  stacked = jnp.stack(per_layer, axis=-2)  # (B, H, W, n_layers, pretrain)
  h, w = ref_hw
  flat = stacked.reshape(b, h * w, len(maps) * pretrain_embed_dim)
  return adaptive_avg_pool1d(flat, target_embed_dim), (h, w)


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
  """What `embed` computes: static, hashable, so it can be a jit argument.

  module: the Flax backbone module (``backbones.Backbone.module``), whose
    ``apply(variables, images)`` returns a dict of tap name -> NHWC map.
  layers: the taps to aggregate, finest first (its grid is the patch grid).
  patchsize: neighbourhood size of the local patch features (3).
  pretrain_embed_dim: per-layer pooled dimension (1024).
  target_embed_dim: final feature dimension (1024).
  """

  module: Any
  layers: Tuple[str, ...]
  patchsize: int = 3
  pretrain_embed_dim: int = 1024
  target_embed_dim: int = 1024


def embed(variables, images: jax.Array, spec: EmbedSpec):
  """Backbone + patch features: (B, H, W, 3) images -> ((B, P, D), grid).

  Pure and jittable (``jax.jit(embed, static_argnums=2)`` returns the grid
  as arrays; `embed_jit` keeps only the features). Images are normalised
  with the backbone's mean and std.
  """
  maps = spec.module.apply(variables, images)
  return patch_features(
      [maps[name] for name in spec.layers],
      patchsize=spec.patchsize,
      pretrain_embed_dim=spec.pretrain_embed_dim,
      target_embed_dim=spec.target_embed_dim,
  )


@functools.partial(jax.jit, static_argnums=2)
def embed_jit(variables, images: jax.Array, spec: EmbedSpec) -> jax.Array:
  """`embed` as one compiled program; returns the (B, P, D) features only.

  The weights are an argument, not closed-over constants, so they are not
  baked into the program and new weights never trigger a recompile.
  """
  return embed(variables, images, spec)[0]


def grid_shape(variables, spec: EmbedSpec, image_size) -> Tuple[int, int]:
  """The (h, w) patch grid for `image_size` input, by shape inference only."""
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  maps = jax.eval_shape(spec.module.apply, variables, images)
  first = jax.eval_shape(
      lambda m: patchify(m, spec.patchsize), maps[spec.layers[0]]
  )
  return int(first.shape[1]), int(first.shape[2])
