"""The settings of the baselines (config.baselines): PaDiM, CFLOW and the
PaDiM image filter of 'padim_filter+<method>' (PaDiM* of the paper's tables).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from softpatch_jax import settings

# Random channels of the concatenated layer1-3 maps (EfficientNet-Lite:
# stage2/3/5), per backbone; 100 and 550 are the PaDiM paper's.
PADIM_CHANNELS = {
    "resnet18": 100,
    "wide_resnet50_2": 550,
    "efficientnet_lite0": 100,
    "efficientnet_lite1": 100,
    "efficientnet_lite2": 100,
}


@dataclasses.dataclass(frozen=True)
class PadimOptions:
  """config.baselines.padim. channels: per backbone; eps: covariance + eps I."""

  channels: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict(PADIM_CHANNELS)
  )
  eps: float = 0.01

  def __post_init__(self):
    table = {
        str(k): settings.check_int(v, f"baselines.padim.channels.{k}", 1)
        for k, v in dict(self.channels).items()
    }
    settings.set_field(self, "channels", table)
    eps = settings.check_float(self.eps, "baselines.padim.eps", 0.0)
    settings.set_field(self, "eps", eps)

  def channels_for(self, backbone: str) -> int:
    if backbone not in self.channels:
      raise ValueError(
          "config.baselines.padim.channels has no entry for backbone "
          f"{backbone!r}; set --config.baselines.padim.channels.{backbone}=N"
      )
    return self.channels[backbone]


@dataclasses.dataclass(frozen=True)
class CflowOptions:
  """config.baselines.cflow: CFLOW's decoders, Adam on the NLL.

  epochs over all training positions in batches of batch_positions. Cost
  measured on a 2-core CPU, EfficientNet-Lite0 at 224 px, 132 ELPV cells
  (414k, 103k and 26k positions at the three scales): about 35 s per epoch,
  125-140 s per category with these settings. Longer training helps: ELPV
  mono image AUROC 0.78 / 0.85 / 0.86 after 2 / 3 / 6 epochs (lr 1e-3 /
  3e-3 / 1e-3).
  """

  epochs: int = 3
  coupling_blocks: int = 8
  learning_rate: float = 3e-3
  condition_dim: int = 128
  batch_positions: int = 1024
  hidden_ratio: float = 2.0
  clamp: float = 1.9

  def __post_init__(self):
    for name in ("epochs", "coupling_blocks", "batch_positions"):
      v = settings.check_int(getattr(self, name), f"baselines.cflow.{name}", 1)
      settings.set_field(self, name, v)
    dim = settings.check_int(
        self.condition_dim, "baselines.cflow.condition_dim"
    )
    settings.require(
        dim >= 4 and dim % 4 == 0,
        "baselines.cflow.condition_dim",
        "a multiple of 4",
        dim,
    )
    settings.set_field(self, "condition_dim", dim)
    for name in ("learning_rate", "hidden_ratio", "clamp"):
      v = getattr(self, name)
      v = settings.check_float(v, f"baselines.cflow.{name}", 0.0, lo_open=True)
      settings.set_field(self, name, v)


@dataclasses.dataclass(frozen=True)
class BaselineOptions:
  """config.baselines.

  filter_fraction: PaDiM* drops this share of the training images, those
    PaDiM on filter_backbone scores highest. Without that backbone's
    weights (no network, no local .pth as filter_weights) the configured
    backbone is used instead, with a warning.
  filter_folds: each fold's images are scored by the Gaussians of the
    others (1: in sample, which cannot tell images apart with fewer images
    than channels).
  """

  padim: PadimOptions = dataclasses.field(default_factory=PadimOptions)
  cflow: CflowOptions = dataclasses.field(default_factory=CflowOptions)
  filter_fraction: float = 0.15
  filter_folds: int = 5
  filter_backbone: str = "resnet18"
  filter_weights: str = "imagenet"

  def __post_init__(self):
    frac = settings.check_float(
        self.filter_fraction,
        "baselines.filter_fraction",
        0.0,
        1.0,
        hi_open=True,
    )
    settings.set_field(self, "filter_fraction", frac)
    folds = settings.check_int(self.filter_folds, "baselines.filter_folds", 1)
    settings.set_field(self, "filter_folds", folds)
