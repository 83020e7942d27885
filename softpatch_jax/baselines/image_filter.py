"""PaDiM*: an image-level filter of the training set (SoftPatch, Table 1).

The SoftPatch paper (Jiang et al., NeurIPS 2022) compares its patch-level
denoising with a simple image-level one: PaDiM on ResNet-18 scores every
training image, and the highest-scoring share of the images is dropped
before another method fits on the rest. The method name
'padim_filter+<method>' runs it before any method (README, "Baselines").
Each image is scored by the Gaussians of the other images (5 folds by
default, `filter_scores`); with `baselines.filter_folds=1` PaDiM scores
the images it was fitted on.

`keep_mask` is the selection rule. `image_filter` runs it over the training
images of one category, and `fit_filtered_banks` fits the filtered
memory-bank methods on what is left.

The filter's backbone is `baselines.filter_backbone` (ResNet-18, as in the
paper) with `filter_weights`. No registry package ships ResNet-18
weights, so without a network or a local .pth file the filter falls back to
the configured backbone, logs a warning, and records the backbone it used in
the results ('image_filter_backbone', and 'image_filter_fallback': True when
that is not `filter_backbone`; the study tables name it). Its time,
'filter_s', is part of the filtered method's 'fit_s' (evaluate.result_row).
Like `fitters`, this module reads images but writes no files.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Optional, Sequence

from absl import logging
import jax
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import embedding
from softpatch_jax import fitting
from softpatch_jax import methods as methods_lib
from softpatch_jax import thresholds
from softpatch_jax.baselines import fitters
from softpatch_jax.baselines import padim

# fold_in constant of the filter's channel draw.
_SEED = 13


def num_dropped(n: int, fraction: float) -> int:
  """int(fraction * n) images, exact for decimal fractions such as 0.15
  (a tolerance keeps 0.29 * 100 at 29 despite its float rounding)."""
  fraction = float(fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(
        f"the image filter's fraction must be in [0, 1), got {fraction!r}"
    )
  return int(np.floor(fraction * int(n) + 1e-9))


def keep_mask(scores, fraction: float) -> np.ndarray:
  """(N,) bool: False for the `num_dropped(N, fraction)` highest scores.

  Ties are broken deterministically: among equal scores the image that
  comes first in the training list is dropped first.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(
        f"image filter scores must be one per image (N,), got {scores.shape}"
    )
  if not np.isfinite(scores).all():
    bad = int((~np.isfinite(scores)).sum())
    raise ValueError(
        f"image filter: {bad} of {scores.size} image scores are not finite"
    )
  k = num_dropped(scores.size, fraction)
  # A stable sort of the negated scores puts earlier images first on ties.
  order = np.argsort(-scores, kind="stable")
  keep = np.ones(scores.size, bool)
  keep[order[:k]] = False
  return keep


@dataclasses.dataclass
class FilterResult:
  """subsets: {method name: indices of the training images it fits on};
  fields: results-row fields of the filtered methods; scores: (N,) PaDiM
  scores of the training images (None without a filtered method)."""

  subsets: Dict[str, np.ndarray]
  fields: dict
  scores: Optional[np.ndarray] = None


def filter_extractor(extractor, pre, options: fitters.FitOptions, label):
  """(MapExtractor, Preprocess) of the filter backbone, or `extractor` and
  `pre` (the configured backbone's) when its weights are unavailable."""
  b = options.baselines
  if b.filter_backbone != extractor.name:
    try:
      bb = backbones.load(
          b.filter_backbone, weights=b.filter_weights, seed=options.seed
      )
      # The same preprocessing with the filter backbone's normalisation.
      fpre = dataclasses.replace(pre, mean=tuple(bb.mean), std=tuple(bb.std))
      ex = embedding.MapExtractor(bb.name, bb.variables, extractor.batch_size)
      return ex, fpre
    except backbones.WeightsUnavailableError as e:
      logging.warning(
          "%s: padim_filter: no %s weights (%s); the image filter runs on "
          "the configured backbone %s instead",
          label,
          b.filter_backbone,
          e,
          extractor.name,
      )
  return extractor, pre


def image_filter(
    train: Sequence,
    extractor: embedding.MapExtractor,
    pre,
    names,
    options: fitters.FitOptions,
    *,
    label: str = "fit",
) -> FilterResult:
  """Runs PaDiM* when a name in `names` starts with 'padim_filter+'.

  `extractor` and `pre`: the configured backbone's tap maps and
  preprocessing (the fallback of `filter_extractor`). PaDiM scores every
  training image (held out, `filter_scores`), and the
  `options.baselines.filter_fraction` highest are dropped (`keep_mask`).
  """
  filtered = [n for n in names if methods_lib.split_filter(n)[0]]
  if not filtered:
    return FilterResult({}, {})
  fraction = options.baselines.filter_fraction
  num_dropped(len(train), fraction)  # checks it before any work
  t0 = time.perf_counter()
  wanted = options.baselines.filter_backbone
  fallback = wanted != extractor.name
  extractor, fpre = filter_extractor(extractor, pre, options, label)
  fallback = fallback and extractor.name != wanted
  image_size = fpre.input_size or (fpre.crop, fpre.crop)
  key = jax.random.fold_in(jax.random.PRNGKey(options.seed), _SEED)
  channels = fitters.padim_channels(
      options.baselines.padim,
      extractor.name,
      key,
      extractor.channels(image_size),
  )
  scores = filter_scores(train, extractor, fpre, channels, options, label)
  keep = keep_mask(scores, fraction)
  injected = np.array([bool(getattr(s, "injected", False)) for s in train])
  fields = dict(
      image_filter_backbone=extractor.name,
      image_filter_fallback=bool(fallback),
      n_filtered_out=int((~keep).sum()),
      filtered_out_injected=int((injected & ~keep).sum()),
      filter_s=round(time.perf_counter() - t0, 3),
  )
  logging.info(
      "%s: padim_filter (%s) drops %d of %d training images (%d injected)",
      label,
      extractor.name,
      fields["n_filtered_out"],
      len(train),
      fields["filtered_out_injected"],
  )
  kept = np.flatnonzero(keep)
  return FilterResult({n: kept for n in filtered}, fields, scores)


