"""Scoring image streams against fitted banks, and their metrics.

The embed -> check -> score -> collect loop is written once here
(`score_images`, `score_stream`); evaluation, threshold fitting on a
labelled folder and the predict command use it. Like `engine`, it reads
images and shows progress bars but writes no files.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import jax.numpy as jnp
import numpy as np

from softpatch_jax import data
from softpatch_jax import engine
from softpatch_jax import metrics
from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.progress import Progress


def score_features(
    banks: Dict[str, scoring.MemoryBank],
    feats,
    *,
    max_bank_rows: Optional[int] = None,
    pad_to: Optional[int] = None,
    mesh=None,
) -> Dict[str, tuple]:
  """Scores one batch of (B, P, D) features against several banks.

  Returns {name: (image scores (B,), maps (B, H, W))} as numpy. With
  `pad_to`, a short (last) batch is zero-padded to that size and the padding
  dropped again, so every batch reuses one compiled program. With a device
  `mesh`, each bank is split over its devices (`scoring.score`).
  """
  n = feats.shape[0]
  feats = jnp.asarray(feats)
  if pad_to is not None and n < pad_to:
    feats = jnp.pad(feats, ((0, pad_to - n), (0, 0), (0, 0)))
  out = {}
  for name, bank in banks.items():
    img, maps, _ = scoring.score(
        bank, feats, max_bank_rows=max_bank_rows, mesh=mesh
    )
    out[name] = (np.asarray(img)[:n], np.asarray(maps)[:n])
  return out


def score_images(
    banks,
    embedder: engine.Embedder,
    images,
    *,
    max_bank_rows=None,
    pad=True,
    what="images",
):
  """Embeds one batch of images, checks the features and scores them."""
  feats = embedder(images)
  validation.check_finite(feats, f"features of {what}", engine.BROKEN_HINT)
  return score_features(
      banks,
      feats,
      max_bank_rows=max_bank_rows,
      pad_to=embedder.batch_size if pad else None,
      mesh=getattr(embedder, "mesh", None),
  )


@dataclasses.dataclass
class Predictions:
  image_scores: np.ndarray  # (N,)
  maps: Optional[np.ndarray]  # (N, H, W) or None when not kept
  labels: np.ndarray  # (N,)
  masks: Optional[np.ndarray]  # (N, H, W) or None
  indices: np.ndarray  # (N,) indices into the sample list


def score_stream(
    banks: Dict[str, scoring.MemoryBank],
    embedder: engine.Embedder,
    stream,
    *,
    total=None,
    keep_maps=True,
    desc="test",
    max_bank_rows=None,
) -> Dict[str, Predictions]:
  """Streams batches once and scores them against every bank."""
  scores = {k: [] for k in banks}
  maps = {k: [] for k in banks}
  labels, masks, indices = [], [], []
  for batch in Progress(stream, total=total, desc=desc, unit="batches"):
    res = score_images(
        banks, embedder, batch.images, max_bank_rows=max_bank_rows, what=desc
    )
    for k, (img, amap) in res.items():
      scores[k].append(img)
      if keep_maps:
        maps[k].append(amap)
    labels.append(np.asarray(batch.labels))
    indices.append(np.asarray(batch.indices))
    if batch.masks is not None:
      masks.append(np.asarray(batch.masks, np.float32))
  if not labels:
    raise ValueError(f"no images to score ({desc})")
  labels_a = np.concatenate(labels)
  masks_a = (
      np.concatenate(masks) if masks and len(masks) == len(labels) else None
  )
  return {
      k: Predictions(
          image_scores=np.concatenate(scores[k]),
          maps=np.concatenate(maps[k]) if keep_maps else None,
          labels=labels_a,
          masks=masks_a,
          indices=np.concatenate(indices),
      )
      for k in banks
  }


def predict_samples(
    banks,
    embedder,
    samples,
    pre,
    *,
    num_workers=2,
    with_masks=False,
    desc="test",
    max_bank_rows=None,
    keep_maps=True,
) -> Dict[str, Predictions]:
  """`score_stream` over decoded samples."""
  stream = data.stream_batches(
      samples,
      pre,
      batch_size=embedder.batch_size,
      num_workers=num_workers,
      with_masks=with_masks,
  )
  return score_stream(
      banks,
      embedder,
      stream,
      total=engine.n_batches(len(samples), embedder.batch_size),
      keep_maps=keep_maps,
      desc=desc,
      max_bank_rows=max_bank_rows,
  )


def evaluate(pred: Predictions, pixel_metrics: bool = True) -> dict:
  """Image AUROC / F1-max, and pixel AUROC / AUPRO when masks exist.

  Metrics that cannot be computed (no masks, one class only) are None and
  are written as "n/a", never as 0.
  """
  res = {
      "image_auroc": None,
      "image_f1_max": None,
      "pixel_auroc": None,
      "aupro": None,
  }
  labels = np.asarray(pred.labels)
  known = labels >= 0
  if known.any() and len(np.unique(labels[known])) == 2:
    y, s = labels[known], pred.image_scores[known]
    res["image_auroc"] = float(metrics.image_auroc(y, s))
    res["image_f1_max"] = float(metrics.f1_max(y, s))
  if (
      pixel_metrics
      and pred.masks is not None
      and pred.maps is not None
      and pred.masks.max() > 0
      and pred.masks.min() < 1
  ):
    res["pixel_auroc"] = float(metrics.pixel_auroc(pred.masks, pred.maps))
    res["aupro"] = float(metrics.aupro(pred.masks, pred.maps))
  return res
