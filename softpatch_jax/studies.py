"""A study of the paper as data: its cells, and its results as tables.

An experiment config (softpatch_jax/configs/experiments/) has two parts:
  base   a pipeline config (softpatch_jax/defaults.py): data, backbone,
         methods, noise protocol.
  study  what varies:
    axes     'field=v1,v2;field=v1,...': a config field of `base` and its
             values (Python literals), e.g. 'noise.ratio=0,0.1;seed=0,1,2'.
             'seed' sets both `seed` and `noise.seed`. An axis named in
             `presets` takes preset names as values.
    presets  {axis: {value: 'field=v field=v ...'}}: named sets of fields,
             e.g. augment.blur = 'noise.augment=True noise.augment_blur=True'.
    repeat   axes averaged in the tables (mean +- std), default 'seed'.
    metrics  result columns to tabulate, default 'image_auroc'.
    title; figures (bool) and diagnose ('auto' or 'none'), see `figures`.

`make_cells` lists the cells: the product of the axes in the given order,
the last varying fastest, then the categories of each setting; `study_tables`
turns their result rows into the paper's tables (SoftPatch, Jiang et al.,
NeurIPS 2022). Nothing here reads or writes files (`experiments` does).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import itertools
import json
import re
from typing import List, Optional, Tuple

import ml_collections

from softpatch_jax import data
from softpatch_jax import methods as methods_lib
from softpatch_jax import options

SEED_FIELDS = ("seed", "noise.seed")
# Display names of the paper's methods in the tables and figures.
LABELS = {
    "patchcore": "PatchCore",
    "patchcore_random": "PatchCore-random",
    "patchcore_full": "PatchCore-full",
    "softpatch_lof": "SoftPatch-LOF",
    "softpatch_nearest": "SoftPatch-nearest",
    "softpatch_gaussian": "SoftPatch-gaussian",
    "softpatch_fusion": "SoftPatch-fusion",
    "padim": "PaDiM",
    "cflow": "CFLOW",
    "softpatch_mutual": "SoftPatch-mutual",
    "consensus": "Consensus",
}


def label(method: str, filter_backbone: str = "") -> str:
  """A method's display name ('padim_filter+patchcore' -> 'PaDiM*+PatchCore';
  with filter_backbone 'b' -> 'PaDiM*(filter: b)+PatchCore')."""
  if method.startswith("padim_filter+"):
    note = f"(filter: {filter_backbone})" if filter_backbone else ""
    return f"PaDiM*{note}+" + label(method.split("+", 1)[1])
  if method.startswith("softpatch_fusion_"):
    return "SoftPatch-fusion-" + method.rsplit("_", 1)[1]
  return LABELS.get(method, method)


@dataclasses.dataclass
class Cell:
  """One run of every method on one category under one setting."""

  index: int
  values: Tuple[Tuple[str, str], ...]  # (axis, raw value text) in axis order
  category: str
  config: ml_collections.ConfigDict

  @property
  def id(self) -> str:
    return ",".join(
        [f"{a}={v}" for a, v in self.values] + [f"category={self.category}"]
    )

  @property
  def slug(self) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.id.replace(",", "__"))

  def config_hash(self) -> str:
    """What the cell's results depend on: its config without `output`."""
    d = self.config.to_dict()
    d.pop("output", None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def study_of(config) -> ml_collections.ConfigDict:
  if "base" not in config or "study" not in config:
    raise ValueError(
        "an experiment config needs `base` (a pipeline config) and `study` "
        f"(axes, repeat, metrics); got fields {sorted(config.keys())}"
    )
  return config.study


def parse_axes(spec: str) -> List[Tuple[str, List[str]]]:
  """'a=1,2;b=x' -> [('a', ['1', '2']), ('b', ['x'])] (raw value texts)."""
  axes = []
  for part in (spec or "").split(";"):
    if not part.strip():
      continue
    name, sep, values = part.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name.strip() or not vals:
      raise ValueError(
          f"config.study.axes: bad axis {part.strip()!r}; write "
          "'field=v1,v2;field=v1,...'"
      )
    if name.strip() in [a for a, _ in axes]:
      raise ValueError(f"config.study.axes: axis {name.strip()!r} repeats")
    axes.append((name.strip(), vals))
  return axes


def parse_value(text: str):
  """A Python literal ('0.1', 'True', "'a'"), else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_field(config, field: str, value) -> None:
  """config.<dotted field> = value, for fields that exist (ValueError)."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ValueError(f"config.study: no config field {field!r}")
    node = node[p]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f"config.study: no config field {field!r}")
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"config.study: {field}={value!r}: {e}") from None


def _assignments(study, axis: str, raw: str) -> List[Tuple[str, object]]:
  presets = study.get("presets") or {}
  if axis in presets:
    if raw not in presets[axis]:
      raise ValueError(
          f"config.study.presets.{axis} has no {raw!r}; it has "
          f"{sorted(presets[axis].keys())}"
      )
    out = []
    for item in str(presets[axis][raw]).split():
      field, sep, value = item.partition("=")
      if not sep:
        raise ValueError(
            f"config.study.presets.{axis}.{raw}: bad assignment {item!r}"
        )
      out.append((field, parse_value(value)))
    return out
  if axis == "seed":
    return [(f, parse_value(raw)) for f in SEED_FIELDS]
  return [(axis, parse_value(raw))]


def settings_of(config) -> List[Tuple[tuple, ml_collections.ConfigDict]]:
  """Every setting of the study: ((axis, raw value), ...) and its config,
  each checked by building its records (`options.from_config`)."""
  study = study_of(config)
  axes = parse_axes(study.get("axes", ""))
  out = []
  for combo in itertools.product(*[vals for _, vals in axes]):
    values = tuple((a, v) for (a, _), v in zip(axes, combo))
    cfg = copy.deepcopy(config.base)
    for axis, raw in values:
      for field, value in _assignments(study, axis, raw):
        set_field(cfg, field, value)
    options.from_config(cfg)  # every field of every setting, before any work
    out.append((values, cfg))
  repeat_axes(study)  # checked before any work
  return out


def make_cells(config, workdir: Optional[str] = None) -> List[Cell]:
  """Every cell of the study, in the stable run order."""
  cells = []
  for values, cfg in settings_of(config):
    for cat in data.list_categories(options.from_config(cfg).data, workdir):
      cells.append(Cell(len(cells), values, cat, cfg))
  return cells


def repeat_axes(study) -> List[str]:
  """study.repeat, by default 'seed' when that is an axis."""
  names = [a for a, _ in parse_axes(study.get("axes", ""))]
  repeat = split_list(study.get("repeat", None))
  if "repeat" not in study or study.repeat is None:
    repeat = ["seed"] if "seed" in names else []
  bad = [a for a in repeat if a not in names]
  if bad:
    raise ValueError(f"config.study.repeat names axes {bad} not in {names}")
  return repeat


def split_list(text) -> List[str]:
  if isinstance(text, (list, tuple)):
    return [str(t) for t in text]
  return [t.strip() for t in str(text or "").split(",") if t.strip()]


def methods_of(cells) -> List[str]:
  """Every method of the cells, in config order."""
  return list(
      dict.fromkeys(
          m for c in cells for m in methods_lib.parse_methods(c.config.methods)
      )
  )
