r"""Scores new images with a saved model: scores, decisions, heatmaps, CSV.

  python -m softpatch_jax.predict --model out/model.softpatch \
      --input /path/to/images --output out/pred [--save_maps] [--save_masks]

--input is a directory (its images, sub-folders too with --recursive) or a
comma-separated list of image files. Files whose extension is not an image
extension (.png .jpg .jpeg .bmp .tif .tiff) are skipped with one warning that
lists them. Images are decoded, scored and written batch by batch, so a
folder of any size runs in bounded memory, with a progress bar.

Output (in --output):
  predictions.csv      one row per input file: path, score, decision
                       (anomalous / normal / error), threshold,
                       anomalous_pixel_fraction, heatmap, map, mask, error.
                       Scores are written with full float precision.
  heatmaps/<name>.png  the anomaly map over the (resized, cropped) image, on
                       one colour scale for all images: 0 .. 2x the pixel
                       threshold (the threshold is mid-scale); predicted
                       defect regions (map >= pixel threshold) outlined green.
  maps/<name>.npy      with --save_maps: the raw float32 (H, W) anomaly map.
  masks/<name>.png     with --save_masks: the binary mask (map >= pixel
                       threshold) as a 0/255 PNG.
A model fitted in whole-image mode (--config.data.crop=0) writes heatmaps,
maps and masks at each input file's own size, the heatmap drawn over the file.
<name> is the path relative to the input folder (or to the common folder of
the listed files), without extension, with '/' replaced by '__'.

A file that cannot be decoded (truncated, corrupt, zero bytes) gets a row
with decision 'error' and the reason, and a warning; the other images are
still scored (--strict: stop at the first such file instead). Every file is
written atomically; predictions.csv is removed at the start and written last,
so it exists only for a complete run, and re-running overwrites cleanly.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from softpatch_jax import backbones
from softpatch_jax import compile_cache
from softpatch_jax import data
from softpatch_jax import engine
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import model_io
from softpatch_jax import predict_files
from softpatch_jax import scoring
from softpatch_jax import thresholds as thresholds_lib
from softpatch_jax.progress import Progress

CSV_FILENAME = predict_files.CSV_FILENAME
list_inputs = predict_files.list_inputs
output_names = predict_files.output_names
read_predictions = predict_files.read_predictions


# --------------------------------------------------------------------------
# The model's backbone, preprocessing and scores.


def preprocess_for(model: model_io.FittedModel) -> data.Preprocess:
  """The preprocessing the model was fitted with."""
  return engine.preprocess_from_record(model.preprocess)


def backbone_for(model: model_io.FittedModel, weights: Optional[str] = None):
  """Rebuilds the recorded backbone and checks its weights identity.

  Args:
    model: the fitted model.
    weights: where to find the weights now ('imagenet', 'random', a .pth
      path) when they moved since fitting; default: the recorded spec.

  Raises:
    ValueError: the rebuilt weights are not the ones the model was fitted
      with (its scores would be meaningless).
  """
  b = model.backbone
  bb = backbones.load(
      b["name"],
      weights=b["weights"] if weights is None else weights,
      layers=tuple(b["layers"]),
      seed=int(b.get("seed", 0)),
  )
  model_io.check_backbone(model, bb)
  return bb


def embedder_for(model: model_io.FittedModel, bb, batch_size: int = 16):
  """The Embedder that computes the model's features with backbone `bb`."""
  return engine.Embedder(
      bb.variables, engine.embed_spec(bb, model.features), batch_size
  )


def banks_for(model: model_io.FittedModel, memory_budget_mb=None):
  """({method: bank}, max_bank_rows) for scoring with the model.

  `memory_budget_mb` defaults to the fitting config's
  scoring.memory_budget_mb. A chunked scan keeps the bank in host memory
  and moves one chunk at a time to the device.
  """
  if memory_budget_mb is None:
    memory_budget_mb = (model.config.get("scoring", {}) or {}).get(
        "memory_budget_mb"
    )
  rows = scoring.rows_for_budget(model.bank_features.shape[1], memory_budget_mb)
  bank = model.bank if rows is None else model.host_bank()
  return {model.method: bank}, rows


def score_features(model: model_io.FittedModel, feats, memory_budget_mb=None):
  """(image scores (B,), maps (B, H, W)) of (B, P, D) features, as numpy."""
  banks, rows = banks_for(model, memory_budget_mb)
  return inference.score_features(banks, feats, max_bank_rows=rows)[
      model.method
  ]


# --------------------------------------------------------------------------
# Prediction.


