"""The baseline fitters: PaDiM and CFLOW fitted over an image stream.

The methods without a memory bank ('padim', 'cflow', possibly after the
image filter of 'padim_filter+<method>', `image_filter`) score the raw
layer1-3 maps of the configured backbone (or their EfficientNet-Lite
analogues stage2/3/5, `embedding.MapExtractor`). `FITTERS` holds a fitter
class per family with one small interface: `create(...)`, then
`update(maps, weight)` per training batch and `finish(image_size, grid)`,
which returns a model scoring raw tap maps -> (image scores (B,), maps
(B, H, W)) in the one prediction loop (`inference.score_stream`, input
'maps'). One stream over the training images fits every baseline (`fit`).
Predictions come back as `inference.Predictions` and fits as
`fitting.FitInfo`, so evaluation, the results
files and the reports treat every method alike; the memory-bank fields
(bank size, outlier patches) are None.

Like `embedding` and `inference`, this module reads images and shows
progress bars but writes no files.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar, Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import fitting
from softpatch_jax import methods as methods_lib
from softpatch_jax import registry
from softpatch_jax import scoring
from softpatch_jax.baselines import cflow
from softpatch_jax.baselines import options as options_lib
from softpatch_jax.baselines import padim

# fold_in constants of the seeds of each random draw.
PADIM_SEED, CFLOW_SEED = 11, 12


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """What the baselines read: their settings, the pixel maps' blur
  (scoring.blur_sigma), the seed of their random draws and how training
  images are read (num_workers; augment: the injected copies')."""

  baselines: options_lib.BaselineOptions = dataclasses.field(
      default_factory=options_lib.BaselineOptions
  )
  scoring: scoring.ScoringOptions = dataclasses.field(
      default_factory=scoring.ScoringOptions
  )
  seed: int = 0
  loader: embedding.LoaderOptions = dataclasses.field(
      default_factory=embedding.LoaderOptions
  )


def padim_channels(
    padim_options: options_lib.PadimOptions, backbone: str, key, total: int
):
  """The random channel subset of the `total` tap channels of `backbone`
  (padim_options.channels[backbone] of them, at most all)."""
  n = min(padim_options.channels_for(backbone), total)
  return padim.select_channels(key, total, n)


@dataclasses.dataclass(frozen=True)
class PadimScorer:
  """A fitted PaDiM model scoring padded raw tap maps."""

  source: ClassVar[str] = "maps"
  model: padim.PadimModel

  def __call__(self, maps) -> tuple:
    x = padim.embed_maps(maps, self.model.channels)
    img, pix, _ = padim.score(self.model, x)
    return img, pix

  @property
  def positions(self) -> int:
    return int(self.model.mean.shape[0])


@dataclasses.dataclass(frozen=True)
class CflowScorer:
  """Fitted CFLOW decoders scoring padded raw tap maps."""

  source: ClassVar[str] = "maps"
  model: cflow.CflowModel

  def __call__(self, maps) -> tuple:
    return cflow.score(self.model, maps)

  @property
  def positions(self) -> int:
    return int(self.model.grids[0][0] * self.model.grids[0][1])


class PadimFitter:
  """Accumulates PaDiM statistics batch by batch."""

  def __init__(self, channels, padim_options, scoring_options):
    self.channels = channels
    self.eps = padim_options.eps
    self.blur_sigma = scoring_options.blur_sigma
    self.stats = None

  @classmethod
  def create(cls, extractor, image_size, options: FitOptions, label: str):
    del label  # PaDiM logs nothing of its own
    key = jax.random.fold_in(jax.random.PRNGKey(options.seed), PADIM_SEED)
    total = extractor.channels(image_size)
    p = options.baselines.padim
    channels = padim_channels(p, extractor.name, key, total)
    return cls(channels, p, options.scoring)

  def update(self, maps, weight):
    if not weight.any():
      return
    x = padim.embed_maps(maps, self.channels)
    part = padim.batch_stats(x, jnp.asarray(weight, jnp.float32))
    self.stats = (
        part if self.stats is None else padim.merge_stats(self.stats, part)
    )
    jax.block_until_ready(self.stats)  # its time counts as fitting

  def finish(self, image_size, grid) -> PadimScorer:
    if self.stats is None:
      raise ValueError("PaDiM: no training images to fit on")
    model = padim.fit(
        self.stats,
        channels=self.channels,
        grid=grid,
        image_size=image_size,
        blur_sigma=self.blur_sigma,
        eps=self.eps,
    )
    return PadimScorer(model)


class CflowFitter:
  """Keeps the training maps (CFLOW trains several epochs over them)."""

  def __init__(self, key, cflow_options, scoring_options, label: str):
    self.key, self.label = key, label
    self.options = cflow_options
    self.blur_sigma = scoring_options.blur_sigma
    self.parts = []

  @classmethod
  def create(cls, extractor, image_size, options: FitOptions, label: str):
    del extractor, image_size  # CFLOW keeps every channel
    key = jax.random.fold_in(jax.random.PRNGKey(options.seed), CFLOW_SEED)
    return cls(key, options.baselines.cflow, options.scoring, label)

  def update(self, maps, weight):
    keep = np.flatnonzero(weight)
    if keep.size:
      self.parts.append([np.asarray(m)[keep] for m in maps])

  def _report(self, scale, epoch, loss):
    logging.info(
        "%s: cflow scale %d epoch %d: NLL/dim %.4f",
        self.label,
        scale,
        epoch,
        loss,
    )

  def finish(self, image_size, grid) -> CflowScorer:
    del grid  # one per scale, from the maps
    maps = [np.concatenate(s, 0) for s in zip(*self.parts)]
    self.parts = []
    model, _ = cflow.fit(
        self.key,
        maps,
        self.options,
        image_size=image_size,
        blur_sigma=self.blur_sigma,
        progress=self._report,
    )
    return CflowScorer(model)


FITTERS = registry.Registry("baseline fitter")
FITTERS.register("padim", PadimFitter)
FITTERS.register("cflow", CflowFitter)


def fit_stream(samples, extractor, pre, fitters, loader, *, rows, desc):
  """One stream over `samples` feeding every fitter its `rows` (indices
  into samples, None: all) -> ({name: model}, {name: fit seconds}, extract
  seconds)."""
  image_size = pre.input_size or (pre.crop, pre.crop)
  spent = dict.fromkeys(fitters, 0.0)
  t0 = time.perf_counter()
  masks = {}
  for name, r in rows.items():
    if r is not None:
      masks[name] = np.zeros(len(samples), bool)
      masks[name][np.asarray(r, np.int64)] = True
  grid = None
  bs = extractor.batch_size
  for batch in embedding.training_stream(samples, pre, bs, loader, desc):
    maps = jax.block_until_ready(extractor(batch.images))
    grid = tuple(maps[0].shape[1:3])
    idx = np.asarray(batch.indices)
    for name, fitter in fitters.items():
      t = time.perf_counter()
      weight = np.zeros(bs, np.float32)
      weight[: idx.size] = masks[name][idx] if name in masks else 1.0
      fitter.update(maps, weight)
      spent[name] += time.perf_counter() - t
  extract_s = time.perf_counter() - t0 - sum(spent.values())
  models = {}
  for name, fitter in fitters.items():
    t = time.perf_counter()
    models[name] = fitter.finish(image_size, grid)
    spent[name] += time.perf_counter() - t
  return models, spent, extract_s


@dataclasses.dataclass
class BaselineFit:
  """Fitted baselines (models scoring tap maps), their fit records and the
  seconds spent reading and running the backbone."""

  models: Dict[str, object]
  infos: Dict[str, fitting.FitInfo]
  extract_s: float = 0.0


def fit(
    train: Sequence,
    extractor: embedding.MapExtractor,
    pre: data.Preprocess,
    names: Sequence[str],
    options: FitOptions,
    *,
    subsets: Optional[Dict[str, np.ndarray]] = None,
    label: str = "fit",
) -> BaselineFit:
  """Fits the baselines among `names` on `train` (a filtered one on the
  rows `subsets[name]`) with one training stream."""
  names = [n for n in names if not methods_lib.scores_features(n)]
  if not names:
    return BaselineFit({}, {})
  subsets = subsets or {}
  image_size = pre.input_size or (pre.crop, pre.crop)
  fitters = {
      n: (
          FITTERS.get(methods_lib.family(n)).create(
              extractor, image_size, options, label
          )
      )
      for n in names
  }
  rows = {n: subsets.get(n) for n in names}
  models, fit_s, extract_s = fit_stream(
      train,
      extractor,
      pre,
      fitters,
      options.loader,
      rows=rows,
      desc=f"{label}: baselines fit",
  )
  infos = {}
  for name in names:
    r = rows[name]
    n_fit = len(train) if r is None else len(r)
    infos[name] = fitting.FitInfo(
        method=name,
        n_images=n_fit,
        n_patches=n_fit * models[name].positions,
        bank_size=None,
        n_outlier_patches=None,
        fit_s=fit_s[name],
        train_images=None if r is None else np.asarray(r),
    )
    logging.info(
        "%s / %s: fitted on %d images (%.1fs)", label, name, n_fit, fit_s[name]
    )
  return BaselineFit(models, infos, extract_s)
