r"""`DataOptions.source='tfds'`: MVTec AD and BTAD read from TFDS records.

  python -m softpatch_jax.main --config=mvtec \
      --config.data.source=tfds --config.data.root=/data/mvtec_anomaly_detection \
      --config.data.tfds_dir=/data/tensorflow_datasets --workdir out/mvtec

Per category:
  1. the builder `mvtec_ad/<category>` (or `btad/<category>`) of
     `tfds_builders` is opened in `config.data.tfds_dir` (empty: TFDS's
     default, $TFDS_DATA_DIR or ~/tensorflow_datasets);
  2. when it is not prepared yet it is built once from `config.data.root`,
     the manual download directory (the extracted data set); later runs need
     only the records, so `root` may then be empty;
  3. both splits are read without TensorFlow, the images and masks as the
     PNG bytes stored;
  4. they are written under <workdir>/tfds_data/<name>/<category>/ in the
     folder layout of the file source (the image's own path, in its own
     format when that is PNG, BMP or TIFF, else as .png; masks as .png
     beside it), replacing an earlier copy as a whole;
  5. the file loader lists that copy, and the records' order, labels and
     defect types are checked against it.

The stream then decodes these files exactly as it decodes the originals
(same 8-bit pixels, the same size bounds and mask rule), so the noise
protocol, its seeded draw (which depends only on the sample order and
labels) and the augmentation of injected copies apply unchanged: a run gives
the same numbers from either source.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import logging
from PIL import Image

from softpatch_jax import io_utils
from softpatch_jax.data import tfds_builders
from softpatch_jax.data.files import subdirs
from softpatch_jax.data.types import DataOptions
from softpatch_jax.data.types import Sample

EXPORT_DIR = "tfds_data"
# Lossless formats PIL writes: these keep the original file name.
_LOSSLESS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def _export_name(rel: str) -> Tuple[str, Optional[str]]:
  """(file name in the copy, PIL format to re-save in; None: bytes as is)."""
  stem, ext = posixpath.splitext(rel)
  fmt = _LOSSLESS.get(ext.lower())
  if fmt is None:  # JPEG and the like: the stored PNG, named .png
    return stem + ".png", None
  return rel, (None if fmt == "PNG" else fmt)


def _write(path: str, data: bytes, fmt: Optional[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if fmt is None:
    with open(path, "wb") as f:
      f.write(data)
    return
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    img.save(path, format=fmt)


def _write_split(examples: Iterable[Dict], category_dir: str, seen: Dict):
  """Writes each example's files; returns the examples without their bytes."""
  kept = []
  for ex in examples:
    name, fmt = _export_name(ex["path"])
    written = [(name, ex.pop("image"), fmt)]
    mask = ex.pop("mask")
    if ex["mask_path"]:
      stem = posixpath.splitext(ex["mask_path"])[0]
      written.append((stem + ".png", mask, None))
    for rel, data, f in written:
      if rel in seen:
        raise ValueError(
            f"TFDS records {seen[rel]!r} and {ex['path']!r} both become "
            f"{rel} in the exported copy; rename one of the originals"
        )
      seen[rel] = ex["path"]
      _write(os.path.join(category_dir, *rel.split("/")), data, f)
    kept.append(ex)
  return kept


def export(
    splits: Dict[str, Iterable[Dict]], root: str, category: str
) -> Dict[str, List[Dict]]:
  """Writes the records of one category as <root>/<category>/....

  The examples are consumed one at a time (a category is never held in
  memory) and returned without their image and mask bytes. The copy is
  written into a hidden folder beside the target and renamed into place, so
  the folder holds one complete export or none.
  """
  with io_utils.atomic_dir(os.path.join(root, category)) as tmp:
    seen: Dict[str, str] = {}
    kept = {k: _write_split(v, tmp, seen) for k, v in splits.items()}
  return kept


