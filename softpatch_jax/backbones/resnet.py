"""ResNet-18 and Wide-ResNet-50-2 in Flax (NHWC), torchvision architecture.

Layer-for-layer the torchvision models (ResNet v1.5: the stride of a
bottleneck sits on its 3x3 conv), with explicit torch-style padding so
pretrained torchvision weights give the same activations. BatchNorm always
runs in inference mode with the stored running statistics.

Taps: 'layer1' (stride 4) .. 'layer4' (stride 32) and 'logits' (avg pool +
fc). The forward pass stops after the last requested tap.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

TAPS = ("layer1", "layer2", "layer3", "layer4", "logits")

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "wide_resnet50_2": (
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
    ),
}

# Per architecture: block type, blocks per stage, bottleneck width multiplier.
CONFIGS = {
    "resnet18": dict(block="basic", stages=(2, 2, 2, 2), width_factor=1),
    "wide_resnet50_2": dict(
        block="bottleneck", stages=(3, 4, 6, 3), width_factor=2
    ),
}

_BN = partial(
    nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5
)


def _conv(features, kernel, stride=1, name=None):
  pad = kernel // 2  # torch padding for 1x1 / 3x3 / 7x7 convs
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      name=name,
  )


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    y = _conv(self.planes, 3, self.stride, name="conv1")(x)
    y = nn.relu(_BN(name="bn1")(y))
    y = _conv(self.planes, 3, 1, name="conv2")(y)
    y = _BN(name="bn2")(y)
    if self.downsample:
      x = _conv(self.planes, 1, self.stride, name="downsample_0")(x)
      x = _BN(name="downsample_1")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  width_factor: int = 1

  @nn.compact
  def __call__(self, x):
    width = self.planes * self.width_factor
    y = nn.relu(_BN(name="bn1")(_conv(width, 1, name="conv1")(x)))
    y = nn.relu(_BN(name="bn2")(_conv(width, 3, self.stride, name="conv2")(y)))
    y = _BN(name="bn3")(_conv(self.planes * 4, 1, name="conv3")(y))
    if self.downsample:
      x = _conv(self.planes * 4, 1, self.stride, name="downsample_0")(x)
      x = _BN(name="downsample_1")(x)
    return nn.relu(y + x)


def _max_pool_torch(x):
  # torch MaxPool2d(3, 2, padding=1): padded cells never win (-inf).
  return lax.reduce_window(
      x,
      -jnp.inf,
      lax.max,
      (1, 3, 3, 1),
      (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)),
  )


class ResNet(nn.Module):
  """torchvision ResNet; ``__call__(x, layers)`` returns {tap: NHWC array}."""

  block: str = "basic"
  stages: Sequence[int] = (2, 2, 2, 2)
  width_factor: int = 1
  num_classes: int = 1000
  layers: Sequence[str] = ("layer2", "layer3")

  @nn.compact
  def __call__(self, x, layers: Sequence[str] | None = None):
    layers = tuple(self.layers if layers is None else layers)
    bad = [t for t in layers if t not in TAPS]
    if bad or not layers:
      raise ValueError(
          f"unknown ResNet taps {bad or layers!r}; valid taps: {TAPS}"
      )
    last = max(TAPS.index(t) for t in layers)
    out = {}
    x = _conv(64, 7, 2, name="conv1")(x)
    x = nn.relu(_BN(name="bn1")(x))
    x = _max_pool_torch(x)
    expansion = 1 if self.block == "basic" else 4
    in_ch = 64
    for s, n_blocks in enumerate(self.stages):
      planes = 64 * 2**s
      for b in range(n_blocks):
        stride = 2 if (b == 0 and s > 0) else 1
        down = b == 0 and (stride != 1 or in_ch != planes * expansion)
        name = f"layer{s + 1}_{b}"
        if self.block == "basic":
          x = BasicBlock(planes, stride, down, name=name)(x)
        else:
          x = Bottleneck(planes, stride, down, self.width_factor, name=name)(x)
        in_ch = planes * expansion
      tap = f"layer{s + 1}"
      if tap in layers:
        out[tap] = x
      if last == s:
        return out
    pooled = jnp.mean(x, axis=(1, 2))
    out["logits"] = nn.Dense(self.num_classes, name="fc")(pooled)
    return out


def build(name: str, layers: Sequence[str] = ("layer2", "layer3")) -> ResNet:
  if name not in CONFIGS:
    raise ValueError(f"unknown ResNet {name!r}; available: {sorted(CONFIGS)}")
  return ResNet(**CONFIGS[name], layers=tuple(layers))


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def torch_module_name(flax_name: str) -> str:
  """``layer1_0`` -> ``layer1.0``; ``downsample_1`` -> ``downsample.1``."""
  m = _INDEXED.match(flax_name)
  return f"{m.group(1)}.{m.group(2)}" if m else flax_name
