"""The prediction loop: image streams scored by fitted models, and metrics.

Every fitted model scores one input computed from a batch of images: the
memory banks the patch features of the `Embedder` ('features',
`BankScorer`), PaDiM and CFLOW the raw tap maps of the `MapExtractor`
('maps', `baselines.fitters`). The loop stream -> compute inputs -> score
-> collect is written once here (`score_stream`): each input a batch needs
is computed once and scored by every model that reads it. Evaluation,
threshold fitting on a labelled folder and the predict command use it.
Like `embedding`, it reads images and shows progress bars but writes no
files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import metrics
from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.progress import Progress


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What the models of a loop score, computed once per batch of images.

  features: the Embedder of the 'features' models (memory banks);
  maps: the MapExtractor of the 'maps' models (PaDiM, CFLOW). Each input
  comes padded to the batch size, so every batch runs one program.
  """

  features: Optional[embedding.Embedder] = None
  maps: Optional[embedding.MapExtractor] = None

  def __post_init__(self):
    given = [s for s in (self.features, self.maps) if s is not None]
    if not given:
      raise ValueError("a prediction loop needs an embedder or map extractor")
    sizes = {s.batch_size for s in given}
    if len(sizes) > 1:
      raise ValueError(
          f"the embedder and the map extractor take batches of {sizes}; "
          "a loop streams one batch size"
      )

  @property
  def batch_size(self) -> int:
    return (self.maps if self.features is None else self.features).batch_size

  def compute(self, source: str, images, what: str, pad: bool = True):
    """Input `source` ('features' or 'maps') of one batch of images."""
    if getattr(self, source, None) is None:
      raise ValueError(f"a model scores {source!r}, and no input gives them")
    if source == "maps":
      return self.maps(images)
    feats = self.features(images)
    validation.check_finite(feats, f"features of {what}", embedding.BROKEN_HINT)
    return pad_features(feats, self.features.batch_size if pad else None)


def pad_features(feats, pad_to: Optional[int]):
  """(B, P, D) features zero-padded to `pad_to` rows (None: as they are)."""
  feats = jnp.asarray(feats)
  n = feats.shape[0]
  if pad_to is not None and n < pad_to:
    feats = jnp.pad(feats, ((0, pad_to - n), (0, 0), (0, 0)))
  return feats


@dataclasses.dataclass(frozen=True)
class BankScorer:
  """A memory bank scoring (B, P, D) patch features with a search strategy
  (`scoring.SEARCH_STRATEGIES`, a strategy or its name; None: dense)."""

  source: ClassVar[str] = "features"
  bank: scoring.MemoryBank
  search: Any = None

  def __call__(self, feats) -> tuple:
    """-> (image scores (B,), maps (B, H, W)) as device arrays."""
    img, maps, _ = scoring.score(self.bank, feats, self.search)
    return img, maps


def bank_scorers(
    banks: Mapping[str, scoring.MemoryBank], search=None
) -> Dict[str, BankScorer]:
  """{name: BankScorer}; `search` one strategy for all, or {name: strategy}."""
  pick = search.get if isinstance(search, Mapping) else lambda _: search
  return {name: BankScorer(bank, pick(name)) for name, bank in banks.items()}


def chosen_scorers(
    banks: Mapping[str, scoring.MemoryBank],
    options: scoring.ScoringOptions,
    mesh=None,
) -> Dict[str, BankScorer]:
  """{name: BankScorer} with the search `scoring.choose_search` picks for
  each bank under `options` (its memory budget) and the device `mesh`."""
  return {
      name: BankScorer(bank, scoring.choose_search(bank, options, mesh))
      for name, bank in banks.items()
  }


def score_batch(
    models: Mapping[str, Any], inputs: Inputs, images, *, what, pad=True
) -> Dict[str, tuple]:
  """Scores one batch of images with every model -> {name: (image scores
  (B,), maps (B, H, W))} as numpy, padding dropped. Each input the models
  read is computed once."""
  n = images.shape[0]
  computed = {}
  out = {}
  for name, model in models.items():
    if model.source not in computed:
      computed[model.source] = inputs.compute(model.source, images, what, pad)
    img, maps = model(computed[model.source])
    out[name] = (np.asarray(img)[:n], np.asarray(maps)[:n])
  return out


@dataclasses.dataclass
class Predictions:
  image_scores: np.ndarray  # (N,)
  maps: Optional[np.ndarray]  # (N, H, W) or None when not kept
  labels: np.ndarray  # (N,)
  masks: Optional[np.ndarray]  # (N, H, W) or None
  indices: np.ndarray  # (N,) indices into the sample list


def score_stream(
    models: Mapping[str, Any],
    inputs: Inputs,
    stream,
    *,
    total=None,
    keep_maps=True,
    desc="test",
) -> Dict[str, Predictions]:
  """Streams batches once and scores each with every model.

  models: {name: scorer}; a scorer has `source` ('features' or 'maps', the
  input of `inputs` it reads) and maps that input of a padded batch to
  (image scores, maps), e.g. `BankScorer`, `bank_scorers`.
  """
  scores = {k: [] for k in models}
  maps = {k: [] for k in models}
  labels, masks, indices = [], [], []
  for batch in Progress(stream, total=total, desc=desc, unit="batches"):
    res = score_batch(models, inputs, batch.images, what=desc)
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
      for k in models
  }


def predict_samples(
    models: Mapping[str, Any],
    inputs: Inputs,
    samples,
    pre: data.Preprocess,
    *,
    num_workers: int,
    with_masks: bool = False,
    desc: str = "test",
    keep_maps: bool = True,
) -> Dict[str, Predictions]:
  """`score_stream` over decoded samples (test images: never augmented)."""
  bs = inputs.batch_size
  stream = data.stream_batches(
      samples,
      pre,
      batch_size=bs,
      num_workers=num_workers,
      with_masks=with_masks,
  )
  return score_stream(
      models,
      inputs,
      stream,
      total=data.n_batches(len(samples), bs),
      keep_maps=keep_maps,
      desc=desc,
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
