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
  """config.baselines.cflow: CFLOW's decoders and their training (Adam).

  epochs over all training positions in batches of batch_positions, but at
  least min_steps Adam steps per scale (a coarse grid has few positions:
  at 128 px the stage5 grid of 40 ELPV cells holds 2560 positions, 2 batches
  an epoch, and its decoder trained 6 steps before this floor). objective:
  'logsigmoid' (-log sigmoid(log p / C), CFLOW-AD's released code) or
  'nll' (-log p / C). See benchmarks/REFERENCE_BASELINES.md.

  Measured on a 2-core CPU, EfficientNet-Lite0, ELPV at 128 px with 40
  training cells (defaults.study_base('elpv'); grids 32², 16², 8²): these
  defaults give image AUROC 0.87 (mono) / 0.89 (poly) in 40-60 s per
  category; the old training (no step floor, plain NLL, no learnt global
  scale) gave 0.47 / 0.74. 128 px is enough here: the per-scale likelihoods
  alone reach 0.83-0.92. At 224 px with 132 cells an epoch took about 35 s.
  """

  epochs: int = 3
  coupling_blocks: int = 8
  learning_rate: float = 3e-3
  condition_dim: int = 128
  batch_positions: int = 1024
  hidden_ratio: float = 2.0
  clamp: float = 1.9
  min_steps: int = 200
  objective: str = "logsigmoid"

  def __post_init__(self):
    settings.require(
        self.objective in ("logsigmoid", "nll"),
        "baselines.cflow.objective",
        "'logsigmoid' or 'nll'",
        self.objective,
    )
    for name in ("epochs", "coupling_blocks", "batch_positions", "min_steps"):
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
