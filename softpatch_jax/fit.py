"""Fit mode: fit one model on a folder of (mostly normal) images and save it.

    python -m softpatch_jax.main --config configs/fit_folder.py \
        --config.data.train_dir=DIR --workdir out/

writes ``out/model.softpatch`` (see model_io) and ``out/fit_summary.json``.
No labels are needed; the decision threshold comes from held-out training
scores by default (see thresholds.py for the choices and why), and so does
the calibration of the scores to [0, 1] (`choose_thresholds`,
calibration.py). `fit` returns the fitted model in memory instead, for
`detector.Detector.from_fit`.

The config is read once, at the edge (`fit_and_save` -> `options.
from_config`); every step below takes the typed records. Every setting is
checked before the (slow) feature extraction, and the model file is written
atomically at the very end, so a failed or interrupted fit leaves either the
previous model or none, never a partial file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import List, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import calibration as calibration_lib
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import fitting
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import methods as methods_lib
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import options as options_lib
from softpatch_jax import scoring
from softpatch_jax import thresholds as thresholds_lib

SUMMARY_FILENAME = "fit_summary.json"


def fit_and_save(config, workdir: str) -> dict:
  """Fits config.methods (one) on the training images and saves the model.

  The edge of fit mode: the config becomes `options.RunOptions` here (each
  record checks its fields), and `fit_model` does the rest.
  """
  return fit_model(options_lib.from_config(config), workdir)


def fit(config, workdir: str) -> model_io.FittedModel:
  """`fit_and_save` without the model file: the fitted model in memory.

  Hand it to `detector.Detector.from_fit` to score images straight away.
  `workdir` still holds what the data set prepares (generated images, ...).
  """
  return build_model(options_lib.from_config(config), workdir)


def fit_model(opts: options_lib.RunOptions, workdir: str) -> dict:
  """Fits the one method of `opts` and writes the model and its summary.

  One run at a time writes `workdir` (io_utils.folder_lock). Every unreadable
  training image is listed in one ValueError, and then nothing is written.
  """
  t_start = time.perf_counter()
  method = fit_method(opts)
  workdir = io_utils.ensure_writable_dir(workdir)
  with io_utils.folder_lock(workdir, "workdir"):
    model = fit_locked(opts, method, workdir)
    return write_outputs(workdir, model, t_start)


def build_model(
    opts: options_lib.RunOptions, workdir: str
) -> model_io.FittedModel:
  """`fit_model` without writing the model or its summary: the FittedModel."""
  method = fit_method(opts)
  workdir = io_utils.ensure_writable_dir(workdir)
  with io_utils.folder_lock(workdir, "workdir"):
    return fit_locked(opts, method, workdir)


def fit_locked(opts, method: str, workdir: str) -> model_io.FittedModel:
  """Loads the training set, fits the bank, chooses the thresholds and the
  calibration -> the FittedModel (`workdir` locked by the caller)."""
  io_utils.clean_stale_temps(workdir)
  train, noise_info = load_training_set(opts, workdir)
  check_train_size(len(train), method, opts.threshold.method)
  logging.info("fit: %d training images, method %s", len(train), method)
  stages = build_stages(opts, train)
  fitted = fitting.fit_methods(
      train,
      stages.embedder,
      stages.pre,
      [method],
      opts.bank_options(),
      seed=opts.seed,
      loader=opts.loader(errors="collect"),
  )
  check_degenerate(len(train), fitted.train_feats, opts.threshold.method)
  t0 = time.perf_counter()
  chosen, heldout, reference = choose_thresholds(opts, method, fitted, stages)
  model = assemble_model(opts, method, stages, fitted, chosen, heldout)
  model.calibration = calibration_lib.for_thresholds(
      chosen.image, chosen.pixel, *(reference or (None, None))
  )
  model.fit_info = fit_info(train, fitted.infos[method], fitted, noise_info)
  model.fit_info["threshold_s"] = round(time.perf_counter() - t0, 3)
  return model


# --------------------------------------------------------------------------
# Checks.


def fit_method(opts: options_lib.RunOptions) -> str:
  """The one method fit mode saves; the fit-mode-only setting checks."""
  names = opts.method_names
  if len(names) != 1:
    raise ValueError(
        "fit mode saves one model; config.methods names "
        f"{len(names)} ({', '.join(names)}); pick one, e.g. "
        "--config.methods=softpatch_lof"
    )
  methods_lib.get_method(names[0])  # a bank method: no baselines here
  return names[0]


def check_train_size(n: int, method: str, threshold_method: str) -> None:
  """Clear errors for training sets too small for the chosen settings.

  A denoising method compares each patch with the same position in the other
  images, so it needs >= 2 images (LOF clamps k to N-1, like sklearn). The
  held-out ('quantile') threshold fits one bank per fold on the other folds,
  so each of those must be fittable too: >= 3 images with denoising, >= 2
  without.
  """
  denoising = methods_lib.get_method(method).denoises
  if n == 0:
    raise ValueError("no training images")
  if denoising and n < 2:
    raise ValueError(
        f"{method} needs at least 2 training images (it compares "
        f"patches across images), got {n}"
    )
  need = 3 if denoising else 2
  if threshold_method == "quantile" and n < need:
    raise ValueError(
        f"the held-out ('quantile') threshold needs at least {need} training "
        f"images for {method}, got {n}; add images, or set "
        "--config.threshold.method=manual --config.threshold.value=<score>"
    )


def check_degenerate(n: int, train_feats, threshold_method: str) -> None:
  """Refuses a held-out threshold from (near-)copies of one image, warns of
  too few images (`thresholds.degenerate_message`)."""
  if n < 3:
    logging.warning(
        "fit: only %d training image(s); the bank and threshold rest on "
        "them alone: add varied normal images",
        n,
    )
  spread = thresholds_lib.image_spread(train_feats) if n >= 2 else 1.0
  msg = thresholds_lib.degenerate_message(n, spread)
  if msg is None:
    return
  if threshold_method == "quantile":
    raise ValueError(
        f"{msg}; their held-out threshold would not flag real defects: add "
        "varied normal images, or set --config.threshold.method=manual "
        "--config.threshold.value=<score>"
    )
  logging.warning(
      "fit: %s; the bank holds little more than one image, so any change "
      "from it scores as anomalous",
      msg,
  )


# --------------------------------------------------------------------------
# Steps.


def load_training_set(
    opts: options_lib.RunOptions, workdir: str
) -> Tuple[List[data.Sample], Optional[dict]]:
  """The training samples of the one category (noise injected, if set)."""
  cats = data.list_categories(opts.data, workdir)
  if len(cats) != 1:
    raise ValueError(
        f"fit mode fits one category at a time, got {cats}; set "
        "--config.data.categories=<one>"
    )
  if opts.data.dataset == "folder" and not opts.data.train_dir:
    raise ValueError("set --config.data.train_dir=DIR (the training images)")
  cat = data.prepare_category(opts.data, opts.noise, cats[0], workdir)
  return cat.train, cat.noise_info


@dataclasses.dataclass
class Stages:
  """What turns training images into features: the backbone, its embedder
  and the preprocessing."""

  backbone: backbones.Backbone
  embedder: embedding.Embedder
  pre: data.Preprocess


def build_stages(opts: options_lib.RunOptions, train: Sequence) -> Stages:
  """The backbone of opts.backbone, its embedder over opts.data.batch_size
  images (split over opts.parallel's devices), and the preprocessing."""
  stack = opts.build_stack()
  bb = stack.backbone
  pre = data.preprocess_for(opts.data, bb.mean, bb.std, train)
  return Stages(bb, stack.embedder, pre)


def choose_thresholds(opts, method: str, fitted, stages: Stages):
  """(thresholds.ChosenThresholds, (held-out image scores, pixel maxima) or
  None, the normal scores the calibration is anchored on) by
  opts.threshold.method.

  The calibration (`calibration.for_thresholds`) rests on what each method
  has: 'quantile' the held-out training scores (image scores and per-image
  map maxima); 'f1' the scores of the normal (good/) images of val_dir, their
  map maxima when the folder has masks (else the pixel threshold alone);
  'manual' nothing but the thresholds (0 -> 0, t -> 0.5, 2t -> 1).
  """
  th = opts.threshold
  if th.method == "manual":
    chosen = thresholds_lib.ChosenThresholds(th.value, th.pixel_value, "manual")
    return chosen, None, None
  if th.method == "f1":
    bank = fitted.banks[method]
    chosen, reference = f1_thresholds(opts, {method: bank}, stages)
    return chosen, None, reference
  folds = thresholds_lib.fold_split(
      len(fitted.train_feats), th.folds, opts.seed
  )
  img, pix = fitting.heldout_scores(
      fitted.train_feats,
      method,
      jax.random.PRNGKey(opts.seed),
      opts.bank_options(),
      methods_lib.BankGeometry(fitted.grid, fitted.image_size),
      folds,
      batch_size=opts.data.batch_size,
  )
  details = {
      "folds": len(folds),
      "quantile": th.quantile,
      "pixel_quantile": th.resolved_pixel_quantile,
      "heldout_image_scores": thresholds_lib.summary(img),
  }
  chosen = thresholds_lib.ChosenThresholds(
      thresholds_lib.quantile(img, th.quantile),
      thresholds_lib.quantile(pix, th.resolved_pixel_quantile),
      "quantile",
      details,
  )
  return chosen, (img, pix), (img, pix)


def val_samples(val_dir: str) -> List[data.Sample]:
  """The labelled images of a threshold val_dir (good/ and defect folders)."""
  # The folder loader also lists a training part; only its test part is used.
  _, test = data.folder.load_folder(val_dir, val_dir)
  unlabelled = [s.path for s in test if s.label < 0]
  if unlabelled:
    logging.warning(
        "threshold val_dir: ignoring %d image(s) outside good/ "
        "and defect sub-folders (no label): %s",
        len(unlabelled),
        ", ".join(unlabelled[:10]),
    )
  return [s for s in test if s.label >= 0]


def f1_thresholds(opts, banks, stages: Stages):
  """F1-optimal image (and, with masks, pixel) thresholds on a val folder
  -> (ChosenThresholds, (normal image scores, their map maxima or None))."""
  val_dir = opts.threshold.val_dir
  samples = val_samples(val_dir)
  labels = np.array([s.label for s in samples])
  if not (labels == 0).any() or not (labels == 1).any():
    raise ValueError(
        f"threshold val_dir {val_dir!r} needs normal images in good/ and "
        "anomalous ones in defect sub-folders; found "
        f"{int((labels == 0).sum())} normal and {int((labels == 1).sum())} "
        "anomalous"
    )
  with_masks = any(s.mask_path for s in samples if s.label == 1)
  (bank,) = banks.values()
  search = scoring.choose_search(bank, opts.scoring, stages.embedder.mesh)
  (pred,) = inference.predict_samples(
      inference.bank_scorers(banks, search),
      inference.Inputs(stages.embedder),
      samples,
      stages.pre,
      num_workers=opts.data.num_workers,
      with_masks=with_masks,
      desc="threshold val_dir",
      keep_maps=with_masks,
  ).values()
  f1_img, t_img = thresholds_lib.f1_threshold(pred.labels, pred.image_scores)
  details = {
      "val_dir": os.path.abspath(val_dir),
      "n_val": int(labels.size),
      "n_val_anomalous": int(labels.sum()),
      "image_f1": f1_img,
  }
  t_pix = None
  if with_masks and pred.masks is not None and pred.masks.max() > 0:
    f1_pix, t_pix = thresholds_lib.pixel_f1_threshold(pred.masks, pred.maps)
    details["pixel_f1"] = f1_pix
  normal = pred.labels == 0
  pix_max = None if pred.maps is None else pred.maps[normal].max(axis=(1, 2))
  chosen = thresholds_lib.ChosenThresholds(t_img, t_pix, "f1", details)
  return chosen, (pred.image_scores[normal], pix_max)


def assemble_model(opts, method, stages: Stages, fitted, chosen, heldout):
  """The FittedModel of a fitted bank: arrays, records and thresholds."""
  bank = fitted.banks[method]
  img, pix = heldout if heldout is not None else (None, None)
  return model_io.FittedModel(
      bank_features=np.asarray(bank.features),
      bank_weights=np.asarray(bank.weights),
      method=method,
      grid=bank.grid,
      image_size=bank.image_size,
      backbone=model_meta.BackboneRecord.of(
          stages.backbone, opts.backbone.weights, opts.seed
      ),
      preprocess=stages.pre.to_record(),
      embed=opts.features,
      # The bank's own soft weighting: the method's choice, resolved.
      scoring=dataclasses.replace(
          opts.scoring,
          soft_weight=bool(bank.soft_weight),
          blur_sigma=float(bank.blur_sigma),
      ),
      thresholds=chosen,
      batch_size=opts.data.batch_size,
      config=opts.to_dict(),
      heldout_image_scores=img,
      heldout_pixel_max=pix,
  )


def fit_info(train, info, fitted, noise_info) -> dict:
  """What fitting did, for the model file and the summary."""
  return {
      "n_train": len(train),
      "train_paths_sample": [s.path for s in train[:20]],
      "bank_size": info.bank_size,
      "n_patches": info.n_patches,
      "n_outlier_patches": info.n_outlier_patches,
      "outlier_weight_threshold": info.outlier_threshold,
      "most_outlying_train_images": most_outlying(
          train, info.image_outlier_fraction
      ),
      "noise": noise_info,
      "extract_s": round(fitted.extract_s, 3),
      "fit_s": round(info.fit_s, 3),
      "jax": {"version": jax.__version__, "backend": jax.default_backend()},
  }


def most_outlying(train, frac, k: int = 10) -> List[dict]:
  """The training images with the most patches flagged as outliers."""
  if frac is None:
    return []
  order = np.argsort(-np.asarray(frac), kind="stable")[:k]
  return [
      {"path": train[int(i)].path, "outlier_fraction": float(frac[int(i)])}
      for i in order
  ]


def write_outputs(workdir: str, model, t_start: float) -> dict:
  """Saves the model and fit_summary.json; prints how to predict."""
  path = model_io.save_model(
      os.path.join(workdir, model_io.MODEL_FILENAME), model
  )
  info, chosen = model.fit_info, model.thresholds
  summary = {
      "model": path,
      "method": model.method,
      "n_train": info["n_train"],
      "bank_size": info["bank_size"],
      "thresholds": chosen.to_record(),
      "calibration": (
          None if model.calibration is None else model.calibration.to_record()
      ),
      "backbone": dataclasses.asdict(model.backbone),
      "fit_info": info,
      "total_s": round(time.perf_counter() - t_start, 3),
  }
  io_utils.write_json(os.path.join(workdir, SUMMARY_FILENAME), summary)
  pix_txt = "none" if chosen.pixel is None else f"{chosen.pixel:.6g}"
  print(
      f"model saved to {path}\n  {info['n_train']} training images, bank of "
      f"{info['bank_size']} patches, image threshold {chosen.image:.6g} "
      f"({chosen.method}), pixel threshold {pix_txt}\n"
      f"predict with: python -m softpatch_jax.predict --model {path} "
      "--input <DIR or files> --output <out dir>",
      flush=True,
  )
  return summary
