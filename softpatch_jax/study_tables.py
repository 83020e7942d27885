"""The tables of a study: its results rows aggregated, as markdown.

`aggregate` and `format_tables` turn the result rows of a study's cells
(`studies`) into the layout of the SoftPatch paper (Jiang et al., NeurIPS
2022): categories x methods with a mean row, mean +- std over the repeat
axes, and a methods x settings summary. The protocol axis reads 'overlap' /
'no overlap' (`VALUE_LABELS`); timings get a 'mean per category' and a
'total' row; a PaDiM* filter that ran on a fallback backbone is named in its
method's label and in a footnote (README, "The paper's studies"). Nothing
here reads or writes files (`experiments` does).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from softpatch_jax import methods as methods_lib
from softpatch_jax import studies

# How the tables and figures name axis values (the protocol) and metrics.
VALUE_LABELS = {
    ("noise.overlap", "True"): "overlap",
    ("noise.overlap", "False"): "no overlap",
    # An '_excl_injected' metric of the overlap cells (`metric_settings`).
    ("noise.overlap", "excl"): "overlap models, injected test images left out",
}
METRIC_TITLES = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "image_auroc_excl_injected": (
        "image AUROC without the injected test images (the no-overlap "
        "result of the overlap cells)"
    ),
    "pixel_auroc_excl_injected": (
        "pixel AUROC without the injected test images (the no-overlap "
        "result of the overlap cells)"
    ),
}
EXCL_SUFFIX = "_excl_injected"


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
  Timings (metrics ending in '_s') also get a 'total' category: the sum over
  the categories within each repeat, then mean +- std over the repeats.
  Only rows of the current cells (same id and configuration) count.
  """
  study = studies.study_of(config)
  repeat = set(studies.repeat_axes(study))
  metrics = studies.split_list(study.get("metrics", "image_auroc"))
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
        [d[c] for c in cats] for d in reps.values() if all(c in d for c in cats)
    ]
    summary = [("mean", [np.mean(v) for v in complete])]
    if m.endswith("_s"):  # seconds add up: the total beside the mean
      summary.append(("total", [np.sum(v) for v in complete]))
    for cat, vals in list(per_cat.items()) + summary:
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
  """The raw setting, 'noise.overlap=True, noise.ratio=0.1' (table.csv)."""
  return ", ".join(f"{a}={v}" for a, v in setting) or "all"


def setting_label(setting) -> str:
  """How tables and figures name a setting: 'overlap, noise.ratio=0.1'."""
  return (
      ", ".join(VALUE_LABELS.get((a, v), f"{a}={v}") for a, v in setting)
      or "all"
  )


def metric_settings(metric: str, settings) -> List[tuple]:
  """[(setting, the axes its label names)] -> those `metric` is shown for.

  An '_excl_injected' metric is the no-overlap result of the overlap cells:
  shown only for those, labelled as such rather than 'overlap'; in
  no-overlap cells it equals the plain metric.
  """
  if not metric.endswith(EXCL_SUFFIX):
    return list(settings)
  excl = (("noise.overlap", "excl"),)
  return [
      (s, excl + tuple(x for x in lab if x[0] != "noise.overlap"))
      for s, lab in settings
      if ("noise.overlap", "False") not in s
  ]


def filter_backbones(cells, rows) -> Dict[str, Dict[str, list]]:
  """{method: {backbone: [cells, fallback]}}: the backbones the PaDiM*
  filter of each 'padim_filter+' method ran on in the current cells, and
  whether that was the fallback (results column image_filter_fallback)."""
  current = {(c.id, c.config_hash()) for c in cells}
  out: Dict[str, Dict[str, list]] = {}
  for r in rows:
    used = r.get("image_filter_backbone")
    if (
        used in (None, "", "n/a", "None")
        or (r.get("cell"), r.get("config_hash")) not in current
    ):
      continue
    entry = out.setdefault(r["method"], {}).setdefault(used, [0, False])
    entry[0] += 1
    entry[1] = entry[1] or str(r.get("image_filter_fallback")) == "True"
  return out


