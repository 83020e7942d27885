r"""A study of the paper as one resumable command: results, tables, figures.

  python -m softpatch_jax.experiments \
      --config=experiments/noise_sweep --workdir out/noise_sweep

(or `softpatch experiments ...`); --config is a path or the name of an
experiment shipped in softpatch_jax/configs/experiments/.

The config (`studies` describes it) holds a pipeline config `base` and a
`study`; `--config.base.<field>=...` and `--config.study.<field>=...`
override them. Each cell (one setting, one category) runs every method of
`base.methods` with one shared feature extraction
(`evaluate.evaluate_category`), and its rows are merged into results.csv at
once, atomically and in cell order. A cell whose id and configuration hash
are already in results.csv is skipped, so an interrupted run resumes where it
stopped and ends with the same table; a cell whose configuration changed is
run again and its rows replaced (a newer version with new config fields
counts as a change). At the end (and on every resume) it writes:

  results.csv   one row per cell x method: the axes, every metric, timings;
  table.md      the paper's layout per setting and metric (`study_tables`):
                categories x methods with a mean row (timings: mean per
                category and total), mean +- std over the repeat axes, and
                a methods x settings summary; the protocol axis reads
                'overlap' / 'no overlap';
  table.csv     the same numbers (setting, category, method, metric, mean,
                std, n);
  trend.png, embedding.png, weights.png   (`figures`; needs matplotlib);
  cells/<cell>/ scores, train and noise records of every cell (`reports`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import List

from absl import app
from absl import flags
from absl import logging
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import compile_cache
from softpatch_jax import data
from softpatch_jax import evaluate
from softpatch_jax import figures
from softpatch_jax import io_utils
from softpatch_jax import options
from softpatch_jax import settings
from softpatch_jax import studies
from softpatch_jax import study_tables

RESULTS = "results.csv"
_KEY_FIELDS = ["cell", "cell_index", "category", "method", "config_hash"]


class _Stacks:
  """The networks of the last cell, rebuilt when its settings change."""

  def __init__(self):
    self.key, self.value = None, None

  def get(self, opts: options.RunOptions) -> evaluate.Stack:
    key = json.dumps(
        [
            settings.as_dict(opts.backbone),
            settings.as_dict(opts.features),
            opts.data.batch_size,
            opts.seed if opts.backbone.weights == "random" else None,
        ],
        sort_keys=True,
    )
    if key != self.key:
      self.value = None  # free the old weights first
      self.key, self.value = key, opts.build_stack()
    return self.value


def _prepare(cell, stacks: _Stacks, workdir: str):
  """The cell's records, its category after the protocol, the networks and
  the preprocessing."""
  opts = options.from_config(cell.config)
  cat = data.prepare_category(opts.data, opts.noise, cell.category, workdir)
  stack = stacks.get(opts)
  pre = data.preprocess_for(
      opts.data, stack.backbone.mean, stack.backbone.std, cat.train
  )
  return opts, cat, stack, pre


def run_cell(cell, stacks: _Stacks, workdir: str) -> List[dict]:
  """Runs every method of one cell -> its result rows."""
  opts, cat, stack, pre = _prepare(cell, stacks, workdir)
  logging.info(
      "cell %d %s: %d train (%d injected), %d test",
      cell.index,
      cell.id,
      len(cat.train),
      cat.n_injected,
      len(cat.test),
  )
  cell_dir = os.path.join(workdir, "cells", cell.slug)
  return evaluate.evaluate_category(opts, cat, stack, pre, cell_dir)


def diagnose_cell(cell, stacks: _Stacks, workdir: str, key: str):
  """Saves the data of the embedding and weight figures for one cell."""
  opts, cat, stack, pre = _prepare(cell, stacks, workdir)
  figures.save_diagnosis(
      os.path.join(workdir, figures.DIAGNOSIS),
      opts,
      cat.train,
      stack.embedder,
      pre,
      key,
  )


def read_results(path: str) -> List[dict]:
  """results.csv as dicts of strings ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except (OSError, csv.Error, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None
  if rows and not set(_KEY_FIELDS) <= set(rows[0]):
    raise ValueError(
        f"{path} is not an experiment results file (columns "
        f"{sorted(rows[0])}); use another --workdir"
    )
  return rows


def _write_results(path, rows, cells, axes):
  """All rows, in cell order (then method order), whatever ran first."""
  order = {c.id: c.index for c in cells}
  rows = sorted(
      rows, key=lambda r: (order.get(r["cell"], len(order)), r["_order"])
  )
  fields = _KEY_FIELDS[:2] + [a for a, _ in axes]
  for r in rows:
    fields += [k for k in r if k not in fields and not k.startswith("_")]
  io_utils.write_csv(path, rows, fields)


def _replace_cell_rows(rows, cell, new):
  """`rows` with `cell`'s earlier rows replaced by `new`. Rows of methods
  that did not run now (dropped from base.methods since) are kept, with a
  log line naming them; they no longer count in the tables (another
  configuration)."""
  ran = {r.get("method") for r in new}
  kept = [
      r for r in rows if r["cell"] == cell.id and r.get("method") not in ran
  ]
  if kept:
    logging.info(
        "cell %s: keeping %d row(s) of method(s) %s from an earlier run "
        "(not run now) in %s",
        cell.id,
        len(kept),
        ", ".join(sorted({str(r.get("method")) for r in kept})),
        RESULTS,
    )
  return [r for r in rows if r["cell"] != cell.id] + kept + new


def _row(cell, config_hash, order, result):
  scalars = {
      k: v
      for k, v in result.items()
      if v is None or isinstance(v, (bool, int, float, str, np.generic))
  }
  return dict(
      cell=cell.id,
      cell_index=cell.index,
      **dict(cell.values),
      **scalars,
      config_hash=config_hash,
      _order=order,
  )


def run(config, workdir: str) -> dict:
  """Runs the study's missing cells; writes results, tables and figures.

  One run at a time writes `workdir` (io_utils.folder_lock).

  Returns:
    {'cells': the number of cells, 'ran': the cells computed now, 'table':
    the markdown text}.
  """
  study = studies.study_of(config)
  workdir = io_utils.ensure_writable_dir(workdir)
  with io_utils.folder_lock(workdir, "workdir"):
    io_utils.clean_stale_temps(workdir)
    return _run_locked(config, study, workdir)


def _run_locked(config, study, workdir):
  cells = studies.make_cells(config, workdir)  # every setting checked
  axes = studies.parse_axes(study.get("axes", ""))
  path = os.path.join(workdir, RESULTS)
  rows = read_results(path)
  for i, r in enumerate(rows):
    r["_order"] = i
  io_utils.write_json(os.path.join(workdir, "study.json"), config.to_dict())
  done = {(r["cell"], r["config_hash"]) for r in rows}
  diag = figures.diagnosis_cell(cells, study)
  diag_path = os.path.join(workdir, figures.DIAGNOSIS)
  stacks = _Stacks()
  ran = 0
  for cell in cells:
    h = cell.config_hash()
    if (cell.id, h) in done:
      logging.info("cell %d %s: done before, skipped", cell.index, cell.id)
    else:
      t0 = time.perf_counter()
      new = run_cell(cell, stacks, workdir)
      ran += 1
      rows = _replace_cell_rows(
          rows, cell, [_row(cell, h, j, r) for j, r in enumerate(new)]
      )
      _write_results(path, rows, cells, axes)
      logging.info(
          "cell %d/%d %s done in %.1fs",
          cell.index + 1,
          len(cells),
          cell.id,
          time.perf_counter() - t0,
      )
    key = f"{cell.id}|{h}"
    if cell.index == diag and figures.diagnosis_key(diag_path) != key:
      diagnose_cell(cell, stacks, workdir, key)
  rows = read_results(path)
  agg = study_tables.aggregate(config, cells, rows)
  table = study_tables.format_tables(config, cells, agg, rows)
  io_utils.write_text(os.path.join(workdir, "table.md"), table)
  io_utils.write_csv(
      os.path.join(workdir, "table.csv"),
      [dict(a, setting=study_tables.setting_text(a["setting"])) for a in agg],
      ["setting", "category", "method", "metric", "mean", "std", "n"],
  )
  names, _ = study_tables.method_labels(cells, rows)
  figures.write_all(workdir, study, agg, names)
  print(table, flush=True)
  print(
      f"{ran} of {len(cells)} cells run now; results in {path}, tables in "
      "table.md and table.csv",
      flush=True,
  )
  return {"cells": len(cells), "ran": ran, "table": table}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config  # defined by cli_flags.define_experiment_flags
  if config is None:
    raise app.UsageError("--config is required")
  cli_flags.verbose_logging()
  compile_cache.enable(flags.FLAGS.compilation_cache)
  try:
    run(config, flags.FLAGS.workdir)
  except (ValueError, backbones.WeightsUnavailableError) as e:
    # Bad input (a file, a value, a shape): one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  # Defined here rather than at import (as for softpatch_jax.main, which
  # owns the same flag names; `softpatch experiments` defines them first).
  cli_flags.prepare(sys.argv, cli_flags.define_experiment_flags, __doc__)
  cli_flags.run_app(main)
