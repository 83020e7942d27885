"""The config edge: every config group becomes its stage's typed record."""

import dataclasses
import glob
import math
import os

import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import cli_flags
from softpatch_jax import defaults
from softpatch_jax import denoise
from softpatch_jax import options
from softpatch_jax import scoring
from softpatch_jax import studies

CONFIGS = cli_flags.config_names()
EXPERIMENTS = [c for c in CONFIGS if c.startswith("experiments")]


def test_base_config_is_the_records_defaults():
  assert options.from_config(defaults.base_config()) == options.RunOptions()


def _groups(record, prefix=""):
  for f in dataclasses.fields(record):
    v = getattr(record, f.name)
    if dataclasses.is_dataclass(v):
      yield from _groups(v, f"{prefix}{f.name}.")
    else:
      yield f"{prefix}{f.name}"


def test_every_record_field_is_a_config_field_and_back():
  c = defaults.base_config()
  fields = set(_groups(options.RunOptions()))
  flat = set()

  def walk(d, prefix=""):
    for k, v in d.items():
      # padim.channels is one setting (a table), like its record field.
      if isinstance(v, dict) and not k == "channels":
        walk(v, f"{prefix}{k}.")
      else:
        flat.add(f"{prefix}{k}")

  walk(c.to_dict())
  assert fields == flat


@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in EXPERIMENTS])
def test_every_config_file_builds_its_records(name):
  opts = options.from_config(_testutil.load_config(name))
  assert opts.method_names


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_setting_builds_its_records(name):
  settings = studies.settings_of(_testutil.load_config(name))
  assert settings
  for _, cfg in settings:
    assert options.from_config(cfg).method_names


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("denoise.lof_k", 0, r"config\.denoise\.lof_k must be an integer >= 1"),
        ("denoise.noise_fraction", 1.0, r"config\.denoise\.noise_fraction"),
        ("denoise.fusion", "max", r"config\.denoise\.fusion must be one of"),
        ("coreset.fraction", 0.0, r"config\.coreset\.fraction must be"),
        ("coreset.impl", "fast", r"config\.coreset\.impl must be one of"),
        ("scoring.blur_sigma", 1e6, r"config\.scoring\.blur_sigma"),
        ("scoring.memory_budget_mb", math.inf, r"scoring\.memory_budget_mb"),
        ("scoring.memory_budget_mb", -1.0, r"scoring\.memory_budget_mb"),
        ("scoring.search", "faiss", r"config\.scoring\.search must be one of"),
        ("features.target_embed_dim", 0, r"features\.target_embed_dim"),
        ("data.batch_size", 0, r"config\.data\.batch_size"),
        ("data.feature_store", "cloud", r"config\.data\.feature_store"),
        ("data.max_train", -1, r"config\.data\.max_train"),
        ("noise.draw", "dice", r"config\.noise\.draw must be one of"),
        ("noise.ratio", -0.1, r"config\.noise\.ratio"),
        ("threshold.method", "otsu", r"config\.threshold\.method"),
        ("threshold.folds", 1, r"config\.threshold\.folds must be >= 2"),
        ("parallel.mode", "maybe", r"config\.parallel\.mode must be one of"),
        ("baselines.cflow.condition_dim", 6, r"multiple of 4"),
        ("baselines.filter_fraction", 1.5, r"baselines\.filter_fraction"),
        ("methods", "softpatch_lof,nope", r"unknown method 'nope'"),
        ("mode", "train", r"config\.mode must be one of"),
    ],
)
def test_bad_values_are_refused_naming_the_field(field, value, match):
  d = defaults.base_config().to_dict()
  node = d
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=match):
    options.from_config(d)


def test_unknown_fields_are_refused():
  d = defaults.base_config().to_dict()
  d["denoise"]["lof_kk"] = 3
  with pytest.raises(ValueError, match=r"config\.denoise\.lof_kk is not a"):
    options.from_config(d)
  d = defaults.base_config().to_dict()
  d["denoize"] = {}
  with pytest.raises(ValueError, match=r"config\.denoize is not a setting"):
    options.from_config(d)


def test_records_normalise_their_values():
  c = defaults.base_config()
  c.data.categories = "mono, poly"
  c.scoring.soft_weight = True
  d = c.to_dict()
  d["backbone"]["layers"] = "stage3, stage5"
  opts = options.from_config(d)
  assert opts.backbone.layers == ("stage3", "stage5")
  assert opts.data.category_names == ("mono", "poly")
  assert opts.scoring.soft_weight is True
  assert opts.to_dict()["backbone"]["layers"] == ["stage3", "stage5"]


def test_to_config_round_trips_and_allows_optional_fields():
  opts = options.RunOptions(
      denoise=denoise.DenoiseOptions(lof_k=3),
      scoring=scoring.ScoringOptions(soft_weight=False, blur_sigma=2.0),
  )
  c = options.to_config(opts)
  assert options.from_config(c) == opts
  c = options.to_config()
  c.threshold.pixel_quantile = 0.9  # a placeholder accepts its type
  assert options.from_config(c).threshold.pixel_quantile == 0.9
