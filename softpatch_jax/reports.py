"""Per-category files that explain an evaluate-mode result.

For each category, beside results.csv / results.json (see `evaluate`):

  scores/<category>.csv  every test image: path, defect type, label, whether
                         it was also injected into training (overlap
                         protocol), and its image score under each method.
  train/<category>.csv   every training image: path, whether it was
                         injected, and per method the share of its patches
                         flagged as outliers and how many memory-bank entries
                         it contributed (and, after an image filter,
                         whether the method was fitted on it).

and, per method, these fields in the results rows:

  bank_from_injected / bank_from_clean: memory-bank entries taken from
      injected / clean training images;
  image_auroc_excl_injected / pixel_auroc_excl_injected: the metrics over
      the test set without the images injected into training. Under the
      overlap protocol this is the no-overlap result of the same fitted
      model, equal to the noise.overlap=False result of the same seed (the
      same images are injected, the same test images remain); without
      overlap it equals image_auroc. The studies therefore run the protocol
      as an axis and tabulate it only where overlap is fixed;
  image_auroc_by_defect: {defect type: image AUROC of the normal images
      against that type} (results.json only).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from softpatch_jax import fitting
from softpatch_jax import inference
from softpatch_jax import io_utils
from softpatch_jax import metrics


def subset(pred: inference.Predictions, keep) -> inference.Predictions:
  """The predictions of the images where `keep` (bool, (N,)) is True."""
  keep = np.asarray(keep, bool)
  pick = lambda a: None if a is None else np.asarray(a)[keep]
  return inference.Predictions(
      image_scores=pick(pred.image_scores),
      maps=pick(pred.maps),
      labels=pick(pred.labels),
      masks=pick(pred.masks),
      indices=pick(pred.indices),
  )


def _is_injected(sample) -> bool:
  return bool(getattr(sample, "injected", False))


def method_fields(
    pred: inference.Predictions,
    info: fitting.FitInfo,
    train: Sequence,
    test: Sequence,
    pixel_metrics: bool,
) -> dict:
  """The explaining fields of one method's results row (module docstring)."""
  out = {}
  injected_train = np.array([_is_injected(s) for s in train], bool)
  if info.bank_images is not None:
    from_injected = injected_train[np.asarray(info.bank_images)]
    out["bank_from_injected"] = int(from_injected.sum())
    out["bank_from_clean"] = int((~from_injected).sum())
  injected_paths = {s.path for s in train if _is_injected(s)}
  samples = [test[int(i)] for i in pred.indices]
  seen = np.array([s.path in injected_paths for s in samples], bool)
  excl = inference.evaluate(subset(pred, ~seen), pixel_metrics=pixel_metrics)
  out["image_auroc_excl_injected"] = excl["image_auroc"]
  out["pixel_auroc_excl_injected"] = excl["pixel_auroc"]
  labels = np.asarray(pred.labels)
  types = np.array([s.defect_type for s in samples])
  by_type = {}
  for t in sorted(set(types[labels == 1])):
    keep = (labels == 0) | ((labels == 1) & (types == t))
    if (labels[keep] == 0).any():
      by_type[str(t)] = float(
          metrics.image_auroc(labels[keep], pred.image_scores[keep])
      )
  out["image_auroc_by_defect"] = by_type
  return out


def score_rows(
    test: Sequence, train: Sequence, preds: Dict[str, inference.Predictions]
) -> List[dict]:
  """One row per scored test image, in test-list order (scores/<cat>.csv)."""
  injected_paths = {s.path for s in train if _is_injected(s)}
  names = list(preds)
  by_index = {
      n: dict(zip(map(int, preds[n].indices), preds[n].image_scores))
      for n in names
  }
  rows = []
  for i in sorted(by_index[names[0]]):
    s = test[i]
    row = {
        "path": s.path,
        "defect_type": s.defect_type,
        "label": s.label,
        "injected_into_train": s.path in injected_paths,
    }
    for n in names:
      row[f"score_{n}"] = float(by_index[n][i])
    rows.append(row)
  return rows


def train_rows(
    train: Sequence, infos: Dict[str, fitting.FitInfo]
) -> List[dict]:
  """One row per training image, in training order (train/<cat>.csv)."""
  rows = [
      {
          "path": s.path,
          "injected": _is_injected(s),
          "defect_type": s.defect_type,
      }
      for s in train
  ]
  for name, info in infos.items():
    frac = info.image_outlier_fraction
    counts = (
        np.bincount(np.asarray(info.bank_images), minlength=len(train))
        if info.bank_images is not None
        else None
    )
    kept = None
    if info.train_images is not None:
      kept = np.zeros(len(train), bool)
      kept[np.asarray(info.train_images)] = True
    for i, row in enumerate(rows):
      if kept is not None:
        row[f"fitted_on_{name}"] = bool(kept[i])
      if frac is not None:
        row[f"outlier_fraction_{name}"] = float(frac[i])
      if counts is not None:
        row[f"bank_entries_{name}"] = int(counts[i])
  return rows


def write_category(workdir, category, test, train, preds, infos) -> None:
  """Writes scores/<category>.csv and train/<category>.csv."""
  rows = score_rows(test, train, preds)
  io_utils.write_csv(
      os.path.join(workdir, "scores", f"{category}.csv"), rows, list(rows[0])
  )
  rows = train_rows(train, infos)
  fields = list(dict.fromkeys(k for r in rows for k in r))
  io_utils.write_csv(
      os.path.join(workdir, "train", f"{category}.csv"), rows, fields
  )
