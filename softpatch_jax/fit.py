"""Fit mode: fit one model on a folder of (mostly normal) images and save it.

    python -m softpatch_jax.main --config configs/fit_folder.py \
        --config.data.train_dir=DIR --workdir out/

writes ``out/model.softpatch`` (see model_io) and ``out/fit_summary.json``.
No labels are needed; the decision threshold comes from held-out training
scores by default (see thresholds.py for the choices and why).

Every setting is checked before the (slow) feature extraction, and the model
file is written atomically at the very end, so a failed or interrupted fit
leaves either the previous model or none, never a partial file.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
import numpy as np

from softpatch_jax import data
from softpatch_jax import engine
from softpatch_jax import feature_store
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import methods as methods_lib
from softpatch_jax import model_io
from softpatch_jax import thresholds as thresholds_lib

SUMMARY_FILENAME = "fit_summary.json"


def threshold_settings(config) -> dict:
  """config.threshold with defaults for every missing field."""
  tc = config.get("threshold", None) or {}
  get = lambda k, d: (tc.get(k, d) if tc.get(k, d) is not None else d)
  return dict(
      method=get("method", thresholds_lib.DEFAULT_METHOD),
      quantile=float(get("quantile", thresholds_lib.DEFAULT_QUANTILE)),
      pixel_quantile=tc.get("pixel_quantile", None),
      folds=int(get("folds", thresholds_lib.DEFAULT_FOLDS)),
      value=tc.get("value", None),
      pixel_value=tc.get("pixel_value", None),
      val_dir=get("val_dir", ""),
  )


def validate_config(config) -> str:
  """Checks every setting that can be checked before reading images.

  Returns the (single) method name.
  """
  methods = methods_lib.parse_methods(config.methods)
  if len(methods) != 1:
    raise ValueError(
        "fit mode saves one model; config.methods names "
        f"{len(methods)} ({', '.join(methods)}); pick one, e.g. "
        "--config.methods=softpatch_lof"
    )
  frac = config.coreset.fraction
  if not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= 1.0:
    raise ValueError(f"config.coreset.fraction must be in (0, 1], got {frac!r}")
  nf = config.denoise.noise_fraction
  if not 0.0 <= float(nf) < 1.0:
    raise ValueError(
        f"config.denoise.noise_fraction must be in [0, 1), got {nf!r}"
    )
  if int(config.denoise.lof_k) < 1:
    raise ValueError(
        f"config.denoise.lof_k must be >= 1, got {config.denoise.lof_k!r}"
    )
  sigma = config.scoring.get("blur_sigma", None)
  if not isinstance(sigma, (int, float)) or not 0 <= float(sigma) < 1e4:
    raise ValueError(
        f"config.scoring.blur_sigma must be a number >= 0, got {sigma!r}"
    )
  store = config.data.get("feature_store", "memory")
  if store not in feature_store.STORES:
    raise ValueError(
        f"config.data.feature_store must be one of {feature_store.STORES}, "
        f"got {store!r}"
    )
  budget = config.scoring.get("memory_budget_mb", None)
  if budget is not None and float(budget) < 0:
    raise ValueError(
        "config.scoring.memory_budget_mb must be >= 0 (0: no "
        f"limit), got {budget!r}"
    )
  thresholds_lib.validate(**{
      k: v for k, v in threshold_settings(config).items() if k != "pixel_value"
  })
  return methods[0]


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


def _val_samples(val_dir):
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
  test = [s for s in test if s.label >= 0]
  return test


def f1_thresholds(banks, val_dir, embedder, pre, num_workers, max_bank_rows):
  """F1-optimal image (and, with masks, pixel) thresholds on a val folder."""
  samples = _val_samples(val_dir)
  labels = np.array([s.label for s in samples])
  if not (labels == 0).any() or not (labels == 1).any():
    raise ValueError(
        f"threshold val_dir {val_dir!r} needs normal images in good/ and "
        "anomalous ones in defect sub-folders; found "
        f"{int((labels == 0).sum())} normal and {int((labels == 1).sum())} "
        "anomalous"
    )
  with_masks = any(s.mask_path for s in samples if s.label == 1)
  (pred,) = inference.predict_samples(
      banks,
      embedder,
      samples,
      pre,
      num_workers=num_workers,
      with_masks=with_masks,
      desc="threshold val_dir",
      max_bank_rows=max_bank_rows,
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
  return t_img, t_pix, details


def fit_and_save(config, workdir: str) -> dict:
  """Fits config.methods (one) on the training images and saves the model.

  One run at a time writes `workdir` (io_utils.folder_lock). Every unreadable
  training image is listed in one ValueError, and then nothing is written.
  """
  t_start = time.perf_counter()
  method = validate_config(config)
  ts = threshold_settings(config)
  workdir = io_utils.ensure_writable_dir(workdir)
  with io_utils.folder_lock(workdir, "workdir"):
    io_utils.clean_stale_temps(workdir)
    cats = data.list_categories(config, workdir)
    if len(cats) != 1:
      raise ValueError(
          f"fit mode fits one category at a time, got {cats}; set "
          "--config.data.categories=<one>"
      )
    category = cats[0]
    if config.data.dataset == "folder" and not config.data.train_dir:
      raise ValueError("set --config.data.train_dir=DIR (the training images)")
    train, test = data.load_dataset(config, category, workdir)
    train, _, noise_info = data.apply_noise(config, category, train, test)
    n = len(train)
    check_train_size(n, method, ts["method"])
    logging.info("fit: %d training images, method %s", n, method)

    bb = engine.build_backbone(config)
    embedder = engine.build_embedder(config, bb)
    pre = engine.build_preprocess(config, bb, train)
    fitted = engine.fit_methods(
        config, train, embedder, pre, [method], errors="collect"
    )
    bank, info = fitted.banks[method], fitted.infos[method]
    train_feats = fitted.train_feats
    rows = engine.max_bank_rows(config, train_feats.shape[-1])

    model = model_io.FittedModel(
        bank_features=np.asarray(bank.features),
        bank_weights=np.asarray(bank.weights),
        method=method,
        soft_weight=bank.soft_weight,
        grid=bank.grid,
        image_size=bank.image_size,
        blur_sigma=bank.blur_sigma,
        backbone={
            "name": bb.name,
            "layers": list(bb.layers),
            "weights": str(config.backbone.get("weights", "imagenet")),
            "seed": int(config.seed),
            "weights_id": bb.weights_id,
        },
        preprocess=engine.preprocess_record(pre),
        features={
            "patchsize": config.features.patchsize,
            "pretrain_embed_dim": config.features.pretrain_embed_dim,
            "target_embed_dim": config.features.target_embed_dim,
        },
        thresholds={},
        config=config.to_dict(),
    )

    t0 = time.perf_counter()
    details = {}
    t_img = t_pix = None
    if ts["method"] == "quantile":
      folds = thresholds_lib.fold_split(n, ts["folds"], config.seed)
      options = dict(
          engine.bank_options(config),
          grid=fitted.grid,
          image_size=fitted.image_size,
      )
      img, pix = engine.heldout_scores(
          train_feats,
          method,
          jax.random.PRNGKey(config.seed),
          options,
          folds,
          batch_size=config.data.batch_size,
          max_bank_rows=rows,
      )
      pq = ts["pixel_quantile"]
      pq = ts["quantile"] if pq is None else pq
      t_img = thresholds_lib.quantile(img, ts["quantile"])
      t_pix = thresholds_lib.quantile(pix, pq)
      model.heldout_image_scores, model.heldout_pixel_max = img, pix
      details = {
          "folds": len(folds),
          "quantile": ts["quantile"],
          "pixel_quantile": pq,
          "heldout_image_scores": thresholds_lib.summary(img),
      }
    elif ts["method"] == "manual":
      t_img = float(ts["value"])
      t_pix = None if ts["pixel_value"] is None else float(ts["pixel_value"])
    else:
      t_img, t_pix, details = f1_thresholds(
          {method: bank},
          ts["val_dir"],
          embedder,
          pre,
          config.data.num_workers,
          rows,
      )
    threshold_s = time.perf_counter() - t0
    model.thresholds = {
        "image": t_img,
        "pixel": t_pix,
        "method": ts["method"],
        "details": details,
    }
    model.fit_info = {
        "n_train": n,
        "train_paths_sample": [s.path for s in train[:20]],
        "bank_size": info.bank_size,
        "n_patches": info.n_patches,
        "n_noise_patches": info.n_noise_patches,
        "noise_weight_threshold": info.threshold,
        "noisiest_train_images": _noisiest(train, info.image_noise_fraction),
        "noise": noise_info,
        "extract_s": round(fitted.extract_s, 3),
        "fit_s": round(info.fit_s, 3),
        "threshold_s": round(threshold_s, 3),
        "jax": {"version": jax.__version__, "backend": jax.default_backend()},
    }

    path = model_io.save_model(
        os.path.join(workdir, model_io.MODEL_FILENAME), model
    )
    summary = {
        "model": path,
        "method": method,
        "n_train": n,
        "bank_size": info.bank_size,
        "thresholds": model.thresholds,
        "backbone": model.backbone,
        "fit_info": model.fit_info,
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    io_utils.write_json(os.path.join(workdir, SUMMARY_FILENAME), summary)
    pix_txt = "none" if t_pix is None else f"{t_pix:.6g}"
    print(
        f"model saved to {path}\n  {n} training images, bank of "
        f"{info.bank_size} patches, image threshold {t_img:.6g} "
        f"({ts['method']}), pixel threshold {pix_txt}\n"
        f"predict with: python -m softpatch_jax.predict --model {path} "
        "--input <DIR or files> --output <out dir>",
        flush=True,
    )
    return summary


def _noisiest(train, frac, k: int = 10):
  """The training images with the most patches flagged as noise."""
  if frac is None:
    return []
  order = np.argsort(-np.asarray(frac), kind="stable")[:k]
  return [
      {"path": train[int(i)].path, "noise_fraction": float(frac[int(i)])}
      for i in order
  ]
