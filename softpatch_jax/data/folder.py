"""Generic folders of images, for data that follows no benchmark layout.

train_dir: every image below it (recursively), treated as normal (label 0).
test_dir (optional):
  * images directly inside -> unlabelled, label -1, defect_type 'unknown';
  * sub-folders named good / ok / normal (any case) -> label 0;
  * any other sub-folder -> label 1, defect_type = folder name, with a mask
    when <test_dir>/ground_truth/<type>/<stem>_mask.<ext> (or <stem>.<ext>)
    exists, else the same under the sibling <parent of test_dir>/ground_truth/
    (the MVTec arrangement); no mask otherwise (pixel metrics then need
    `has_pixel_labels` to be checked).
Folders named 'ground_truth' are never read as images: not as training images,
not as a defect type.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from absl import logging

from softpatch_jax.data.files import find_mask
from softpatch_jax.data.files import list_images
from softpatch_jax.data.files import require_dir
from softpatch_jax.data.files import stem
from softpatch_jax.data.files import subdirs
from softpatch_jax.data.types import Sample

NORMAL_NAMES = ("good", "ok", "normal")


def load_folder(
    train_dir, test_dir=None, category: str = ""
) -> Tuple[List[Sample], List[Sample]]:
  train_dir = os.fspath(train_dir)
  train = [
      Sample(p, 0, "good", None, category=category)
      for p in list_images(
          train_dir,
          "training image",
          recursive=True,
          skip_dirs=("ground_truth",),
      )
  ]
  if test_dir is None:
    return train, []
  test_dir = os.fspath(test_dir)
  require_dir(test_dir, "Test")
  gt_roots = [
      os.path.join(test_dir, "ground_truth"),
      os.path.join(os.path.dirname(os.path.abspath(test_dir)), "ground_truth"),
  ]
  test: List[Sample] = [
      Sample(p, -1, "unknown", None, category=category)
      for p in list_images(test_dir, "test image", allow_empty=True)
  ]
  for dtype in subdirs(test_dir):
    if dtype == "ground_truth":
      continue
    sub = os.path.join(test_dir, dtype)
    files = list_images(
        sub,
        "test image",
        recursive=True,
        allow_empty=True,
        skip_dirs=("ground_truth",),
    )
    if not files:
      logging.warning("empty test folder skipped: %s", sub)
    normal = dtype.lower() in NORMAL_NAMES
    for p in files:
      mask: Optional[str] = None
      if not normal:
        for gt_root in gt_roots:
          mask = find_mask(os.path.join(gt_root, dtype), stem(p), ("_mask", ""))
          if mask is not None:
            break
      test.append(Sample(p, 0 if normal else 1, dtype, mask, category=category))
  if not test:
    raise ValueError(f"no test images in {test_dir}")
  return train, test