def _check(samples: List[Sample], examples: Sequence[Dict], category_dir):
  """The listed copy must match the records, item for item."""
  got = [
      (
          os.path.relpath(s.path, category_dir).replace(os.sep, "/"),
          s.label,
          s.defect_type,
          s.mask_path is not None,
      )
      for s in samples
  ]
  want = [
      (
          _export_name(ex["path"])[0],
          int(ex["label"]),
          ex["defect_type"],
          bool(ex["mask_path"]),
      )
      for ex in examples
  ]
  if got != want:
    at = next(
        i
        for i in range(max(len(got), len(want)))
        if i >= min(len(got), len(want)) or got[i] != want[i]
    )
    raise ValueError(
        f"the copy of the TFDS records in {category_dir} lists "
        f"{len(got)} images where the records hold {len(want)}; first "
        f"difference at position {at}: "
        f"{got[at] if at < len(got) else None} listed, "
        f"{want[at] if at < len(want) else None} recorded"
    )


def load_category(
    dataset: str,
    category: str,
    workdir: Optional[str],
    *,
    data_dir: Optional[str] = None,
    manual_dir: Optional[str] = None,
) -> Tuple[List[Sample], List[Sample]]:
  """(train, test) Samples of one category, read from TFDS (module doc).

  Raises:
    ValueError: without tensorflow-datasets (naming the extra to install),
      for an unknown data set or category, when the data set is not
      prepared and `manual_dir` does not hold it, or without a workdir.
  """
  b = tfds_builders.builder(dataset, category, data_dir)
  name, module, _, _ = tfds_builders.LAYOUTS[dataset]
  if not workdir:
    raise ValueError(
        "config.data.source='tfds' writes the images it reads under the "
        "workdir, and none was given"
    )
  tfds_builders.prepare(b, manual_dir)
  splits = {s: tfds_builders.read_split(b, s) for s in ("train", "test")}
  root = os.path.join(workdir, EXPORT_DIR, name)
  splits = export(splits, root, category)
  train, test = module.load_category(root, category)
  _check(train, splits["train"], os.path.join(root, category))
  _check(test, splits["test"], os.path.join(root, category))
  logging.info(
      "%s/%s: %d train and %d test images from the TFDS records in %s, "
      "copied to %s",
      name,
      category,
      len(train),
      len(test),
      b.data_dir,
      os.path.join(root, category),
  )
  return train, test


def manual_categories(manual_dir: str, dataset: str) -> List[str]:
  """The categories in manual_dir, or in the first folder below holding any.

  Raises:
    ValueError: when there are none.
  """
  _, module, normal, _ = tfds_builders.LAYOUTS[dataset]
  for root in tfds_builders.candidate_roots(manual_dir):
    if any(
        os.path.isdir(os.path.join(root, d, "train", normal))
        for d in subdirs(root)
    ):
      return module.list_categories(root)
  raise ValueError(
      f"no {dataset} categories (<category>/train/{normal}) in the manual "
      f"download directory {manual_dir} or one folder below it"
  )


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """The registry's view of one data set read through TFDS."""

  dataset: str  # 'mvtec' | 'btad'

  def categories(self, data: DataOptions, workdir) -> List[str]:
    """The categories under data.root, else those prepared."""
    del workdir  # unused
    _, module, _, _ = tfds_builders.LAYOUTS[self.dataset]
    if data.root:
      return manual_categories(os.path.expanduser(data.root), self.dataset)
    data_dir = data.tfds_dir or None
    found = tfds_builders.prepared_categories(self.dataset, data_dir)
    if not found:
      b = tfds_builders.builder(self.dataset, module.CATEGORIES[0], data_dir)
      raise ValueError(
          f"no category of {b.name} is prepared in {b.data_dir_root}, and "
          "config.data.root (the manual download directory) is not set"
      )
    return found

  def load(self, data: DataOptions, category, workdir):
    return load_category(
        self.dataset,
        category,
        workdir,
        data_dir=data.tfds_dir or None,
        manual_dir=os.path.expanduser(data.root) if data.root else None,
    )


def dataset(name: str) -> TfdsDataset:
  """The TFDS-backed data set for `config.data.dataset` = name.

  Raises:
    ValueError: for a data set without TFDS builders.
  """
  if name not in tfds_builders.LAYOUTS:
    raise ValueError(
        "config.data.source='tfds' reads the data sets "
        f"{', '.join(tfds_builders.LAYOUTS)}, not config.data.dataset="
        f"{name!r}"
    )
  return TfdsDataset(name)
