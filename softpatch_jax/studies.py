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
the last varying fastest, then the categories of each setting. `aggregate`
and `format_tables` turn result rows into the paper's layout: categories x
methods with a mean row, mean +- std over the repeat axes, and a methods x
settings summary. Nothing here reads or writes files (`experiments` does).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import itertools
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

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
}


def label(method: str) -> str:
  """A method's display name ('padim_filter+patchcore' -> 'PaDiM*+PatchCore')."""
  if method.startswith("padim_filter+"):
    return "PaDiM*+" + label(method.split("+", 1)[1])
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
  repeat = _split(study.get("repeat", None))
  if "repeat" not in study or study.repeat is None:
    repeat = ["seed"] if "seed" in names else []
  bad = [a for a in repeat if a not in names]
  if bad:
    raise ValueError(f"config.study.repeat names axes {bad} not in {names}")
  return repeat


def _split(text) -> List[str]:
  if isinstance(text, (list, tuple)):
    return [str(t) for t in text]
  return [t.strip() for t in str(text or "").split(",") if t.strip()]


# --------------------------------------------------------------------------
# Tables.


def _float(v) -> Optional[float]:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if np.isfinite(f) else None


def aggregate(
    config, cells: Sequence[Cell], rows: Sequence[dict]
) -> List[dict]:
  """Mean +- std over the repeat axes, per setting, category and method.

  Each category's metric is averaged over the repeats; the 'mean' category
  averages the categories within each repeat first, then over the repeats.
  Only rows of the current cells (same id and configuration) count.
  """
  study = study_of(config)
  repeat = set(repeat_axes(study))
  metrics = _split(study.get("metrics", "image_auroc"))
  current = {(c.id, c.config_hash()): c for c in cells}
  groups: Dict[tuple, Dict[tuple, Dict[str, float]]] = {}
  for r in rows:
    cell = current.get((r["cell"], r["config_hash"]))
    if cell is None:
      continue
    setting = tuple((a, v) for a, v in cell.values if a not in repeat)
    rep = tuple((a, v) for a, v in cell.values if a in repeat)
    for m in metrics:
      v = _float(r.get(m))
      if v is not None:
        key = (setting, r["method"], m)
        groups.setdefault(key, {}).setdefault(rep, {})[cell.category] = v
  cats_of = _categories(cells, repeat)
  out = []
  for (setting, method, m), reps in groups.items():
    cats = cats_of[setting]
    per_cat = {c: [d[c] for d in reps.values() if c in d] for c in cats}
    complete = [
        np.mean([d[c] for c in cats])
        for d in reps.values()
        if all(c in d for c in cats)
    ]
    for cat, vals in list(per_cat.items()) + [("mean", complete)]:
      if vals:
        out.append(
            dict(
                setting=setting,
                category=cat,
                method=method,
                metric=m,
                mean=float(np.mean(vals)),
                std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                n=len(vals),
            )
        )
  return out


def _categories(cells, repeat) -> Dict[tuple, List[str]]:
  """{setting: its categories in cell order}."""
  out = {}
  for c in cells:
    setting = tuple((a, v) for a, v in c.values if a not in repeat)
    out.setdefault(setting, [])
    if c.category not in out[setting]:
      out[setting].append(c.category)
  return out


def _fmt(a: Optional[dict], metric: str) -> str:
  if a is None:
    return "-"
  digits = 2 if metric.endswith("_s") else 3
  text = f"{a['mean']:.{digits}f}"
  if a["n"] > 1:
    text += f" ± {a['std']:.{digits}f}"
  return text


def setting_text(setting) -> str:
  return ", ".join(f"{a}={v}" for a, v in setting) or "all"


def format_tables(config, cells, agg) -> str:
  """The markdown tables: per setting and metric, then the summaries."""
  study = study_of(config)
  repeat = repeat_axes(study)
  methods = methods_of(cells)
  cats_of = _categories(cells, repeat)
  settings = list(cats_of)
  index = {
      (a["setting"], a["category"], a["method"], a["metric"]): a for a in agg
  }
  ns = sorted({a["n"] for a in agg if a["category"] != "mean"})
  # Axes with one value are stated once instead of in every heading.
  fixed = [
      (a, vals[0])
      for a, vals in parse_axes(study.get("axes", ""))
      if len(vals) == 1 and a not in repeat
  ]
  shown = {s: tuple(x for x in s if x not in fixed) for s in settings}
  lines = [f"# {study.get('title', '') or 'Experiment'}", ""]
  lines.append(
      f"Mean ± sample std over {', '.join(repeat) or 'one run'} "
      f"(n = {', '.join(map(str, ns)) or 0} runs per entry); 'mean' averages "
      "the categories within each run first. '-': not run yet or n/a."
      + (f" All cells: {setting_text(fixed)}." if fixed else "")
  )
  for metric in _split(study.get("metrics", "image_auroc")):
    if not any(a["metric"] == metric for a in agg):
      lines += ["", f"{metric}: n/a for every cell (no labels for it)."]
      continue
    if len(settings) > 1:
      lines += ["", f"## {metric}: mean over categories", ""]
      lines += _markdown(
          ["method"] + [setting_text(shown[s]) for s in settings],
          [
              [label(m)]
              + [
                  _fmt(index.get((s, "mean", m, metric)), metric)
                  for s in settings
              ]
              for m in methods
          ],
      )
    for s in settings:
      lines += ["", f"## {metric}: {setting_text(shown[s])}", ""]
      lines += _markdown(
          ["category"] + [label(m) for m in methods],
          [
              [cat]
              + [_fmt(index.get((s, cat, m, metric)), metric) for m in methods]
              for cat in cats_of[s] + ["mean"]
          ],
      )
  return "\n".join(lines) + "\n"


def methods_of(cells) -> List[str]:
  """Every method of the cells, in config order."""
  return list(
      dict.fromkeys(
          m for c in cells for m in methods_lib.parse_methods(c.config.methods)
      )
  )


def _markdown(header, body) -> List[str]:
  return [
      "| " + " | ".join(header) + " |",
      "|" + "|".join("---" for _ in header) + "|",
  ] + ["| " + " | ".join(row) + " |" for row in body]
