"""Evaluate mode: every method on every category, results files, heatmaps.

    python -m softpatch_jax.main --config configs/default.py --workdir out/

writes into the workdir (README, "The default job"): results.csv,
results.json (per category and mean, timings, the injected-noise record),
heatmaps/<category>.png, noise/<category>.json, and the per-category
scores/<category>.csv and train/<category>.csv of `reports`. Every file is written
atomically, so an interrupted run leaves either the previous result or none.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional

from absl import logging
import jax
import numpy as np

from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import engine
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import methods as methods_lib
from softpatch_jax import reports
from softpatch_jax import viz
from softpatch_jax.baselines import image_filter
from softpatch_jax.baselines import pipeline

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
    "n_noise_patches",
    "noise_frac_injected",
    "noise_frac_clean",
    "image_filter_backbone",
    "n_filtered_out",
    "filtered_out_injected",
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


def run_category(
    config,
    category: str,
    train,
    test,
    embedder: engine.Embedder,
    pre: data.Preprocess,
    workdir: str,
    noise_info: Optional[dict] = None,
) -> List[dict]:
  """Fits every configured method on one category and evaluates it."""
  names = methods_lib.parse_methods(config.methods)
  has_masks = data.has_pixel_labels(test)
  # PaDiM* first: each 'padim_filter+<method>' fits on the images it keeps.
  filt = image_filter.image_filter(
      config, train, embedder, pre, names, label=category
  )
  preds, infos, times = {}, {}, {}
  bank_names = [n for n in names if not methods_lib.is_baseline(n)]
  if bank_names:
    plain = [n for n in bank_names if n not in filt.subsets]
    fitted = engine.fit_methods(
        config, train, embedder, pre, plain, label=category
    )
    image_filter.fit_filtered_banks(
        config, fitted, bank_names, filt.subsets, label=category
    )
    dim = fitted.train_feats.shape[-1]
    del fitted.train_feats

    t0 = time.perf_counter()
    preds = inference.predict_samples(
        fitted.banks,
        embedder,
        test,
        pre,
        num_workers=config.data.num_workers,
        with_masks=has_masks,
        desc=f"{category}: test",
        max_bank_rows=engine.max_bank_rows(config, dim),
    )
    infos.update(fitted.infos)
    predict_s = time.perf_counter() - t0
    times = dict.fromkeys(bank_names, (fitted.extract_s, predict_s))
  # PaDiM and CFLOW: no memory bank, their own streams.
  base = pipeline.run(
      config,
      train,
      test,
      embedder,
      pre,
      names,
      filt.subsets,
      label=category,
      with_masks=has_masks,
  )
  preds.update(base.preds)
  infos.update(base.infos)
  times.update(dict.fromkeys(base.preds, (base.extract_s, base.predict_s)))
  preds = {n: preds[n] for n in names}

  injected = np.array([bool(getattr(s, "injected", False)) for s in train])
  rows = []
  for name in names:
    res = inference.evaluate(preds[name], pixel_metrics=has_masks)
    info = infos[name]
    row = dict(
        category=category,
        method=name,
        **res,
        n_train=len(train),
        n_injected=int(injected.sum()),
        n_test=len(test),
        n_test_anomalous=int(sum(s.label == 1 for s in test)),
        bank_size=info.bank_size,
        n_noise_patches=info.n_noise_patches,
        extract_s=round(times[name][0], 3),
        fit_s=round(info.fit_s, 3),
        predict_s=round(times[name][1], 3),
        **(filt.fields if name in filt.subsets else {}),
    )
    # How much of the injected images the discriminator flagged as noise,
    # against the clean ones: the denoising at work.
    row.update(engine.image_noise_summary(info, injected))
    row.update(reports.method_fields(preds[name], info, train, test, has_masks))
    rows.append(row)
    logging.info(
        "%s / %s: %s",
        category,
        name,
        {k: v for k, v in res.items() if v is not None},
    )

  if config.output.num_heatmaps > 0:
    injected_paths = {s.path for s in train if getattr(s, "injected", False)}
    write_heatmaps(
        os.path.join(workdir, "heatmaps", f"{category}.png"),
        test,
        preds,
        names,
        pre,
        config.output.num_heatmaps,
        injected_paths,
    )
  if noise_info is not None:
    io_utils.write_json(
        os.path.join(workdir, "noise", f"{category}.json"), noise_info
    )
  reports.write_category(workdir, category, test, train, preds, infos)
  return rows


def write_heatmaps(path, test, preds, names, pre, num, injected_paths=()):
  """PNG: rows of defective test images; columns input | methods | mask.

  Test images that were also injected into training (overlap protocol) are
  marked: they are the ones PatchCore tends to miss.
  """
  first = preds[names[0]]
  defective = [i for i, lab in enumerate(first.labels) if lab == 1]
  # Half the rows (at most) show defects that were also injected into
  # training, where the methods differ most; the rest are ordinary ones.
  seen = [
      i for i in defective if test[int(first.indices[i])].path in injected_paths
  ]
  seen = seen[: num // 2]
  rest = [i for i in defective if i not in seen][: num - len(seen)]
  order = sorted(seen + rest)
  if not order or first.maps is None:
    return
  samples = [test[int(first.indices[i])] for i in order]
  batch = next(
      iter(
          data.stream_batches(
              samples,
              pre,
              batch_size=len(samples),
              num_workers=2,
              with_masks=first.masks is not None,
          )
      )
  )
  images = [viz.to_uint8_image(im, pre.mean, pre.std) for im in batch.images]
  # Colour scale per method: the median test pixel is dark, the 99.9th
  # percentile is full heat.
  scales = {n: np.percentile(preds[n].maps, [50.0, 99.9]) for n in names}
  rows = []
  for r, i in enumerate(order):
    row = [images[r]]
    for name in names:
      lo, hi = scales[name]
      row.append(
          viz.overlay(images[r], preds[name].maps[i], float(lo), float(hi))
      )
    if batch.masks is not None:
      row.append(viz.mask_outline(images[r], batch.masks[r]))
    rows.append(row)
  cols = ["input"] + list(names) + (["mask"] if batch.masks is not None else [])
  titles = [
      f"{os.path.basename(s.path)} ({s.defect_type})"
      + (" [also injected into train]" if s.path in injected_paths else "")
      for s in samples
  ]
  io_utils.save_image(path, viz.tile_rows(rows, titles, cols))


def summarize(rows: List[dict]) -> List[dict]:
  """One 'mean' row per method over the categories."""
  out = []
  names = list(dict.fromkeys(r["method"] for r in rows))
  for m in names:
    rs = [r for r in rows if r["method"] == m]
    mean = {"category": "mean", "method": m}
    for k in _METRICS:
      vals = [r[k] for r in rs if r.get(k) is not None]
      mean[k] = float(np.mean(vals)) if vals else None
    for k in ["extract_s", "fit_s", "predict_s"]:
      mean[k] = round(float(np.sum([r[k] for r in rs])), 3)
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

  Writes results.csv, results.json and heatmaps/<category>.png into
  `workdir`; returns the results.json content.
  """
  workdir = io_utils.ensure_writable_dir(workdir)
  t_start = time.perf_counter()
  # Categories first: a wrong data path fails before any weights load.
  cats = data.list_categories(config, workdir)
  methods_lib.parse_methods(config.methods)
  coreset.num_samples(1, config.coreset.fraction)  # (0, 1], before any work
  bb = engine.build_backbone(config)
  embedder = engine.build_embedder(config, bb)
  rows = []
  noise_records = {}
  result = {}
  for cat in cats:
    train, test = data.load_dataset(config, cat, workdir)
    test = data.subsample_test(
        test, config.data.get("max_test", 0), config.data.get("split_seed", 0)
    )
    train, test, noise_info = data.apply_noise(config, cat, train, test)
    # Per category: in whole-image mode the input size follows its images.
    pre = engine.build_preprocess(config, bb, train)
    if noise_info is not None:
      noise_records[cat] = noise_info
    logging.info(
        "%s: %d train (%d injected), %d test",
        cat,
        len(train),
        sum(bool(getattr(s, "injected", False)) for s in train),
        len(test),
    )
    rows += run_category(
        config, cat, train, test, embedder, pre, workdir, noise_info
    )
    # Rewritten after every category so a long run can be inspected midway.
    result = _write_results(
        workdir, config, rows, noise_records, time.perf_counter() - t_start, bb
    )
  print(format_table(rows + summarize(rows)), flush=True)
  print(
      f"results written to {os.path.join(workdir, 'results.csv')} and "
      "results.json",
      flush=True,
  )
  return result


def _write_results(workdir, config, rows, noise_records, total_s, bb):
  all_rows = rows + summarize(rows)
  io_utils.write_csv(
      os.path.join(workdir, "results.csv"), all_rows, RESULT_FIELDS
  )
  result = {
      "results": all_rows,
      "total_s": round(total_s, 3),
      "backbone": {
          "name": bb.name,
          "layers": list(bb.layers),
          "weights_id": bb.weights_id,
      },
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
      "noise": noise_records,
      "config": config.to_dict(),
  }
  io_utils.write_json(os.path.join(workdir, "results.json"), result)
  return result
