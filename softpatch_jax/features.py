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

import dataclasses
import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import settings

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
  i0, i1, w0, w1 = _bilinear_taps64(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), w0)
  np.add.at(m, (np.arange(out_size), i1), w1)
  return m.astype(np.float32)


def _bilinear_taps64(in_size: int, out_size: int):
  scale = in_size / out_size
  # torch clamps negative source coordinates to 0.
  src = np.maximum(
      scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5, 0
  )
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  same = i0 == i1  # clamped at the last row: one source, weight 1
  return i0, i1, np.where(same, 1.0, 1.0 - lam), np.where(same, 0.0, lam)


@functools.lru_cache(maxsize=64)
def bilinear_taps(in_size: int, out_size: int):
  """The two source rows and weights of each output row of `bilinear_matrix`.

  Returns (i0, i1, w0, w1): output row o = w0[o] * in[i0[o]] + w1[o] * in[i1[o]],
  the same rule and the same float32 weights as `bilinear_matrix`.
  """
  i0, i1, w0, w1 = _bilinear_taps64(in_size, out_size)
  return (
      i0.astype(np.int32),
      i1.astype(np.int32),
      w0.astype(np.float32),
      w1.astype(np.float32),
  )


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of (B, h, w, F) to (B, H, W, F), = torch interpolate(align_corners=False).

  No antialiasing (torch's default), so downsampling matches torch too.
  Separable: each axis takes two whole source rows (or columns) per output
  and blends them, which copies contiguous memory; the equivalent dense
  interpolation matmuls ran ~8x slower on XLA's CPU backend.
  """
  _check_rank4(x, "resize_bilinear")
  out_h, out_w = int(size[0]), int(size[1])
  if out_h < 1 or out_w < 1:
    raise ValueError(f"resize_bilinear: bad output size {tuple(size)}")
  for axis, out in ((1, out_h), (2, out_w)):
    if x.shape[axis] == out:
      continue
    i0, i1, w0, w1 = bilinear_taps(x.shape[axis], out)
    shape = [1, 1, 1, 1]
    shape[axis] = out
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    x = jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1
  return x


@functools.lru_cache(maxsize=64)
def _pool_bins(length: int, out: int):
  """Bin bounds of torch adaptive pooling: bin i spans [floor(i*L/out), ceil((i+1)*L/out))."""
  i = np.arange(out, dtype=np.int64)
  start = (i * length) // out
  end = -((-(i + 1) * length) // out)  # integer ceil, no float rounding
  return start, end


def _pool_matrix64(length: int, out: int) -> np.ndarray:
  """(L, out) averaging matrix of adaptive pooling, float64."""
  start, end = _pool_bins(length, out)
  m = np.zeros((length, out), np.float64)
  for j in range(out):
    m[start[j] : end[j], j] = 1.0 / (end[j] - start[j])
  return m


@functools.lru_cache(maxsize=64)
def _pool_matrix(length: int, out: int) -> np.ndarray:
  """(L, out) averaging matrix of adaptive pooling."""
  return _pool_matrix64(length, out).astype(np.float32)


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


# Widest composite bin (`_composite_pools`) applied as a sum of takes; WRN's
# layer3 needs 18. Wider ones use the staged path.
_MAX_COMPOSITE_WIDTH = 32


@functools.lru_cache(maxsize=64)
def _composite_pools(lengths: Tuple[int, ...], pretrain: int, target: int):
  """Both poolings of `patch_features` folded into one sparse map per layer.

  Layer l's L_l-vector is pooled to `pretrain`, the layers are stacked and
  pooled to `target`: all linear, so output j is a weighted sum of a few
  consecutive entries of each layer's vector. Returns, per layer,
  (t0, t1, idx (K, t1 - t0), w (K, t1 - t0)): outputs t0..t1-1 get
  sum_k w[k] * vec[idx[k]] from it (weights multiplied in float64). None when
  a bin is wider than _MAX_COMPOSITE_WIDTH.
  """
  second = _pool_matrix64(len(lengths) * pretrain, target)
  out = []
  for l, length in enumerate(lengths):
    c = (
        _pool_matrix64(length, pretrain)
        @ second[l * pretrain : (l + 1) * pretrain]
    )
    cols = np.nonzero(c.any(axis=0))[0]
    t0, t1 = int(cols[0]), int(cols[-1]) + 1
    c = c[:, t0:t1]
    nz = [np.nonzero(c[:, j])[0] for j in range(t1 - t0)]
    width = max(len(z) for z in nz)
    if width > _MAX_COMPOSITE_WIDTH:
      return None
    idx = np.zeros((width, t1 - t0), np.int32)
    w = np.zeros((width, t1 - t0), np.float32)
    for j, z in enumerate(nz):
      idx[: len(z), j] = z
      idx[len(z) :, j] = z[-1]  # zero weight: any valid index
      w[: len(z), j] = c[z, j]
    out.append((t0, t1, idx, w))
  return tuple(out)


def _check_maps(maps):
  if len(maps) == 0:
    raise ValueError("patch_features: need at least one feature map")
  for i, m in enumerate(maps):
    _check_rank4(m, f"patch_features: maps[{i}]")
  b = maps[0].shape[0]
  if any(m.shape[0] != b for m in maps):
    raise ValueError(
        f"patch_features: batch sizes differ: {[tuple(m.shape) for m in maps]}"
    )


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
  ``target_embed_dim``. Everything after patchify is linear and the resize
  acts on other axes than the poolings, so the order can change up to float
  rounding: both poolings are folded into one sparse map per layer
  (`_composite_pools`), applied on the layer's own grid, and only the
  layer's share of the output is resized. The reference resizes the 9·C
  vectors first; this does ~4x less work for a stride-16 layer and skips the
  stacked intermediate.
  """
  _check_maps(maps)
  b = maps[0].shape[0]
  patches = [patchify(m.astype(jnp.float32), patchsize) for m in maps]
  ref_hw = patches[0].shape[1:3]
  h, w = ref_hw
  lengths = tuple(int(p.shape[-1]) for p in patches)
  plan = _composite_pools(lengths, pretrain_embed_dim, target_embed_dim)
  if plan is None:
    return _staged_patch_features(
        patches, ref_hw, pretrain_embed_dim, target_embed_dim
    )
  parts = []
  for p, (t0, t1, idx, wts) in zip(patches, plan):
    part = None
    for k in range(idx.shape[0]):
      term = jnp.take(p, idx[k], axis=-1) * jnp.asarray(wts[k])
      part = term if part is None else part + term
    parts.append((t0, t1, resize_bilinear(part, ref_hw)))
  if all(a[1] == b[0] for a, b in zip(parts, parts[1:])):
    out = jnp.concatenate([part for _, _, part in parts], axis=-1)
  else:  # a bin straddles two layers: sum their shares
    out = sum(
        jnp.pad(part, ((0, 0), (0, 0), (0, 0), (t0, target_embed_dim - t1)))
        for t0, t1, part in parts
    )
  return out.reshape(b, h * w, target_embed_dim), (h, w)


def _staged_patch_features(patches, ref_hw, pretrain, target):
  """`patch_features` stage by stage, for bins too wide to fold."""
  b = patches[0].shape[0]
  per_layer = [
      resize_bilinear(adaptive_avg_pool1d(p, pretrain), ref_hw) for p in patches
  ]
  stacked = jnp.stack(per_layer, axis=-2)  # (B, H, W, n_layers, pretrain)
  h, w = ref_hw
  flat = stacked.reshape(b, h * w, len(patches) * pretrain)
  return adaptive_avg_pool1d(flat, target), (h, w)


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
  """config.features: PatchCore's locally aware patch features (README).

  patchsize: neighbourhood of the local aggregation (3).
  pretrain_embed_dim: per-layer pooled dimension (1024).
  target_embed_dim: final feature dimension (1024).
  """

  patchsize: int = 3
  pretrain_embed_dim: int = 1024
  target_embed_dim: int = 1024

  def __post_init__(self):
    for name in ("patchsize", "pretrain_embed_dim", "target_embed_dim"):
      v = settings.check_int(getattr(self, name), f"features.{name}", 1)
      settings.set_field(self, name, v)

  def spec(self, module, layers) -> "EmbedSpec":
    """The EmbedSpec of these options over a backbone's taps."""
    return EmbedSpec(module, tuple(layers), **dataclasses.asdict(self))


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