def predict(
    model,
    inputs,
    output: str,
    *,
    batch_size: Optional[int] = None,
    num_workers: int = 2,
    save_maps: bool = False,
    save_masks: bool = False,
    heatmaps: bool = True,
    threshold: Optional[float] = None,
    pixel_threshold: Optional[float] = None,
    quantile: Optional[float] = None,
    recursive: bool = False,
    strict: bool = False,
    memory_budget_mb: Optional[float] = None,
    backbone_weights: Optional[str] = None,
    backbone=None,
    progress: bool = True,
) -> dict:
  """Scores `inputs` with `model` (a FittedModel or a model path).

  batch_size defaults to the fitting batch size: the backbone then runs the
  same compiled program as at fit time, so scores match bit for bit.

  One run at a time writes `output` (io_utils.folder_lock): a second one is
  refused with a ValueError naming the first.

  Returns {'rows': [...], 'csv': path, 'n_images', 'n_anomalous', 'n_errors'}.
  """
  if not isinstance(model, model_io.FittedModel):
    model = model_io.load_model(model)
  if batch_size is None:
    batch_size = int((model.config.get("data") or {}).get("batch_size", 16))
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  # `score >= nan` is always false: a NaN threshold would call every image
  # normal. Checked before any file is touched.
  for name, v in (
      ("threshold", threshold),
      ("pixel_threshold", pixel_threshold),
  ):
    if v is not None and not math.isfinite(float(v)):
      raise ValueError(f"--{name} must be a finite number, got {v}")
  if quantile is not None and not 0.0 < float(quantile) <= 1.0:
    raise ValueError(f"--quantile must be in (0, 1], got {quantile}")
  paths = predict_files.list_inputs(inputs, recursive=recursive)
  output = io_utils.ensure_writable_dir(output)
  # One run per folder: two would mix their heatmaps, and the CSV of the last
  # to finish would hide the other's rows.
  with io_utils.folder_lock(output, "output folder"):
    io_utils.clean_stale_temps(output)
    csv_path = os.path.join(output, CSV_FILENAME)
    # Only a complete run leaves a predictions.csv behind.
    if os.path.exists(csv_path):
      os.remove(csv_path)

    t_img = model.image_threshold
    t_pix = model.pixel_threshold
    if quantile is not None:
      if model.heldout_image_scores is None:
        raise ValueError(
            "--quantile needs a model fitted with the 'quantile' "
            "threshold (it stores held-out training scores)"
        )
      t_img = thresholds_lib.quantile(model.heldout_image_scores, quantile)
      t_pix = thresholds_lib.quantile(model.heldout_pixel_max, quantile)
    if threshold is not None:
      t_img = float(threshold)
    if pixel_threshold is not None:
      t_pix = float(pixel_threshold)
    crange = predict_files.color_range(t_img, t_pix)

    if backbone is None:
      backbone = backbone_for(model, weights=backbone_weights)
    else:
      model_io.check_backbone(model, backbone)
    embedder = embedder_for(model, backbone, batch_size=batch_size)
    banks, bank_rows = banks_for(model, memory_budget_mb)
    pre = preprocess_for(model)
    names = predict_files.output_names(paths)
    rows = [None] * len(paths)
    n_batches = engine.n_batches(len(paths), batch_size)
    samples = [data.Sample(p, -1, "unknown") for p in paths]
    stream = data.stream_batches(
        samples,
        pre,
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        with_masks=False,
        errors="raise" if strict else "collect",
    )
    for batch in Progress(
        stream,
        total=n_batches,
        desc="predict",
        unit="batches",
        enabled=progress,
    ):
      for i, err in batch.errors:
        logging.warning("cannot score %s: %s", paths[i], err)
        rows[i] = {
            "path": paths[i],
            "decision": "error",
            "threshold": t_img,
            "error": err,
        }
      if batch.images is None or not len(batch.images):
        continue
      img_scores, maps = inference.score_images(
          banks,
          embedder,
          batch.images,
          max_bank_rows=bank_rows,
          pad=False,
          what="input images",
      )[model.method]
      for r, i in enumerate(batch.indices):
        i = int(i)
        rows[i] = predict_files.write_one(
            output,
            names[i],
            paths[i],
            batch.images[r],
            float(img_scores[r]),
            maps[r],
            pre,
            t_img,
            t_pix,
            crange,
            heatmaps,
            save_maps,
            save_masks,
        )

    predict_files.write_csv(csv_path, rows)
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


def _define_flags():
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_string(
      "model", None, "model.softpatch file, or the fit workdir that holds it."
  )
  flags.DEFINE_string(
      "input", None, "A directory of images, or comma-separated image files."
  )
  flags.DEFINE_string("output", None, "Output directory.")
  flags.DEFINE_bool(
      "recursive",
      False,
      "Also read images in sub-folders of an input directory.",
  )
  flags.DEFINE_integer(
      "batch_size", None, "Images per batch (default: the fitting batch size)."
  )
  flags.DEFINE_integer("num_workers", 2, "Image decoding threads.")
  flags.DEFINE_bool("heatmaps", True, "Write heatmaps/<name>.png.")
  flags.DEFINE_bool(
      "save_maps",
      False,
      "Also write maps/<name>.npy (raw float32 anomaly maps).",
  )
  flags.DEFINE_bool(
      "save_masks",
      False,
      "Also write masks/<name>.png (binary, map >= pixel threshold).",
  )
  flags.DEFINE_float("threshold", None, "Image threshold override.")
  flags.DEFINE_float("pixel_threshold", None, "Pixel threshold override.")
  flags.DEFINE_float(
      "quantile",
      None,
      "Re-derive both thresholds as this "
      "quantile of the stored held-out training scores.",
  )
  flags.DEFINE_float(
      "memory_budget_mb",
      None,
      "Scan the memory bank in "
      "chunks of at most this size (default: the model's "
      "config; 0: no limit).",
  )
  flags.DEFINE_string(
      "backbone_weights",
      None,
      "Where the backbone weights "
      "are now, if they moved since fitting (.pth path); "
      "they must be the same weights.",
  )
  flags.DEFINE_bool(
      "strict",
      False,
      "Stop at the first unreadable image "
      "instead of recording it as an error row.",
  )
  compile_cache.define_flag()
  flags.mark_flags_as_required(["model", "input", "output"])
  return flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  compile_cache.enable(f.compilation_cache)
  try:
    res = predict(
        f.model,
        f.input,
        f.output,
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
  _define_flags()
  app.run(main)
