"""Evaluate mode: every method on every category, results files, heatmaps.

    python -m softpatch_jax.main --config configs/default.py --workdir out/

writes into the workdir (README, "The default job"): results.csv,
results.json (per category and mean, timings, the injected-noise record),
heatmaps/<category>.png, noise/<category>.json, and the per-category
scores/<category>.csv and train/<category>.csv of `reports`. Every file is
written atomically, so an interrupted run leaves either the previous result
or none.

The flow, top to bottom: `run` reads the config once into typed records
(`options.RunOptions`); `RunOptions.build_stack` loads the backbone once; per
category, `data.prepare_category` applies the protocol, `fit_models` fits
every method (memory banks and baselines), one pass of
`inference.predict_samples` scores the test images with all of them, and
`result_rows` turns the predictions into results rows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List

from absl import logging
import jax
import numpy as np

from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import fitting
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import methods as methods_lib
from softpatch_jax import options
from softpatch_jax import reports
from softpatch_jax import viz
from softpatch_jax.baselines import fitters
from softpatch_jax.baselines import image_filter

RESULT_FIELDS = [
    "category",
    "method",
    "image_auroc",
    "image_f1_max",
    "pixel_auroc",
    "aupro",
    "n_train",
    "n_injected",
    "n_test",
    "n_test_anomalous",
    "bank_size",
    "bank_from_injected",
    "bank_from_clean",
    "image_auroc_excl_injected",
    "pixel_auroc_excl_injected",
    "n_outlier_patches",
    "outlier_frac_injected",
    "outlier_frac_clean",
    "image_filter_backbone",
    "image_filter_fallback",
    "n_filtered_out",
    "filtered_out_injected",
    "search",
    "filter_s",
    "extract_s",
    "fit_s",
    "predict_s",
]
_METRICS = [
    "image_auroc",
    "image_f1_max",
    "pixel_auroc",
    "aupro",
    "image_auroc_excl_injected",
    "pixel_auroc_excl_injected",
]


Stack = embedding.Stack


@dataclasses.dataclass
class Fits:
  """Every method of a category fitted: {name: model scoring images}, their
  fit records and the seconds spent reading training images per method."""

  models: Dict[str, object]
  infos: Dict[str, fitting.FitInfo]
  extract_s: Dict[str, float]
  filter_fields: Dict[str, dict]


def fit_models(opts, cat: data.Category, stack: Stack, pre) -> Fits:
  """Fits every configured method on the category's training images.

  PaDiM* first: each 'padim_filter+<method>' fits on the images it keeps.
  The memory banks share one feature extraction, the baselines one pass
  over the tap maps.
  """
  names = opts.method_names
  base_opts = fitters.FitOptions(
      opts.baselines, opts.scoring, opts.seed, opts.loader()
  )
  filt = image_filter.image_filter(
      cat.train, stack.extractor, pre, names, base_opts, label=cat.name
  )
  fits = Fits({}, {}, {}, dict.fromkeys(filt.subsets, filt.fields))
  bank_names = [n for n in names if methods_lib.scores_features(n)]
  if bank_names:
    _fit_banks(opts, cat, stack, pre, bank_names, filt.subsets, fits)
  base = fitters.fit(
      cat.train,
      stack.extractor,
      pre,
      names,
      base_opts,
      subsets=filt.subsets,
      label=cat.name,
  )
  fits.models.update(base.models)
  fits.infos.update(base.infos)
  fits.extract_s.update(dict.fromkeys(base.models, base.extract_s))
  return fits


def _fit_banks(opts, cat, stack: Stack, pre, names, subsets, fits: Fits):
  """The memory-bank methods into `fits`: one feature extraction, then each
  bank (on its image filter's subset where it has one)."""
  plain = [
      n
      for n in names
      if n not in subsets and methods_lib.family(n) == methods_lib.BANK
  ]
  fitted = fitting.fit_methods(
      cat.train,
      stack.embedder,
      pre,
      plain,
      opts.bank_options(),
      seed=opts.seed,
      loader=opts.loader(),
      label=cat.name,
  )
  image_filter.fit_filtered_banks(
      fitted,
      names,
      subsets,
      opts.bank_options(),
      seed=opts.seed,
      label=cat.name,
  )
  scorers, infos = fitting.fit_consensus(
      fitted, names, subsets, opts.consensus, opts.scoring.blur_sigma
  )
  del fitted.train_feats
  mesh = stack.embedder.mesh
  fits.models.update(inference.chosen_scorers(fitted.banks, opts.scoring, mesh))
  fits.models.update(scorers)
  fits.infos.update(fitted.infos)
  fits.infos.update(infos)
  fits.extract_s.update(dict.fromkeys(names, fitted.extract_s))


def evaluate_category(opts, cat: data.Category, stack: Stack, pre, workdir):
  """Fits every configured method on one category and evaluates it -> rows."""
  names = list(opts.method_names)
  has_masks = data.has_pixel_labels(cat.test)
  fits = fit_models(opts, cat, stack, pre)
  t0 = time.perf_counter()
  preds = inference.predict_samples(
      {n: fits.models[n] for n in names},
      inference.Inputs(stack.embedder, stack.extractor),
      cat.test,
      pre,
      num_workers=opts.data.num_workers,
      with_masks=has_masks,
      desc=f"{cat.name}: test",
  )
  predict_s = time.perf_counter() - t0
  rows = [
      result_row(cat, name, preds[name], fits, has_masks, predict_s)
      for name in names
  ]
  if opts.output.num_heatmaps > 0:
    injected_paths = {s.path for s in cat.train if s.injected}
    write_heatmaps(
        os.path.join(workdir, "heatmaps", f"{cat.name}.png"),
        cat.test,
        preds,
        names,
        pre,
        opts.output.num_heatmaps,
        injected_paths,
    )
  if cat.noise_info is not None:
    io_utils.write_json(
        os.path.join(workdir, "noise", f"{cat.name}.json"), cat.noise_info
    )
  reports.write_category(
      workdir, cat.name, cat.test, cat.train, preds, fits.infos
  )
  return rows


def result_row(cat, name, pred, fits: Fits, has_masks, predict_s) -> dict:
  """One method's results row: metrics, sizes, timings, explaining fields."""
  res = inference.evaluate(pred, pixel_metrics=has_masks)
  info = fits.infos[name]
  search = getattr(fits.models[name], "search", None)
  filt = fits.filter_fields.get(name, {})
  # PaDiM*'s image filter is part of its method's fit (shared when several
  # methods are filtered, like extract_s); filter_s is that part alone.
  fit_s = info.fit_s + filt.get("filter_s", 0.0)
  row = dict(
      category=cat.name,
      method=name,
      **res,
      n_train=len(cat.train),
      n_injected=cat.n_injected,
      n_test=len(cat.test),
      n_test_anomalous=int(sum(s.label == 1 for s in cat.test)),
      bank_size=info.bank_size,
      n_outlier_patches=info.n_outlier_patches,
      search=getattr(search, "name", None),
      extract_s=round(fits.extract_s[name], 3),
      fit_s=round(fit_s, 3),
      predict_s=round(predict_s, 3),
      **filt,
  )
  # How much of the injected vs the clean images the discriminator flagged
  # as outlier patches: the denoising at work.
  injected = np.array([s.injected for s in cat.train], bool)
  row.update(fitting.image_outlier_summary(info, injected))
  row.update(reports.method_fields(pred, info, cat.train, cat.test, has_masks))
  logging.info(
      "%s / %s: %s",
      cat.name,
      name,
      {k: v for k, v in res.items() if v is not None},
  )
  return row


def write_heatmaps(path, test, preds, names, pre, num, injected_paths=()):
  """PNG: rows of normal, then defective test images; columns input |
  methods | mask; one colour scale for every panel, its bar below.

  Every method's maps go through `viz.normalise_map` with that method's
  `viz.reference_scale` on the normal test images, so 0 is a typical normal
  pixel and the green contour (1.0) encloses pixels as high as the top 1 %
  of normal ones. Test images that were also injected into training
  (overlap protocol) are marked: they are the ones PatchCore tends to miss.
  Returns the labels of the rows shown (0 normal, 1 defective).
  """
  first = preds[names[0]]
  prefer = [test[int(j)].path in injected_paths for j in first.indices]
  order = viz.pick_rows(first.labels, num, prefer)
  if not order or first.maps is None:
    return []
  samples = [test[int(first.indices[i])] for i in order]
  batches = data.stream_batches(
      samples,
      pre,
      batch_size=len(samples),
      num_workers=2,
      with_masks=first.masks is not None,
  )
  batch = next(iter(batches))
  images = [viz.to_uint8_image(im, pre.mean, pre.std) for im in batch.images]
  normal = np.asarray(first.labels) == 0
  refs = {n: viz.reference_scale(preds[n].maps, normal) for n in names}
  scale = viz.NORMALISED_SCALE
  rows = []
  for r, i in enumerate(order):
    row = [images[r]]
    for n in names:
      amap = viz.normalise_map(preds[n].maps[i], refs[n])
      row.append(viz.heat_tile(images[r], amap, scale))
    if batch.masks is not None:
      width = viz.outline_width(images[r].shape)
      row.append(viz.mask_outline(images[r], batch.masks[r], width=width))
    rows.append(row)
  cols = ["input"] + list(names) + (["mask"] if batch.masks is not None else [])
  titles = [
      viz.row_title(s.label, s.defect_type, os.path.basename(s.path))
      + (" [also injected into train]" if s.path in injected_paths else "")
      for s in samples
  ]
  figure = viz.tile_rows(rows, titles, cols)
  caption = viz.normalised_caption(int(normal.sum()), batch.masks is not None)
  io_utils.save_image(path, viz.with_legend(figure, scale, caption))
  return [int(first.labels[i]) for i in order]


def summarize(rows: List[dict]) -> List[dict]:
  """One 'mean' row per method over the categories: metrics and timings
  alike are per-category means (results.json's total_s is the run's total)."""
  out = []
  names = list(dict.fromkeys(r["method"] for r in rows))
  for m in names:
    rs = [r for r in rows if r["method"] == m]
    mean = {"category": "mean", "method": m}
    for k in _METRICS:
      vals = [r[k] for r in rs if r.get(k) is not None]
      mean[k] = float(np.mean(vals)) if vals else None
    for k in ["filter_s", "extract_s", "fit_s", "predict_s"]:
      vals = [r[k] for r in rs if r.get(k) is not None]
      mean[k] = round(float(np.mean(vals)), 3) if vals else None
    out.append(mean)
  return out


def format_table(rows: List[dict]) -> str:
  cols = [
      "category",
      "method",
      "image_auroc",
      "pixel_auroc",
      "aupro",
      "image_f1_max",
      "n_train",
      "n_injected",
      "fit_s",
  ]

  def fmt(v):
    if v is None:
      return "n/a"
    if isinstance(v, float):
      return f"{v:.4f}"
    return str(v)

  table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  return "\n".join(
      "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table
  )


def run(config, workdir: str) -> dict:
  """Runs every configured method on every configured category.

  The config is read here, once, into `options.RunOptions`. Writes
  results.csv, results.json and heatmaps/<category>.png into `workdir`;
  returns the results.json content.
  """
  return run_options(options.from_config(config), workdir)


def run_options(opts: options.RunOptions, workdir: str) -> dict:
  """`run` on typed records."""
  workdir = io_utils.ensure_writable_dir(workdir)
  t_start = time.perf_counter()
  # Categories first: a wrong data path fails before any weights load.
  cats = data.list_categories(opts.data, workdir)
  stack = opts.build_stack()
  rows, noise_records, result = [], {}, {}
  for name in cats:
    cat = data.prepare_category(opts.data, opts.noise, name, workdir)
    # Per category: in whole-image mode the input size follows its images.
    pre = data.preprocess_for(
        opts.data, stack.backbone.mean, stack.backbone.std, cat.train
    )
    if cat.noise_info is not None:
      noise_records[name] = cat.noise_info
    logging.info(
        "%s: %d train (%d injected), %d test",
        name,
        len(cat.train),
        cat.n_injected,
        len(cat.test),
    )
    rows += evaluate_category(opts, cat, stack, pre, workdir)
    # Rewritten after every category so a long run can be inspected midway.
    elapsed = time.perf_counter() - t_start
    result = _write_results(workdir, opts, rows, noise_records, elapsed, stack)
  print(format_table(rows + summarize(rows)), flush=True)
  print(
      f"results written to {os.path.join(workdir, 'results.csv')} and "
      "results.json",
      flush=True,
  )
  return result


def _write_results(workdir, opts, rows, noise_records, total_s, stack):
  all_rows = rows + summarize(rows)
  io_utils.write_csv(
      os.path.join(workdir, "results.csv"), all_rows, RESULT_FIELDS
  )
  result = {
      "results": all_rows,
      "total_s": round(total_s, 3),
      "backbone": {
          "name": stack.backbone.name,
          "layers": list(stack.backbone.layers),
          "weights_id": stack.backbone.weights_id,
      },
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
      "noise": noise_records,
      "config": opts.to_dict(),
  }
  io_utils.write_json(os.path.join(workdir, "results.json"), result)
  return result
