"""Parity of softpatch_jax.features with the torch ops used by PatchCore / SoftPatch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softpatch_jax import features


def _torch_patchify(x_nchw, patchsize):
  # PatchCore PatchMaker: Unfold -> (B, C, k, k, L) -> (B, L, C, k, k)
  pad = (patchsize - 1) // 2
  unf = torch.nn.Unfold(
      kernel_size=patchsize, stride=1, padding=pad, dilation=1
  )(x_nchw)
  sides = [(s + 2 * pad - (patchsize - 1) - 1) + 1 for s in x_nchw.shape[-2:]]
  unf = unf.reshape(*x_nchw.shape[:2], patchsize, patchsize, -1).permute(
      0, 4, 1, 2, 3
  )
  return unf, sides


def _torch_reference(maps_nhwc, patchsize, pretrain, target):
  """Written from the reference's _embed + Preprocessing + Aggregator semantics."""
  feats, shapes = [], []
  for m in maps_nhwc:
    f, s = _torch_patchify(torch.from_numpy(m).permute(0, 3, 1, 2), patchsize)
    feats.append(f)
    shapes.append(s)
  ref = shapes[0]
  for i in range(1, len(feats)):
    f = feats[i]
    f = f.reshape(f.shape[0], shapes[i][0], shapes[i][1], *f.shape[2:])
    f = f.permute(0, -3, -2, -1, 1, 2)
    base = f.shape
    f = f.reshape(-1, *f.shape[-2:])
    f = F.interpolate(
        f.unsqueeze(1),
        size=(ref[0], ref[1]),
        mode="bilinear",
        align_corners=False,
    ).squeeze(1)
    f = f.reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
    f = f.reshape(len(f), -1, *f.shape[-3:])
    feats[i] = f
  feats = [x.reshape(-1, *x.shape[-3:]) for x in feats]
  pooled = [
      F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain).squeeze(1)
      for x in feats
  ]
  st = torch.stack(pooled, dim=1)
  out = F.adaptive_avg_pool1d(st.reshape(len(st), 1, -1), target).reshape(
      len(st), -1
  )
  b = maps_nhwc[0].shape[0]
  return out.reshape(b, -1, target).numpy(), tuple(ref)


@pytest.mark.parametrize("patchsize", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_patchify_matches_unfold(patchsize, seed):
  rng = np.random.default_rng(seed)
  b, h, w, c = (
      rng.integers(1, 3),
      rng.integers(3, 8),
      rng.integers(3, 8),
      rng.integers(1, 6),
  )
  x = rng.standard_normal((b, h, w, c)).astype(np.float32)
  got = np.asarray(features.patchify(x, patchsize))
  ref, sides = _torch_patchify(
      torch.from_numpy(x).permute(0, 3, 1, 2), patchsize
  )
  ref = ref.reshape(b, sides[0], sides[1], -1).numpy()
  assert got.shape == ref.shape
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "src,dst",
    [
        ((7, 5), (14, 10)),
        ((14, 14), (28, 28)),
        ((3, 4), (11, 7)),
        ((9, 13), (4, 5)),
        ((1, 1), (3, 2)),
        ((6, 6), (6, 6)),
    ],
)
def test_resize_bilinear_matches_torch(src, dst):
  rng = np.random.default_rng(sum(src) + sum(dst))
  x = rng.standard_normal((2, *src, 3)).astype(np.float32)
  got = np.asarray(features.resize_bilinear(x, dst))
  ref = (
      F.interpolate(
          torch.from_numpy(x).permute(0, 3, 1, 2),
          size=dst,
          mode="bilinear",
          align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "length,out",
    [
        (10, 3),
        (4608, 1024),
        (9216, 1024),
        (2048, 1024),
        (360, 1024),
        (7, 7),
        (5, 13),
        (1008, 1024),
        (100, 1),
        (200, 7),
    ],
)
def test_adaptive_avg_pool1d_matches_torch(length, out):
  rng = np.random.default_rng(length * 7 + out)
  x = rng.standard_normal((3, 2, length)).astype(np.float32)
  got = np.asarray(features.adaptive_avg_pool1d(x, out))
  ref = (
      F.adaptive_avg_pool1d(torch.from_numpy(x).reshape(6, 1, length), out)
      .reshape(3, 2, out)
      .numpy()
  )
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "seed,cfg",
    [
        (0, dict(shapes=[(8, 8, 4), (4, 4, 6)], pretrain=16, target=16)),
        (1, dict(shapes=[(7, 9, 5), (4, 5, 3)], pretrain=24, target=20)),
        (
            2,
            dict(
                shapes=[(6, 6, 8), (3, 3, 16), (2, 2, 7)],
                pretrain=32,
                target=40,
            ),
        ),
        (3, dict(shapes=[(5, 5, 3)], pretrain=10, target=7)),
        (4, dict(shapes=[(8, 8, 40), (4, 4, 112)], pretrain=64, target=64)),
        # Bins of 72 entries: too wide to fold, the staged path.
        (5, dict(shapes=[(4, 4, 64), (2, 2, 32)], pretrain=8, target=8)),
        # A bin straddles the two layers (2 * 24 -> 15).
        (6, dict(shapes=[(5, 5, 4), (3, 3, 6)], pretrain=24, target=15)),
    ],
)
def test_patch_features_matches_torch_reference(seed, cfg):
  rng = np.random.default_rng(seed)
  b = 2
  maps = [
      rng.standard_normal((b, *s)).astype(np.float32) for s in cfg["shapes"]
  ]
  got, hw = features.patch_features(maps, 3, cfg["pretrain"], cfg["target"])
  ref, ref_hw = _torch_reference(maps, 3, cfg["pretrain"], cfg["target"])
  assert hw == ref_hw
  assert got.shape == ref.shape == (b, hw[0] * hw[1], cfg["target"])
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)


def test_patch_features_jit_and_errors():
  rng = np.random.default_rng(5)
  maps = [
      rng.standard_normal((1, 4, 4, 3)).astype(np.float32),
      rng.standard_normal((1, 2, 2, 5)).astype(np.float32),
  ]
  fn = lambda a, c: features.patch_features([a, c], 3, 8, 8)[0]
  np.testing.assert_allclose(
      np.asarray(__import__("jax").jit(fn)(*maps)),
      np.asarray(fn(*maps)),
      atol=1e-6,
  )
  with pytest.raises(ValueError, match="shape"):
    features.patch_features([np.zeros((4, 4, 3), np.float32)])
  with pytest.raises(ValueError, match="batch"):
    features.patch_features(
        [np.zeros((1, 4, 4, 3), np.float32), np.zeros((2, 2, 2, 3), np.float32)]
    )
