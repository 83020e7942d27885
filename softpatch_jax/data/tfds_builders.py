r"""TFDS builders for MVTec AD and BTAD, from a manual download directory.

MVTec AD (Bergmann et al., CVPR 2019) and BTAD (Mishra et al., ISIE 2021)
are handed out by their authors under terms each user accepts when
downloading them, so these builders never download: they read the extracted
folders from TFDS's manual directory, in the layouts of README "Other runs",
listed by the loaders of `mvtec.py` and `btad.py` (one extra folder level,
such as <manual_dir>/mvtec_anomaly_detection/<category>, is accepted).

One builder config per category (`mvtec_ad/bottle`, `btad/01`), splits
`train` and `test`, one example per image in the file loader's order:
  image        PNG, 8-bit gray or RGB as in the file (decoders give 3
               channels); mask: binary 0/255, zeros for a normal image;
  label        0 normal, 1 anomalous; defect_type: 'good' / 'ok' or the
               defect folder's name;
  path         the image's path under its category folder
               ('test/crack/000.png'); mask_path likewise, '' when none;
  index        the position in the split (the records keep that order).
An 8-bit gray or RGB PNG is stored byte for byte; any other file (BMP, 16-bit
PNG, palette, TIFF) as a lossless PNG of the 8-bit image `open_image` decodes
from it, so a decoder sees exactly what the file source sees. Records are
written as array_record unless a `file_format` is given, and the builders'
`as_data_source()` reads them without TensorFlow:

  b = tfds_builders.builder("mvtec", "bottle", data_dir)
  tfds_builders.prepare(b, "/data/mvtec_anomaly_detection")
  test = b.as_data_source("test")

Once this module is imported, `tfds.builder("mvtec_ad/bottle")` finds them
too. Importing it does not need tensorflow-datasets; without it `builder`
raises a ValueError naming `pip install 'softpatch-jax[tfds]'`.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from softpatch_jax.data import btad
from softpatch_jax.data import mvtec
from softpatch_jax.data.files import require_dir
from softpatch_jax.data.files import subdirs
from softpatch_jax.data.decode import open_image
from softpatch_jax.data.decode import open_mask
from softpatch_jax.data.types import Sample

try:
  import tensorflow_datasets as tfds
except ImportError:  # the optional `tfds` extra
  tfds = None

INSTALL_HINT = "pip install 'softpatch-jax[tfds]'"
FILE_FORMAT = "array_record"  # read back without TensorFlow
BUILDER_VERSION = "1.0.0"
# config.data.dataset -> (TFDS name, loader module, normal folder, categories)
LAYOUTS = {
    "mvtec": ("mvtec_ad", mvtec, "good", mvtec.CATEGORIES),
    "btad": ("btad", btad, "ok", btad.CATEGORIES),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CITATIONS = {
    "mvtec_ad": (
        "@inproceedings{bergmann2019mvtec, title={{MVTec AD} -- A "
        "Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},"
        " author={Bergmann, Paul and Fauser, Michael and Sattlegger, David "
        "and Steger, Carsten}, booktitle={CVPR}, year={2019}}"
    ),
    "btad": (
        "@inproceedings{mishra2021vtadl, title={{VT-ADL}: A Vision Transformer"
        " Network for Image Anomaly Detection and Localization}, "
        "author={Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and"
        " Piciarelli, Claudio and Foresti, Gian Luca}, booktitle={IEEE "
        "International Symposium on Industrial Electronics}, year={2021}}"
    ),
}


def _layout(dataset: str):
  try:
    return LAYOUTS[dataset]
  except (KeyError, TypeError):
    raise ValueError(
        f"TFDS builders exist for the data sets {', '.join(LAYOUTS)}, not "
        f"{dataset!r}"
    ) from None


# ---------------------------------------------------------------------------
# Examples (plain Python; the builders below only wrap them).


def _is_plain_png(raw: bytes) -> bool:
  """An 8-bit gray (colour type 0) or RGB (2) PNG, from its IHDR chunk."""
  return (
      len(raw) > 25
      and raw[:8] == _PNG_SIGNATURE
      and raw[12:16] == b"IHDR"
      and raw[24] == 8
      and raw[25] in (0, 2)
  )


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


@functools.lru_cache(maxsize=16)
def _blank_mask(size: Tuple[int, int]) -> bytes:
  return _png(Image.new("L", size, 0))


def encode_image(path: str) -> Tuple[bytes, Tuple[int, int]]:
  """(PNG bytes, (width, height)) of an image file (module docstring).

  Raises:
    ValueError: naming the file, when it cannot be decoded.
  """
  img = open_image(path)
  with open(path, "rb") as f:
    raw = f.read()
  return (raw if _is_plain_png(raw) else _png(img)), img.size


def encode_mask(path: Optional[str], size: Tuple[int, int], image: str):
  """PNG bytes of the binary mask at `path`, or of zeros when it is None.

  Raises:
    ValueError: naming both files, when the mask's size is not `size`.
  """
  if path is None:
    return _blank_mask(tuple(size))
  mask = open_mask(path)
  if mask.size != tuple(size):
    raise ValueError(
        f"mask {path} has size {mask.size[0]}x{mask.size[1]} but image "
        f"{image} has size {size[0]}x{size[1]} (width x height)"
    )
  return _png(mask)


def _relative(path: str, category_dir: str) -> str:
  return os.path.relpath(path, category_dir).replace(os.sep, "/")


def examples(
    samples: Sequence[Sample], category_dir: str
) -> Iterator[Tuple[str, Dict]]:
  """(key, example) per sample, in order; keys are the relative paths."""
  for index, s in enumerate(samples):
    rel = _relative(s.path, category_dir)
    image, size = encode_image(s.path)
    yield rel, {
        "image": image,
        "mask": encode_mask(s.mask_path, size, s.path),
        "label": int(s.label),
        "defect_type": s.defect_type,
        "path": rel,
        "mask_path": (
            _relative(s.mask_path, category_dir) if s.mask_path else ""
        ),
        "index": index,
    }


def candidate_roots(manual_dir: str) -> List[str]:
  """manual_dir and the folders right below it, where a data set may sit."""
  manual_dir = os.fspath(manual_dir)
  require_dir(manual_dir, "TFDS manual download")
  return [manual_dir] + [
      os.path.join(manual_dir, d) for d in subdirs(manual_dir)
  ]


def find_root(manual_dir: str, category: str, dataset: str) -> str:
  """The folder holding <category>/train/<normal>: manual_dir or one below.

  Raises:
    ValueError: naming the expected folder, when neither holds it.
  """
  _, _, normal, _ = _layout(dataset)
  for root in candidate_roots(manual_dir):
    if os.path.isdir(os.path.join(root, category, "train", normal)):
      return root
  raise ValueError(
      f"{dataset} category '{category}' not found in the manual download"
      " directory: expected"
      f" {os.path.join(manual_dir, category, 'train', normal)} (or the same one"
      " folder further down); extract the data set there"
  )


# ---------------------------------------------------------------------------
# The builders and their access functions.


def _features():
  image = tfds.features.Image
  return tfds.features.FeaturesDict({
      "image": image(shape=(None, None, 3), encoding_format="png"),
      "mask": image(shape=(None, None, 1), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=["normal", "anomalous"]),
      "defect_type": tfds.features.Text(),
      "path": tfds.features.Text(),
      "mask_path": tfds.features.Text(),
      "index": tfds.features.Scalar(dtype=np.int32),
  })


BUILDERS: Dict[str, type] = {}  # TFDS name -> builder class

if tfds is not None:

  class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An MVTec-like layout read from the manual directory (module doc)."""

    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {
        BUILDER_VERSION: "Images, masks, labels, defect types, paths."
    }
    DATASET = ""  # config.data.dataset
    HOMEPAGE = None
    LICENSE = None

    def __init__(self, *, file_format=None, **kwargs):
      super().__init__(file_format=file_format, **kwargs)
      # A new data set is written as array_record unless told otherwise; a
      # prepared one keeps the format it was written in.
      if file_format is None and not is_prepared(self):
        self.info.set_file_format(FILE_FORMAT, override=True)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=(
              f"{self.name}: one example per image of a category, with its"
              " mask, label, defect type and path."
          ),
          features=_features(),
          homepage=self.HOMEPAGE,
          citation=_CITATIONS[self.name],
          license=self.LICENSE,
          disable_shuffling=True,  # the file loader's order
      )

    def _split_generators(self, dl_manager):
      category = self.builder_config.name
      root = find_root(dl_manager.manual_dir, category, self.DATASET)
      _, module, _, _ = _layout(self.DATASET)
      train, test = module.load_category(root, category)
      category_dir = os.path.join(root, category)
      return {
          "train": self._generate_examples(train, category_dir),
          "test": self._generate_examples(test, category_dir),
      }

    def _generate_examples(self, samples, category_dir):
      yield from examples(samples, category_dir)

  def _configs(name, categories):
    return [
        tfds.core.BuilderConfig(name=c, description=f"{name} category {c}")
        for c in categories
    ]

  class MvtecAd(_LayoutBuilder, skip_registration=True):
    """MVTec AD (Bergmann et al., CVPR 2019), 15 categories."""

    name = "mvtec_ad"
    DATASET = "mvtec"
    BUILDER_CONFIGS = _configs("MVTec AD", mvtec.CATEGORIES)
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    LICENSE = "CC BY-NC-SA 4.0"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_anomaly_detection.tar.xz from the MVTec AD page, "
        "accept its licence, and extract it into the manual directory."
    )

  class Btad(_LayoutBuilder, skip_registration=True):
    """BTAD, the beanTech set of Mishra et al. (ISIE 2021), 3 products."""

    name = "btad"
    DATASET = "btad"
    BUILDER_CONFIGS = _configs("BTAD", btad.CATEGORIES)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download BTAD (BTech_Dataset_transformed) from its authors and "
        "extract it into the manual directory (folders 01, 02, 03)."
    )

  BUILDERS.update(mvtec_ad=MvtecAd, btad=Btad)

  class _Provider(tfds.core.registered.DatasetBuilderProvider):
    """Lets `tfds.builder` find these builders by name.

    The classes skip TFDS's own registry, which refuses a second class under
    one name when this module is imported again.
    """

    def has_dataset(self, name):
      return name in BUILDERS

    def get_builder_cls(self, name):
      return BUILDERS[name]

  tfds.core.registered.add_dataset_builder_provider(_Provider(), index=0)


