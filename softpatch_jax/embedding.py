"""A backbone over fixed-size batches of images: features and tap maps.

`Embedder` computes the patch features of the memory banks
(`features.embed`, split over a device mesh by `parallel.embed`);
`MapExtractor` the raw layer1-3 maps (or their EfficientNet-Lite analogues)
that PaDiM and CFLOW score. Both pad every batch to one size (`pad_batch`),
so one compiled program serves all batches, the last partial one included;
the tap maps run the backbone's one cached jitted apply
(`backbones.jitted_apply`). `extract_features` embeds a list of samples
into one array with a progress bar. Like `inference`, this module reads
images and shows progress bars but writes no files.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import feature_store
from softpatch_jax import features as features_lib
from softpatch_jax import parallel
from softpatch_jax import settings
from softpatch_jax import validation
from softpatch_jax.data import files as data_files
from softpatch_jax.progress import Progress

BROKEN_HINT = "the backbone weights or the input images are broken"
# The ResNet taps of PaDiM and CFLOW; other families use their analogues.
TAPS = ("layer1", "layer2", "layer3")


def pad_batch(images: np.ndarray, size: int) -> np.ndarray:
  """(B, ...) images zero-padded along the batch axis to `size` >= B."""
  n = images.shape[0]
  if n >= size:
    return images
  pad = np.zeros((size - n, *images.shape[1:]), images.dtype)
  return np.concatenate([images, pad], 0)


class Embedder:
  """`features.embed` bound to a backbone's weights, over fixed-size batches.

  Batches are padded to `batch_size` so that one compiled program serves
  every batch, the last partial one included (per device with a `mesh`).
  """

  def __init__(self, variables, spec, batch_size=16, mesh=None):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.variables = variables
    self.spec = spec
    self.mesh = mesh
    self.batch_size = int(batch_size) * getattr(mesh, "size", 1)
    self._grids = {}

  def grid(self, image_size) -> tuple:
    """The (h, w) patch grid for `image_size` input."""
    image_size = tuple(int(s) for s in image_size)
    if image_size not in self._grids:
      self._grids[image_size] = features_lib.grid_shape(
          self.variables, self.spec, image_size
      )
    return self._grids[image_size]

  def __call__(self, images: np.ndarray) -> jax.Array:
    """(B, H, W, 3) normalised images, B <= batch_size -> (B, P, D)."""
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(
          f"batch of {n} images exceeds batch_size {self.batch_size}"
      )
    images = pad_batch(images, self.batch_size)
    return parallel.embed(self.variables, images, self.spec, self.mesh)[:n]


def for_backbone(
    bb: backbones.Backbone,
    embed: features_lib.EmbedOptions,
    batch_size: int,
    mesh=None,
) -> Embedder:
  """The Embedder of backbone `bb`'s taps with the patch features `embed`;
  `batch_size` images per device of `mesh` (None: one device)."""
  spec = embed.spec(bb.module, bb.layers)
  return Embedder(bb.variables, spec, batch_size, mesh)


class MapExtractor:
  """A backbone's raw layer1-3 (or analogue) maps over fixed-size batches.

  Batches are padded to `batch_size` so one compiled program serves all;
  the maps keep the padding (the first B rows are the images').
  """

  def __init__(self, name: str, variables, batch_size: int, taps=TAPS):
    self.name = name
    self.taps = backbones.analogue_taps(name, taps)
    self.module = backbones.tap_module(name, self.taps)
    self.variables = variables
    self.batch_size = int(batch_size)
    self._shapes = {}

  def __call__(self, images: np.ndarray) -> List[jax.Array]:
    """(B, H, W, 3) normalised images -> padded per-tap maps (batch_size, ...)."""
    images = pad_batch(images, self.batch_size)
    out = backbones.jitted_apply(self.module)(
        self.variables, jnp.asarray(images)
    )
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


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
  """How training images are read: decoding threads, the transforms of the
  injected copies (a `data.Augment`, None: none), where their features are
  kept ('memory' or 'disk', `feature_store`), and what an unreadable image
  does: 'raise' stops at the first, 'collect' reads on and then raises one
  ValueError listing them all."""

  num_workers: int = 4
  augment: Optional[data.Augment] = None
  feature_store: str = "memory"
  errors: str = "raise"

  def __post_init__(self):
    n = settings.check_int(self.num_workers, "data.num_workers", 1)
    settings.set_field(self, "num_workers", n)
    settings.check_choice(
        self.feature_store, "data.feature_store", feature_store.STORES
    )
    settings.check_choice(self.errors, "errors", ("raise", "collect"))


def training_stream(samples, pre, batch_size: int, loader, desc: str):
  """`data.stream_batches` of training `samples` as `loader` says (no
  masks), in batches of `batch_size`, with a progress bar."""
  batches = data.stream_batches(
      samples,
      pre,
      batch_size=batch_size,
      num_workers=loader.num_workers,
      with_masks=False,
      augment=loader.augment,
      errors=loader.errors,
  )
  total = data.n_batches(len(samples), batch_size)
  return Progress(batches, total=total, desc=desc, unit="batches")


def extract_features(
    embedder: Embedder,
    samples: Sequence,
    pre: data.Preprocess,
    loader: LoaderOptions,
    *,
    desc: str = "features",
    what: str = "image",
) -> np.ndarray:
  """Embeds every sample -> (N, P, D) float32 array, with a progress bar.

  Unreadable images: `loader.errors` ('collect': one ValueError 'N <what>(s)
  cannot be read: ...' at the end). The features are kept as
  `loader.feature_store` says.
  """
  # One preallocated array (or file), filled batch by batch: concatenating
  # chunks would hold every feature twice at the peak.
  out = feature_store.Writer(len(samples), np.float32, loader.feature_store)
  failed = []
  for batch in training_stream(samples, pre, embedder.batch_size, loader, desc):
    failed += [(samples[i].path, msg) for i, msg in batch.errors]
    if failed or batch.images is None:
      continue  # the run fails anyway: only look for more unreadable files
    f = np.asarray(embedder(batch.images))
    validation.check_finite(f, f"features of {desc}", BROKEN_HINT)
    out.write(f)
  if failed:
    raise ValueError(data_files.unreadable_message(failed, what))
  if not out.filled:
    raise ValueError(f"no images to extract features from ({desc})")
  return out.finish()


@dataclasses.dataclass
class Stack:
  """The networks of a run, built once: the backbone, its patch-feature
  embedder (memory banks) and its tap-map extractor (baselines)."""

  backbone: backbones.Backbone
  embedder: Embedder
  extractor: MapExtractor


def build_stack(
    backbone: backbones.BackboneOptions,
    embed: features_lib.EmbedOptions,
    batch_size: int,
    mesh=None,
    seed: int = 0,
) -> Stack:
  """Loads the backbone (`seed`: of random weights) and wraps it for
  `batch_size` images per device of `mesh`."""
  bb = backbone.load(seed)
  embedder = for_backbone(bb, embed, batch_size, mesh)
  return Stack(
      bb, embedder, MapExtractor(bb.name, bb.variables, embedder.batch_size)
  )
