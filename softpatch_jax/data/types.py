"""Plain records of the data layer: a `Sample` per image, a `Batch` per step,
and `DataOptions`, the settings of config.data."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import numpy as np

from softpatch_jax import settings
from softpatch_jax.data.geometry import MAX_ASPECT_RATIO
from softpatch_jax.data.geometry import MAX_BATCH
from softpatch_jax.data.geometry import MAX_PIXELS
from softpatch_jax.data.geometry import MAX_SIDE
from softpatch_jax.data.geometry import MAX_SOURCE_PIXELS
from softpatch_jax.feature_store import STORES

# Values of DataOptions.source.
SOURCES = ("files", "tfds")

# Labels: 0 normal, 1 anomalous, -1 unknown (unlabelled test folders).
NORMAL, ANOMALOUS, UNLABELLED = 0, 1, -1


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image on disk plus what is known about it.

  path:        image file.
  label:       0 normal, 1 anomalous, -1 unknown (unlabelled test folder).
  defect_type: sub-folder name ('good', 'scratch', ...).
  mask_path:   pixel ground truth (white = defect) or None when there is none.
  injected:    True for anomalous test images added to train by the noise
               protocol.
  aug_seed:    when not None, the stream augments this image deterministically
               from the seed.
  category:    dataset category ('bottle', 'mono', ...).
  """

  path: str
  label: int
  defect_type: str
  mask_path: Optional[str] = None
  injected: bool = False
  aug_seed: Optional[int] = None
  category: str = ""

  def __post_init__(self):
    if self.label not in (UNLABELLED, NORMAL, ANOMALOUS):
      raise ValueError(
          f"Sample label must be -1, 0 or 1, got {self.label!r} for {self.path}"
      )


class Batch(NamedTuple):
  """One decoded batch, covering up to batch_size consecutive input samples.

  images:  float32 (B, H, W, C), already normalised with the preprocess
           mean/std; None when no sample of the batch could be decoded
           (errors="collect" only).
  masks:   float32 (B, H, W) in {0, 1}, or None when masks were not
           requested or images is None.
  labels:  int32 (B,).
  indices: int64 (B,) positions of these images in the sample list given to
           the stream.
  errors:  ((index, message), ...) for the samples of this batch whose
           decoding failed, in input order (errors="collect" only; always
           empty otherwise). Those samples are not in images/labels/indices,
           so B is the number of samples decoded, possibly 0.
  """

  images: Optional[np.ndarray]
  masks: Optional[np.ndarray]
  labels: np.ndarray
  indices: np.ndarray
  errors: Tuple[Tuple[int, str], ...] = ()


def has_pixel_labels(samples) -> bool:
  """True when every anomalous sample has a mask (pixel metrics are meaningful).

  The stream fills a missing mask with zeros; for anomalous images without
  masks (ELPV, unlabelled folders) those zeros are not ground truth, so pixel
  metrics should be reported as n/a.
  """
  samples = list(samples)
  anomalous = [s for s in samples if s.label == ANOMALOUS]
  return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
  """config.data.synthetic: the generated MVTec-like data set.

  difficulty: in [0, 1]; 0 is the original generator (bold defects).
    Higher values fade the defects into the texture, make them smaller and
    thinner and vary the normal images more (data/synthetic.py).
  """

  n_train: int = 20
  n_test_good: int = 8
  n_test_defect: int = 8
  size: int = 128
  seed: int = 0
  difficulty: float = 0.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      name = f"data.synthetic.{f.name}"
      v = getattr(self, f.name)
      if f.name == "difficulty":
        v = settings.check_float(v, name, 0.0, 1.0)
      else:
        v = settings.check_int(v, name)
      settings.set_field(self, f.name, v)


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """config.data: which images, how they are read and preprocessed.

  dataset: a registered data set (mvtec | btad | folder | elpv | synthetic).
  source: 'files' (the folders under root), or 'tfds': mvtec / btad from
    TFDS records in tfds_dir ('' = TFDS's default), built once from root,
    the manual download directory (data/tfds_source.py; the `tfds` extra).
  categories: comma-separated; '' = all found. A list is joined.
  train_dir, test_dir: dataset=folder (test_dir optional).
  resize, crop: crop 0 is whole-image mode: images keep their aspect ratio
    and the patch grid follows it (all training images share one shape).
  max_pixels, max_aspect_ratio: bounds on one image after resizing.
  batch_size: images per backbone call (per device with a mesh).
  feature_store: where a fit keeps its train features: 'memory', or 'disk'
    (an unlinked temporary file in TMPDIR, read back in chunks; same
    results, about N x P x D x 4 bytes less resident memory).
  max_test: >0, a seeded per-label subsample of the test set.
  max_train: >0, at most this many training images, capped before noise
    injection: the first N in sorted order (elpv: drawn with split_seed).
  split_seed, test_normal_fraction: elpv only.
  """

  dataset: str = "mvtec"
  root: str = ""
  source: str = "files"
  tfds_dir: str = ""
  categories: str = ""
  train_dir: str = ""
  test_dir: str = ""
  resize: int = 256
  crop: int = 224
  max_pixels: int = MAX_PIXELS
  max_aspect_ratio: float = MAX_ASPECT_RATIO
  batch_size: int = 16
  feature_store: str = "memory"
  num_workers: int = 4
  max_test: int = 0
  max_train: int = 0
  split_seed: int = 0
  test_normal_fraction: float = 0.2
  synthetic: SyntheticOptions = dataclasses.field(
      default_factory=SyntheticOptions
  )

  def __post_init__(self):
    if not isinstance(self.categories, str):
      names = [str(c).strip() for c in self.categories or ()]
      settings.set_field(self, "categories", ",".join(names))
    settings.check_choice(self.source or "files", "data.source", SOURCES)
    settings.set_field(self, "source", self.source or "files")
    settings.check_choice(self.feature_store, "data.feature_store", STORES)
    # The ceilings a saved model is held to (model_meta), checked before
    # any work rather than at save time.
    for name, lo, hi in (
        ("resize", 0, MAX_SIDE),
        ("crop", 0, MAX_SIDE),
        ("max_pixels", 1, MAX_SOURCE_PIXELS),
        ("batch_size", 1, MAX_BATCH),
        ("num_workers", 1, 1 << 62),
        ("max_test", 0, 1 << 62),
        ("max_train", 0, 1 << 62),
        ("split_seed", 0, 1 << 62),
    ):
      v = getattr(self, name)
      v = 0 if v is None and name in ("resize", "crop") else v
      v = settings.check_int(v, f"data.{name}", lo, hi)
      settings.set_field(self, name, v)
    ratio = settings.check_float(
        self.max_aspect_ratio, "data.max_aspect_ratio", 1.0
    )
    settings.set_field(self, "max_aspect_ratio", ratio)
    frac = settings.check_float(
        self.test_normal_fraction, "data.test_normal_fraction", 0.0, 1.0
    )
    settings.set_field(self, "test_normal_fraction", frac)
    if isinstance(self.synthetic, dict):
      settings.set_field(self, "synthetic", SyntheticOptions(**self.synthetic))

  @property
  def category_names(self) -> Tuple[str, ...]:
    """The configured categories, in order ('' = none given)."""
    return tuple(c.strip() for c in self.categories.split(",") if c.strip())