def builder(dataset: str, category: str, data_dir: Optional[str] = None):
  """The builder of one category ('mvtec' / 'btad'); data_dir None = TFDS's.

  Raises:
    ValueError: without tensorflow-datasets, or for an unknown data set or
      category (listing the valid ones).
  """
  name, _, _, categories = _layout(dataset)
  if tfds is None:
    raise ValueError(
        f"reading {dataset} through TFDS needs tensorflow-datasets: "
        + INSTALL_HINT
    )
  if category not in categories:
    raise ValueError(
        f"no TFDS config '{name}/{category}': the categories are "
        f"{', '.join(categories)}"
    )
  # Before the data is prepared, TFDS's constructor makes an empty temporary
  # folder for metadata it would fetch online and never removes it: one per
  # call. Give it a scratch folder that goes away.
  saved = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix="softpatch_tfds_") as scratch:
    tempfile.tempdir = scratch
    try:
      return BUILDERS[name](config=category, data_dir=data_dir or None)
    finally:
      tempfile.tempdir = saved


def is_prepared(b) -> bool:
  """Whether `b`'s data is written (no TFDS warning when there is none)."""
  return b.data_path.exists() and b.is_prepared()


def prepared_categories(dataset: str, data_dir: Optional[str]) -> List[str]:
  """The categories of `dataset` already prepared in `data_dir`."""
  _, _, _, categories = _layout(dataset)
  return [c for c in categories if is_prepared(builder(dataset, c, data_dir))]