def _embeddings(samples, extractor, pre, channels, desc, loader):
  """Yields (n, (batch_size, P, d) PaDiM embeddings, first n real)."""
  bs = extractor.batch_size
  for batch in embedding.training_stream(samples, pre, bs, loader, desc):
    maps = extractor(batch.images)
    yield len(batch.indices), padim.embed_maps(maps, channels)


def _stats(parts, batch_size):
  """The PaDiM statistics of (n, padded embeddings) parts, padding left out."""
  total = None
  for k, x in parts:
    weight = (np.arange(batch_size) < k).astype(np.float32)
    part = padim.batch_stats(x, weight)
    total = part if total is None else padim.merge_stats(total, part)
  return total


def filter_scores(
    train, extractor, pre, channels, options: fitters.FitOptions, label
):
  """PaDiM image scores of the training images, (N,).

  options.baselines.filter_folds >= 2: every fold is scored by the
  Gaussians of the other folds (`thresholds.fold_split`, seeded with
  options.seed), so an image is never scored by a Gaussian it helped fit.
  With fewer images than channels an in-sample Mahalanobis distance is
  nearly the same for every image, so held-out scores are what tells the
  outliers apart. 1 fold scores in sample, as a plain reading of the paper
  would. Two streams over the images: one for the statistics of all of
  them, one fold at a time to score it (its embeddings are held while it
  is scored).
  """
  n, folds, bs = (
      len(train),
      options.baselines.filter_folds,
      extractor.batch_size,
  )
  image_size = pre.input_size or (pre.crop, pre.crop)
  desc = f"{label}: image filter fit"
  total = _stats(
      _embeddings(train, extractor, pre, channels, desc, options.loader), bs
  )
  splits = [np.arange(n)]
  if folds > 1:
    splits = thresholds.fold_split(n, folds, options.seed)
  scores = np.zeros((n,), np.float64)
  for f, held in enumerate(splits):
    # Padded batches keep one shape, so nothing recompiles per fold.
    desc = f"{label}: image filter scores {f + 1}/{len(splits)}"
    samples = [train[i] for i in held]
    parts = list(
        _embeddings(samples, extractor, pre, channels, desc, options.loader)
    )
    stats = total
    if len(splits) > 1:
      stats = padim.subtract_stats(total, _stats(parts, bs))
    model = padim.fit(
        stats,
        channels=channels,
        grid=extractor.shapes(image_size)[0][1:3],
        image_size=image_size,
        blur_sigma=options.scoring.blur_sigma,
        eps=options.baselines.padim.eps,
    )
    start = 0
    for k, x in parts:
      img = np.asarray(padim.score(model, x)[0])[:k]
      scores[held[start : start + k]] = img
      start += k
  return scores


def subset_info(info: fitting.FitInfo, name: str, rows, n: int):
  """Re-indexes the FitInfo of a fit on training images `rows` (of n) to all
  n: bank entries name their image among all n, and an image left out
  counts as wholly flagged (its outlier fraction is 1)."""
  rows = np.asarray(rows)
  info.method, info.train_images = name, rows
  if info.bank_images is not None:
    info.bank_images = rows[np.asarray(info.bank_images)]
  frac = np.ones((n,), np.float32)
  frac[rows] = 0.0
  if info.image_outlier_fraction is not None:
    frac[rows] = info.image_outlier_fraction
  info.image_outlier_fraction = frac
  return info


def fit_filtered_banks(
    fitted: fitting.Fitted,
    names,
    subsets,
    options: fitting.BankOptions,
    *,
    seed: int,
    label: str = "fit",
) -> fitting.Fitted:
  """Fits each filtered memory-bank method ('padim_filter+patchcore') on
  its images' rows of `fitted.train_feats`, into fitted.banks / infos."""
  key = jax.random.PRNGKey(seed)
  geometry = methods_lib.BankGeometry(fitted.grid, fitted.image_size)
  n = fitted.train_feats.shape[0]
  for name in names:
    if name not in subsets or methods_lib.is_baseline(name):
      continue
    rows = np.asarray(subsets[name])
    bank, info = fitting.fit_bank(
        fitted.train_feats[rows],
        methods_lib.split_filter(name)[1],
        key,
        options,
        geometry,
        label=label,
    )
    fitted.banks[name] = bank
    fitted.infos[name] = subset_info(info, name, rows, n)
    logging.info(
        "%s / %s: bank %d from %d of %d images (%.1fs)",
        label,
        name,
        info.bank_size,
        rows.size,
        n,
        info.fit_s,
    )
  return fitted
