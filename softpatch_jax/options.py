"""The edge between the config and the stages: `RunOptions.from_config`.

The ml_collections config (softpatch_jax/configs/, `defaults.base_config`) is
read here and nowhere below. `from_config` turns each config group into the
typed, frozen record of its stage (`denoise.DenoiseOptions`, `scoring.
ScoringOptions`, ...), each of which checks its own fields once and holds
the only defaults. Everything below the edge takes these records or plain
values.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import ml_collections

from softpatch_jax import backbones
from softpatch_jax import consensus
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import denoise
from softpatch_jax import embedding
from softpatch_jax import features
from softpatch_jax import methods as methods_lib
from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax import settings
from softpatch_jax import thresholds
from softpatch_jax.baselines import options as baseline_options
from softpatch_jax.data import noise
from softpatch_jax.data import types as data_types

MODES = ("evaluate", "fit")


@dataclasses.dataclass(frozen=True)
class OutputOptions:
  """config.output. num_heatmaps: defective test images per heatmap PNG."""

  num_heatmaps: int = 4

  def __post_init__(self):
    n = settings.check_int(self.num_heatmaps, "output.num_heatmaps")
    settings.set_field(self, "num_heatmaps", n)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Every setting of a run, one typed record per stage.

  seed: the PRNG seed of projections, coreset starts and baselines.
  mode: 'evaluate' (fit + predict + metrics per labelled category) or 'fit'
    (fit on an unlabelled folder and save a model, the fit_folder config).
  methods: comma-separated method names (`methods.parse_methods`).
  distributed: jax.distributed.initialize() first (a TPU pod slice).
  """

  seed: int = 0
  mode: str = "evaluate"
  methods: str = "softpatch_lof,patchcore"
  distributed: bool = False
  parallel: parallel.ParallelOptions = dataclasses.field(
      default_factory=parallel.ParallelOptions
  )
  backbone: backbones.BackboneOptions = dataclasses.field(
      default_factory=backbones.BackboneOptions
  )
  features: features.EmbedOptions = dataclasses.field(
      default_factory=features.EmbedOptions
  )
  denoise: denoise.DenoiseOptions = dataclasses.field(
      default_factory=denoise.DenoiseOptions
  )
  coreset: coreset.CoresetOptions = dataclasses.field(
      default_factory=coreset.CoresetOptions
  )
  scoring: scoring.ScoringOptions = dataclasses.field(
      default_factory=scoring.ScoringOptions
  )
  threshold: thresholds.ThresholdOptions = dataclasses.field(
      default_factory=thresholds.ThresholdOptions
  )
  data: data_types.DataOptions = dataclasses.field(
      default_factory=data_types.DataOptions
  )
  noise: noise.NoiseOptions = dataclasses.field(
      default_factory=noise.NoiseOptions
  )
  baselines: baseline_options.BaselineOptions = dataclasses.field(
      default_factory=baseline_options.BaselineOptions
  )
  consensus: consensus.ConsensusOptions = dataclasses.field(
      default_factory=consensus.ConsensusOptions
  )
  output: OutputOptions = dataclasses.field(default_factory=OutputOptions)

  def __post_init__(self):
    settings.set_field(self, "seed", settings.check_int(self.seed, "seed"))
    settings.check_choice(self.mode, "mode", MODES)
    if not isinstance(self.methods, str):
      settings.set_field(self, "methods", ",".join(self.methods))
    methods_lib.parse_methods(self.methods)  # every name known

  @property
  def method_names(self) -> Tuple[str, ...]:
    """The canonical method names, in the configured order."""
    return tuple(methods_lib.parse_methods(self.methods))

  def bank_options(self) -> methods_lib.BankOptions:
    """The settings of a bank fit: outlier weighting, coreset and scoring."""
    return methods_lib.BankOptions(self.denoise, self.coreset, self.scoring)

  def loader(self, errors: str = "raise") -> embedding.LoaderOptions:
    """How training images are read: threads, augmentation, storage."""
    return embedding.LoaderOptions(
        self.data.num_workers,
        data.build_augment(self.noise),
        self.data.feature_store,
        errors,
    )

  def build_stack(self) -> embedding.Stack:
    """The run's networks: the backbone (loaded once), its embedder over
    data.batch_size images per device of the parallel mesh, its tap maps."""
    return embedding.build_stack(
        self.backbone,
        self.features,
        self.data.batch_size,
        self.parallel.mesh(),
        self.seed,
    )

  @classmethod
  def from_config(cls, config) -> "RunOptions":
    """The records of a ConfigDict (or a plain dict of the same shape).

    Raises:
      ValueError: a field that is not a setting, or a value out of range;
        the message names the field ('config.denoise.lof_k ...').
    """
    if isinstance(config, ml_collections.ConfigDict):
      config = config.to_dict()
    return _build(cls, dict(config))

  def to_dict(self) -> dict:
    """Plain JSON types, the shape of the config (results files)."""
    return settings.as_dict(self)


def _build(cls, values):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
        f"config.{unknown[0]} is not a setting; the config has "
        f"{', '.join(sorted(fields))}"
    )
  hints = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for name, value in values.items():
    factory = hints[name].default_factory
    if factory is not dataclasses.MISSING and isinstance(value, dict):
      value = settings.build(type(factory()), value, name)
    kwargs[name] = value
  return cls(**kwargs)


def from_config(config) -> RunOptions:
  """`RunOptions.from_config`."""
  return RunOptions.from_config(config)


def to_config(opts: RunOptions = RunOptions()) -> ml_collections.ConfigDict:
  """A ConfigDict with the fields and values of `opts` (the defaults).

  Optional fields whose value is None become typed placeholders, so a
  command line can set them.
  """
  return _group(opts)


def _group(record) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  hints = _hints(type(record))
  for f in dataclasses.fields(record):
    v = getattr(record, f.name)
    if dataclasses.is_dataclass(v):
      v = _group(v)
    elif isinstance(v, dict):
      v = ml_collections.ConfigDict(dict(v))
    elif v is None:
      v = ml_collections.config_dict.placeholder(hints[f.name])
    setattr(c, f.name, v)
  return c


def _hints(cls) -> dict:
  """field -> the X of Optional[X] fields (bool, float, int or str)."""
  out = {}
  for f in dataclasses.fields(cls):
    t = str(f.type)
    for name, typ in (("bool", bool), ("float", float), ("int", int)):
      if t == f"Optional[{name}]":
        out[f.name] = typ
    out.setdefault(f.name, str)
  return out
