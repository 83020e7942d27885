"""A saved model rebuilt to score images: its backbone, preprocessing, bank.

`scorer_for` turns a `model_io.FittedModel` back into what scores images
the way the fit did: the recorded backbone (its weights identity checked),
the Embedder of the recorded feature settings, the recorded preprocessing,
and the bank scanned within the model's memory budget. The predict command
runs it over its inputs; tests and notebooks score features directly
(`score_features`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import inference
from softpatch_jax import model_io
from softpatch_jax import scoring


def preprocess_for(model: model_io.FittedModel) -> data.Preprocess:
  """The preprocessing the model was fitted with."""
  return data.Preprocess.from_record(model.preprocess)


def backbone_for(
    model: model_io.FittedModel, weights: Optional[str] = None
) -> backbones.Backbone:
  """Rebuilds the recorded backbone and checks its weights identity.

  Args:
    model: the fitted model.
    weights: where to find the weights now ('imagenet', 'random', a .pth
      path) when they moved since fitting; default: the recorded spec.

  Raises:
    ValueError: the rebuilt weights are not the ones the model was fitted
      with (its scores would be meaningless).
  """
  rec = model.backbone
  opts = backbones.BackboneOptions(
      rec.name, rec.weights if weights is None else weights, rec.layers
  )
  bb = opts.load(rec.seed)
  model_io.check_backbone(model, bb)
  return bb


def embedder_for(
    model: model_io.FittedModel, bb, batch_size: Optional[int] = None
) -> embedding.Embedder:
  """The Embedder that computes the model's features with backbone `bb`
  (batch_size None: the fitting batch size)."""
  batch_size = model.batch_size if batch_size is None else batch_size
  return embedding.for_backbone(bb, model.embed, batch_size)


def bank_scorers(
    model: model_io.FittedModel, memory_budget_mb: Optional[float] = None
) -> Dict[str, inference.BankScorer]:
  """{method: BankScorer} of the model's bank, its search chosen by
  `scoring.choose_search` from the model's ScoringOptions.

  `memory_budget_mb` overrides the model's scoring.memory_budget_mb (0: no
  limit). A bank over the budget stays in host memory and is scanned in
  chunks, one at a time on the device.
  """
  options = model.scoring
  if memory_budget_mb is not None:
    options = dataclasses.replace(options, memory_budget_mb=memory_budget_mb)
  rows = options.max_bank_rows(model.bank_features.shape[1])
  bank = model.bank if rows is None else model.host_bank()
  search = scoring.choose_search(bank, options)
  return inference.bank_scorers({model.method: bank}, search)


def score_features(model: model_io.FittedModel, feats, memory_budget_mb=None):
  """(image scores (B,), maps (B, H, W)) of (B, P, D) features, as numpy."""
  (scorer,) = bank_scorers(model, memory_budget_mb).values()
  img, maps = scorer(inference.pad_features(feats, None))
  return np.asarray(img), np.asarray(maps)


@dataclasses.dataclass
class Scorer:
  """The model's bank(s) and the backbone that feeds them, ready to score."""

  models: Dict[str, inference.BankScorer]
  inputs: inference.Inputs
  pre: data.Preprocess

  def __call__(self, images) -> Tuple:
    """(image scores (B,), maps (B, H, W)) of one batch of images."""
    res = inference.score_batch(
        self.models, self.inputs, images, what="input images", pad=False
    )
    (img_maps,) = res.values()
    return img_maps


def scorer_for(
    model: model_io.FittedModel,
    backbone=None,
    *,
    batch_size: Optional[int] = None,
    memory_budget_mb: Optional[float] = None,
    weights: Optional[str] = None,
) -> Scorer:
  """The scorer of `model`: `backbone` checked against the model's record
  (None: rebuilt from it, with `weights` as in `backbone_for`), batch_size
  as in `embedder_for`, memory_budget_mb as in `bank_scorers`."""
  if backbone is None:
    backbone = backbone_for(model, weights=weights)
  else:
    model_io.check_backbone(model, backbone)
  embedder = embedder_for(model, backbone, batch_size=batch_size)
  models = bank_scorers(model, memory_budget_mb)
  return Scorer(models, inference.Inputs(embedder), preprocess_for(model))