def method_labels(cells, rows=()) -> Tuple[Dict[str, str], List[str]]:
  """({method: table label}, footnotes): a PaDiM* filter that ran on a
  fallback backbone is named in its label and in a footnote."""
  used = filter_backbones(cells, rows)
  names, notes = {}, []
  for m in studies.methods_of(cells):
    fallback = [b for b, (_, fb) in used.get(m, {}).items() if fb]
    names[m] = studies.label(
        m, ", ".join(fallback) + (", fallback" * bool(fallback))
    )
    configured = next(
        str(c.config.baselines.filter_backbone)
        for c in cells
        if m in methods_lib.parse_methods(c.config.methods)
    )
    for b, (n, fb) in used.get(m, {}).items():
      why = f" (fallback: no {configured} weights)" if fb else ""
      notes.append(
          f"{names[m]}: the PaDiM* image filter ran on {b}{why} in {n} cell(s)."
      )
  return names, notes


def _row_name(cat: str, metric: str, n_cats: int) -> str:
  if metric.endswith("_s") and cat == "mean":
    return "mean per category"
  if cat == "total":
    return f"total ({n_cats} categor{'y' if n_cats == 1 else 'ies'})"
  return cat


def _metric_tables(metric, settings, cats_of, names, cell_text) -> List[str]:
  """One metric's summary (methods x settings) and per-setting tables."""
  pairs = metric_settings(metric, settings)
  lines = []
  if metric.endswith(EXCL_SUFFIX) and metric in METRIC_TITLES:
    lines += ["", f"{metric}: {METRIC_TITLES[metric]}."]
  per = "mean per category" if metric.endswith("_s") else "mean over categories"
  if len(pairs) > 1:
    lines += ["", f"## {metric}: {per}", ""]
    lines += _markdown(
        ["method"] + [setting_label(lab) for _, lab in pairs],
        [
            [names[m]] + [cell_text(s, "mean", m, metric) for s, _ in pairs]
            for m in names
        ],
    )
  for s, lab in pairs:
    extra = ["total"] if metric.endswith("_s") else []
    lines += ["", f"## {metric}: {setting_label(lab)}", ""]
    lines += _markdown(
        ["category"] + list(names.values()),
        [
            [_row_name(cat, metric, len(cats_of[s]))]
            + [cell_text(s, cat, m, metric) for m in names]
            for cat in cats_of[s] + ["mean"] + extra
        ],
    )
  return lines


def format_tables(config, cells, agg, rows=()) -> str:
  """The markdown tables: per setting and metric, then the summaries.

  `rows` (the results rows) name the PaDiM* filter's backbone where it fell
  back to another (`method_labels`).
  """
  study = studies.study_of(config)
  repeat = studies.repeat_axes(study)
  names, notes = method_labels(cells, rows)
  cats_of = _categories(cells, repeat)
  index = {
      (a["setting"], a["category"], a["method"], a["metric"]): a for a in agg
  }
  ns = sorted({a["n"] for a in agg if a["category"] not in ("mean", "total")})
  # Axes with one value are stated once instead of in every heading.
  fixed = [
      (a, vals[0])
      for a, vals in studies.parse_axes(study.get("axes", ""))
      if len(vals) == 1 and a not in repeat
  ]
  settings = [(s, tuple(x for x in s if x not in fixed)) for s in cats_of]
  lines = [f"# {study.get('title', '') or 'Experiment'}", ""]
  lines.append(
      f"Mean ± sample std over {', '.join(repeat) or 'one run'} "
      f"(n = {', '.join(map(str, ns)) or 0} runs per entry); 'mean' averages "
      "the categories within each run first (timings: 'mean per category', "
      "and 'total' sums the categories of a run). '-': not run yet or n/a."
      + (f" All cells: {setting_label(fixed)}." if fixed else "")
  )
  lines += [""] + notes if notes else []

  def cell_text(s, cat, m, metric):
    return _fmt(index.get((s, cat, m, metric)), metric)

  for metric in studies.split_list(study.get("metrics", "image_auroc")):
    if not any(a["metric"] == metric for a in agg):
      lines += ["", f"{metric}: n/a for every cell (no labels for it)."]
      continue
    lines += _metric_tables(metric, settings, cats_of, names, cell_text)
  return "\n".join(lines) + "\n"


def _markdown(header, body) -> List[str]:
  return [
      "| " + " | ".join(header) + " |",
      "|" + "|".join("---" for _ in header) + "|",
  ] + ["| " + " | ".join(row) + " |" for row in body]