def prepare(b, manual_dir: Optional[str]) -> None:
  """Builds `b` from `manual_dir` unless it is prepared already.

  Raises:
    ValueError: when it is not prepared and `manual_dir` is empty or
      missing, or when it was written in another format than array_record.
  """
  if not is_prepared(b):
    if not manual_dir:
      raise ValueError(
          f"TFDS data set {b.name}/{b.builder_config.name} is not prepared in "
          f"{b.data_dir_root}; set config.data.root to the manual download "
          "directory (the extracted data set) to build it"
      )
    find_root(os.path.expanduser(manual_dir), b.builder_config.name, b.DATASET)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.expanduser(manual_dir)
        )
    )
  fmt = b.info.file_format
  if fmt is None or fmt.value != FILE_FORMAT:
    raise ValueError(
        f"TFDS data set {b.name}/{b.builder_config.name} in {b.data_dir} is "
        f"written as {fmt.value if fmt else 'unknown'}, not {FILE_FORMAT}, "
        "which reads without TensorFlow: rebuild it (delete that folder)"
    )


def read_split(b, split: str) -> Iterator[Dict]:
  """The examples of `split` in order, image and mask as stored PNG bytes.

  Raises:
    ValueError: when the records are not in their `index` order.
  """
  source = b.as_data_source(
      split,
      decoders={
          "image": tfds.decode.SkipDecoding(),
          "mask": tfds.decode.SkipDecoding(),
      },
  )
  for i in range(len(source)):
    ex = dict(source[i])
    for k in ("defect_type", "path", "mask_path"):
      v = ex[k]
      ex[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    if int(ex["index"]) != i:
      raise ValueError(
          f"record {i} of {b.name}/{b.builder_config.name} {split} in "
          f"{b.data_dir} has index {ex['index']}: not written by these "
          "builders; rebuild it (delete that folder)"
      )
    yield ex
