"""The baselines over image streams, for the evaluate mode.

`experiment.run_category` hands the method names here that have no memory
bank: 'padim' and 'cflow', on the configured backbone's layer1-3 maps (or
their EfficientNet-Lite analogues stage2/3/5), possibly after the image
filter of 'padim_filter+<method>' (`image_filter`). One stream over the
training images fits them all, one over the test images scores them all.
Results come back as `inference.Predictions` and `engine.FitInfo`, so
evaluation, the results files and the reports treat every method alike;
the memory-bank fields (bank size, noise patches) are None.

Like `engine` and `inference`, this module reads images and shows progress
bars but writes no files.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import engine
from softpatch_jax import inference
from softpatch_jax import methods as methods_lib
from softpatch_jax.baselines import cflow
from softpatch_jax.baselines import padim
from softpatch_jax.progress import Progress

# The ResNet taps of PaDiM and CFLOW; other families use their analogues.
TAPS = ("layer1", "layer2", "layer3")
# fold_in constants of the seeds of each random draw.
_PADIM_SEED, _CFLOW_SEED = 11, 12


@functools.lru_cache(maxsize=16)
def _jitted(module):
  return jax.jit(module.apply)


class MapExtractor:
  """A backbone's raw layer1-3 (or analogue) maps over fixed-size batches.

  Batches are padded to `batch_size` so one compiled program serves all.
  """

  def __init__(self, name: str, variables, batch_size: int):
    self.name = name
    self.taps = backbones.analogue_taps(name, TAPS)
    self.module = backbones.tap_module(name, self.taps)
    self.variables = variables
    self.batch_size = int(batch_size)
    self._shapes = {}

  def __call__(self, images: np.ndarray) -> List[jax.Array]:
    """(B, H, W, 3) normalised images -> padded per-tap maps (batch_size, ...)."""
    n = images.shape[0]
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad], 0)
    out = _jitted(self.module)(self.variables, jnp.asarray(images))
    return [out[t] for t in self.taps]

  def shapes(self, image_size) -> List[tuple]:
    """The (1, h, w, C) shape of each tap for `image_size` input."""
    image_size = tuple(int(s) for s in image_size)
    if image_size not in self._shapes:
      x = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
      out = jax.eval_shape(self.module.apply, self.variables, x)
      self._shapes[image_size] = [tuple(out[t].shape) for t in self.taps]
    return self._shapes[image_size]

  def channels(self, image_size) -> int:
    return int(sum(s[-1] for s in self.shapes(image_size)))


def padim_channels(config, backbone: str, key, total: int):
  """The channel subset of config.baselines.padim.channels[backbone]."""
  table = config.baselines.padim.channels
  if backbone not in table:
    raise ValueError(
        "config.baselines.padim.channels has no entry for backbone "
        f"{backbone!r}; set --config.baselines.padim.channels.{backbone}=N"
    )
  return padim.select_channels(key, total, min(int(table[backbone]), total))


def stream(config, samples, pre, bs, desc, with_masks=False, augment=None):
  """`data.stream_batches` of `samples` in batches of `bs`, with a progress
  bar."""
  stream = data.stream_batches(
      samples,
      pre,
      batch_size=bs,
      num_workers=config.data.num_workers,
      with_masks=with_masks,
      augment=augment,
  )
  total = engine.n_batches(len(samples), bs)
  return Progress(stream, total=total, desc=desc, unit="batches")


class PadimFit:
  """Accumulates PaDiM statistics batch by batch."""

  def __init__(self, channels):
    self.channels = channels
    self.stats = None

  def update(self, maps, weight):
    if not weight.any():
      return
    x = padim.embed_maps(maps, self.channels)
    part = padim.batch_stats(x, jnp.asarray(weight, jnp.float32))
    self.stats = (
        part if self.stats is None else padim.merge_stats(self.stats, part)
    )
    jax.block_until_ready(self.stats)  # its time counts as fitting

  def finish(self, config, image_size, grid):
    if self.stats is None:
      raise ValueError("PaDiM: no training images to fit on")
    return padim.fit(
        self.stats,
        channels=self.channels,
        grid=grid,
        image_size=image_size,
        blur_sigma=config.scoring.blur_sigma,
        eps=config.baselines.padim.eps,
    )


class CflowFit:
  """Keeps the training maps (CFLOW trains several epochs over them)."""

  def __init__(self, key, label):
    self.key, self.label = key, label
    self.parts = []

  def update(self, maps, weight):
    keep = np.flatnonzero(weight)
    if keep.size:
      self.parts.append([np.asarray(m)[keep] for m in maps])

  def finish(self, config, image_size, grid):
    c = config.baselines.cflow
    maps = [np.concatenate(s, 0) for s in zip(*self.parts)]
    self.parts = []

    def report(scale, epoch, loss):
      logging.info(
          "%s: cflow scale %d epoch %d: NLL/dim %.4f",
          self.label,
          scale,
          epoch,
          loss,
      )

    model, _ = cflow.fit(
        self.key,
        maps,
        image_size=image_size,
        epochs=c.epochs,
        n_blocks=c.coupling_blocks,
        cond_dim=c.condition_dim,
        hidden_ratio=c.hidden_ratio,
        clamp=c.clamp,
        learning_rate=c.learning_rate,
        batch=c.batch_positions,
        blur_sigma=config.scoring.blur_sigma,
        progress=report,
    )
    return model


def _score(model, maps, n):
  if isinstance(model, padim.PadimModel):
    img, pix, _ = padim.score(model, padim.embed_maps(maps, model.channels))
  else:
    img, pix = cflow.score(model, maps)
  return np.asarray(img)[:n], np.asarray(pix)[:n]


def fit_stream(config, samples, extractor, pre, fitters, rows, desc):
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
      masks[name][np.asarray(r)] = True
  grid = None
  augment = data.build_augment(config)
  for batch in stream(
      config, samples, pre, extractor.batch_size, desc, augment=augment
  ):
    maps = jax.block_until_ready(extractor(batch.images))
    grid = tuple(maps[0].shape[1:3])
    idx = np.asarray(batch.indices)
    for name, fitter in fitters.items():
      t = time.perf_counter()
      weight = np.zeros(extractor.batch_size, np.float32)
      weight[: idx.size] = masks[name][idx] if name in masks else 1.0
      fitter.update(maps, weight)
      spent[name] += time.perf_counter() - t
  extract_s = time.perf_counter() - t0 - sum(spent.values())
  models = {}
  for name, fitter in fitters.items():
    t = time.perf_counter()
    models[name] = fitter.finish(config, image_size, grid)
    spent[name] += time.perf_counter() - t
  return models, spent, extract_s


def predict_stream(config, samples, extractor, pre, models, desc, with_masks):
  """Scores `samples` with every model in one stream -> {name: Predictions}."""
  scores = {k: [] for k in models}
  maps = {k: [] for k in models}
  labels, masks, indices = [], [], []
  bs = extractor.batch_size
  for batch in stream(config, samples, pre, bs, desc, with_masks):
    raw = extractor(batch.images)
    for name, model in models.items():
      img, pix = _score(model, raw, len(batch.indices))
      scores[name].append(img)
      maps[name].append(pix)
    labels.append(np.asarray(batch.labels))
    indices.append(np.asarray(batch.indices))
    if batch.masks is not None:
      masks.append(np.asarray(batch.masks, np.float32))
  masks_a = np.concatenate(masks) if masks else None
  return {
      k: inference.Predictions(
          image_scores=np.concatenate(scores[k]),
          maps=np.concatenate(maps[k]),
          labels=np.concatenate(labels),
          masks=masks_a,
          indices=np.concatenate(indices),
      )
      for k in models
  }


@dataclasses.dataclass
class BaselineRun:
  """Predictions and fit records of the baselines, with their timings."""

  preds: Dict[str, inference.Predictions]
  infos: Dict[str, engine.FitInfo]
  extract_s: float = 0.0
  predict_s: float = 0.0


def run(
    config,
    train: Sequence,
    test: Sequence,
    embedder,
    pre,
    names,
    subsets: Optional[Dict[str, np.ndarray]] = None,
    label: str = "fit",
    with_masks: bool = False,
) -> BaselineRun:
  """Fits the baselines among `names` on `train` (a filtered one on its
  subset) with one training stream, and scores `test` with one more."""
  names = [n for n in names if methods_lib.is_baseline(n)]
  if not names:
    return BaselineRun({}, {})
  subsets = subsets or {}
  c = config.baselines.cflow
  if "cflow" in [methods_lib.split_filter(n)[1] for n in names]:
    cflow.check_settings(  # before any image is read
        epochs=c.epochs,
        learning_rate=c.learning_rate,
        batch=c.batch_positions,
        n_blocks=c.coupling_blocks,
        cond_dim=c.condition_dim,
    )
  extractor = MapExtractor(
      config.backbone.name, embedder.variables, embedder.batch_size
  )
  image_size = pre.input_size or (pre.crop, pre.crop)
  seed = jax.random.PRNGKey(config.seed)
  fitters = {}
  for name in names:
    if methods_lib.split_filter(name)[1] == "padim":
      key = jax.random.fold_in(seed, _PADIM_SEED)
      total = extractor.channels(image_size)
      fitters[name] = PadimFit(
          padim_channels(config, extractor.name, key, total)
      )
    else:
      fitters[name] = CflowFit(jax.random.fold_in(seed, _CFLOW_SEED), label)
  rows = {n: subsets.get(n) for n in names}
  models, fit_s, extract_s = fit_stream(
      config, train, extractor, pre, fitters, rows, f"{label}: baselines fit"
  )
  t0 = time.perf_counter()
  preds = predict_stream(
      config,
      test,
      extractor,
      pre,
      models,
      f"{label}: baselines test",
      with_masks,
  )
  predict_s = time.perf_counter() - t0
  infos = {}
  for name in names:
    r = rows[name]
    n_fit = len(train) if r is None else len(r)
    infos[name] = engine.FitInfo(
        method=name,
        n_images=n_fit,
        n_patches=n_fit * _positions(models[name]),
        bank_size=None,
        n_noise_patches=None,
        fit_s=fit_s[name],
        train_images=None if r is None else np.asarray(r),
    )
    logging.info(
        "%s / %s: fitted on %d images (%.1fs)", label, name, n_fit, fit_s[name]
    )
  return BaselineRun(preds, infos, extract_s, predict_s)


def _positions(model) -> int:
  if isinstance(model, padim.PadimModel):
    return int(model.mean.shape[0])
  return int(model.grids[0][0] * model.grids[0][1])
