r"""Scores new images with a saved model: scores, decisions, heatmaps, CSV.

  python -m softpatch_jax.predict --model out/model.softpatch \
      --input /path/to/images --output out/pred [--save_maps] [--save_masks]

--input is a directory (its images, sub-folders too with --recursive) or a
comma-separated list of image files. Files whose extension is not an image
extension (.png .jpg .jpeg .bmp .tif .tiff) are skipped with one warning that
lists them. Images are decoded, scored and written batch by batch, so a
folder of any size runs in bounded memory, with a progress bar.

Output (in --output):
  predictions.csv      one row per input file: path, score,
                       normalised_score (in [0, 1], 0.5 at the threshold:
                       README "Use a fitted model from Python"), decision
                       (anomalous / normal / error), threshold,
                       anomalous_pixel_fraction, heatmap, map, mask, error.
                       Scores are written with full float precision.
  heatmaps/<name>.png  the anomaly map over the (resized, cropped) image, on
                       one colour scale for all images: 0 .. 2x the pixel
                       threshold (the threshold is mid-scale), with a colour
                       bar below; predicted defect regions (map >= pixel
                       threshold) outlined green.
  maps/<name>.npy      with --save_maps: the raw float32 (H, W) anomaly map.
  masks/<name>.png     with --save_masks: the binary mask (map >= pixel
                       threshold) as a 0/255 PNG.
A model fitted in whole-image mode (--config.data.crop=0) writes heatmaps,
maps and masks at each input file's own size, the heatmap drawn over the file.
<name> is the path relative to the input folder (or to the common folder of
the listed files), without extension, with '/' replaced by '__'.

Output names longer than 120 bytes are cut, and names that are not UTF-8
get '_' for the odd bytes, each with a hash of the full name appended; the
CSV's path column writes such bytes as \xNN. With the output folder inside
(or equal to) an input folder, a folder scan skips the output folder's
results with a warning: they are never scored as inputs.

A file that cannot be decoded (truncated, corrupt, zero bytes) gets a row
with decision 'error' and the reason, and a warning; the other images are
still scored (--strict: stop at the first such file instead). Every file is
written atomically. Rows go to predictions.partial.csv as they are scored;
only a complete run replaces predictions.csv (in input order) and removes
the partial file, so a killed run leaves the previous complete
predictions.csv untouched beside the partial rows. A complete run then
removes the heatmaps, maps and masks of earlier runs that its CSV does not
name.

The scoring is `detector.Detector`'s (the in-memory API); this module
streams the files through it and writes what it says.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import List, Optional, Tuple

from absl import app
from absl import flags
from absl import logging

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import compile_cache
from softpatch_jax import data
from softpatch_jax import detector as detector_lib
from softpatch_jax import io_utils
from softpatch_jax import methods
from softpatch_jax import model_io
from softpatch_jax import predict_files
from softpatch_jax import thresholds as thresholds_lib
from softpatch_jax.progress import Progress

CSV_FILENAME = predict_files.CSV_FILENAME
list_inputs = predict_files.list_inputs
output_names = predict_files.output_names
read_predictions = predict_files.read_predictions


@dataclasses.dataclass(frozen=True)
class PredictOptions:
  """How predict runs (the command's flags; README "Fit once, predict").

  batch_size: images per batch; None: the fitting batch size, so that the
    backbone runs the program it ran at fit time and scores match bit for
    bit. num_workers: image decoding threads. save_maps / save_masks /
    heatmaps: which files to write per image. threshold / pixel_threshold:
    overrides of the model's thresholds; quantile: re-derive both from the
    stored held-out training scores. recursive: read sub-folders of an
    input folder. strict: stop at the first unreadable image instead of
    recording an error row. memory_budget_mb: the bank scan's budget (None:
    the model's scoring.memory_budget_mb; 0: no limit). backbone_weights:
    where the backbone weights are now, when they moved since fitting.
    progress: show a progress bar.
  """

  batch_size: Optional[int] = None
  num_workers: int = 2
  save_maps: bool = False
  save_masks: bool = False
  heatmaps: bool = True
  threshold: Optional[float] = None
  pixel_threshold: Optional[float] = None
  quantile: Optional[float] = None
  recursive: bool = False
  strict: bool = False
  memory_budget_mb: Optional[float] = None
  backbone_weights: Optional[str] = None
  progress: bool = True

  def __post_init__(self):
    if self.batch_size is not None and int(self.batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    # `score >= nan` is always false: a NaN threshold would call every image
    # normal.
    for name in ("threshold", "pixel_threshold"):
      v = getattr(self, name)
      if v is not None and not math.isfinite(float(v)):
        raise ValueError(f"--{name} must be a finite number, got {v}")
    q = self.quantile
    if q is not None and not 0.0 < float(q) <= 1.0:
      raise ValueError(f"--quantile must be in (0, 1], got {q}")
    if self.memory_budget_mb is not None and float(self.memory_budget_mb) < 0:
      raise ValueError(
          "--memory_budget_mb must be >= 0 (0: no limit), got "
          f"{self.memory_budget_mb}"
      )


def resolve_thresholds(
    model: model_io.FittedModel, opts: PredictOptions
) -> Tuple[Optional[float], Optional[float]]:
  """(image, pixel) thresholds: the model's, re-derived from its held-out
  scores with opts.quantile, then overridden by opts.threshold /
  opts.pixel_threshold."""
  t_img, t_pix = model.image_threshold, model.pixel_threshold
  if opts.quantile is not None:
    if model.heldout_image_scores is None:
      raise ValueError(
          "--quantile needs a model fitted with the 'quantile' "
          "threshold (it stores held-out training scores)"
      )
    t_img = thresholds_lib.quantile(model.heldout_image_scores, opts.quantile)
    t_pix = thresholds_lib.quantile(model.heldout_pixel_max, opts.quantile)
  if opts.threshold is not None:
    t_img = float(opts.threshold)
  if opts.pixel_threshold is not None:
    t_pix = float(opts.pixel_threshold)
  return t_img, t_pix


# --------------------------------------------------------------------------
# Prediction.


def load_for_predict(model) -> model_io.FittedModel:
  """A FittedModel (or a model path, loaded) whose method can score here."""
  if not isinstance(model, model_io.FittedModel):
    model = model_io.load_model(model)
  methods.get_method(model.method)  # a known bank method, or one clear error
  return model


def predict(
    model,
    inputs,
    output: str,
    options: PredictOptions = PredictOptions(),
    *,
    backbone=None,
) -> dict:
  """Scores `inputs` with `model` (a FittedModel or a model path).

  inputs: a folder, a comma-separated string or a list of image files
  (`predict_files.list_inputs`); backbone: an already loaded backbone (it
  must be the model's), default: rebuilt from the model's record.

  One run at a time writes `output` (io_utils.folder_lock): a second one is
  refused with a ValueError naming the first. Everything that can be
  checked is checked before the output folder is touched.

  Returns {'rows': [...], 'csv': path, 'n_images', 'n_anomalous',
  'n_errors', 'image_threshold', 'pixel_threshold'}.
  """
  model = load_for_predict(model)
  paths = predict_files.list_inputs(
      inputs, recursive=options.recursive, output=output
  )
  output = io_utils.ensure_writable_dir(output)
  # One run per folder: two would mix their heatmaps, and the CSV of the last
  # to finish would hide the other's rows.
  with io_utils.folder_lock(output, "output folder"):
    io_utils.clean_stale_temps(output)
    t_img, t_pix = resolve_thresholds(model, options)
    det = detector_lib.Detector(
        model,
        backbone,
        batch_size=options.batch_size,
        memory_budget_mb=options.memory_budget_mb,
        weights=options.backbone_weights,
    ).with_thresholds(t_img, t_pix)
    spec = predict_files.OutputSpec(
        folder=output,
        pre=det.pre,
        image_threshold=t_img,
        pixel_threshold=t_pix,
        color_range=predict_files.color_range(t_img, t_pix),
        heatmaps=options.heatmaps,
        save_maps=options.save_maps,
        save_masks=options.save_masks,
    )
    # The previous predictions.csv stays until this run is complete.
    with predict_files.RowLog(output) as log:
      rows = score_inputs(det, paths, spec, options, log)
      csv_path = log.finish(rows)
    predict_files.remove_stale_outputs(output, rows)
  return summarize(rows, csv_path, t_img, t_pix)


def score_inputs(
    det: detector_lib.Detector,
    paths: List[str],
    spec: predict_files.OutputSpec,
    opts: PredictOptions,
    log: Optional[predict_files.RowLog] = None,
) -> List[dict]:
  """Decodes, scores (`det`) and writes the inputs batch by batch -> their
  rows, each also added to `log` as soon as it is known.

  An unreadable file becomes an error row (opts.strict: the ValueError).
  """
  names = predict_files.output_names(paths)
  rows = [None] * len(paths)
  batch_size = det.batch_size
  stream = data.stream_batches(
      [data.Sample(p, -1, "unknown") for p in paths],
      det.pre,
      batch_size=batch_size,
      num_workers=int(opts.num_workers),
      with_masks=False,
      errors="raise" if opts.strict else "collect",
  )
  for batch in Progress(
      stream,
      total=data.n_batches(len(paths), batch_size),
      desc="predict",
      unit="batches",
      enabled=opts.progress,
  ):
    for i, err in batch.errors:
      logging.warning("cannot score %s: %s", paths[i], err)
      rows[i] = predict_files.error_row(spec, paths[i], err)
      if log is not None:
        log.add(rows[i])
    if batch.images is None or not len(batch.images):
      continue
    results = det.results(*det.score_network(batch.images))
    for r, i in enumerate(int(i) for i in batch.indices):
      res = results[r]
      rows[i] = predict_files.write_one(
          spec,
          names[i],
          paths[i],
          batch.images[r],
          res.score,
          res.input_map,
          res.score_norm,
      )
      if log is not None:
        log.add(rows[i])
  return rows


def summarize(rows, csv_path, t_img, t_pix) -> dict:
  """Prints the one-line summary; returns predict's result."""
  n_err = sum(r["decision"] == "error" for r in rows)
  n_anom = sum(r["decision"] == "anomalous" for r in rows)
  print(
      f"{len(rows)} images: {n_anom} anomalous, "
      f"{len(rows) - n_anom - n_err} normal, {n_err} unreadable "
      f"(threshold {t_img}); results in {csv_path}",
      flush=True,
  )
  return {
      "rows": rows,
      "csv": csv_path,
      "n_images": len(rows),
      "n_anomalous": n_anom,
      "n_errors": n_err,
      "image_threshold": t_img,
      "pixel_threshold": t_pix,
  }


# --------------------------------------------------------------------------
# Command line.


def options_from_flags(f) -> PredictOptions:
  """The PredictOptions of the parsed flags."""
  return PredictOptions(
      batch_size=f.batch_size,
      num_workers=f.num_workers,
      save_maps=f.save_maps,
      save_masks=f.save_masks,
      heatmaps=f.heatmaps,
      threshold=f.threshold,
      pixel_threshold=f.pixel_threshold,
      quantile=f.quantile,
      recursive=f.recursive,
      strict=f.strict,
      memory_budget_mb=f.memory_budget_mb,
      backbone_weights=f.backbone_weights,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.verbose_logging()
  f = flags.FLAGS
  compile_cache.enable(f.compilation_cache)
  try:
    res = predict(f.model, f.input, f.output, options_from_flags(f))
  except (ValueError, backbones.WeightsUnavailableError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if res["n_errors"] == res["n_images"]:
    print(
        f"error: none of the {res['n_images']} input image(s) could be read; "
        f"the reasons are in {res['csv']}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


if __name__ == "__main__":
  cli_flags.prepare(sys.argv, cli_flags.define_predict_flags, __doc__)
  cli_flags.run_app(main)
