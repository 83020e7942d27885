"""BTAD (beanTech) layout.

<root>/<category>/train/ok/*
<root>/<category>/test/{ok,ko}/*
<root>/<category>/ground_truth/ko/<stem>.png|.bmp
  (also accepted: <stem>_mask.<ext>)
Images are .bmp or .png depending on the product; the normal class is 'ok'.
"""

from __future__ import annotations

from typing import List, Tuple

from softpatch_jax.data.files import list_layout_categories
from softpatch_jax.data.files import load_layout
from softpatch_jax.data.types import Sample

CATEGORIES = ("01", "02", "03")


def list_categories(root) -> List[str]:
  """Sorted sub-folders of root that look like categories (have train/ok)."""
  return list_layout_categories(root, normal="ok", layout="BTAD")


def load_category(root, category: str) -> Tuple[List[Sample], List[Sample]]:
  """(train, test) Samples of one category, in sorted, deterministic order.

  train: train/ok, label 0. test: test/ok label 0; test/ko label 1 with a mask.
  """
  return load_layout(
      root, category, normal="ok", mask_suffixes=("_mask", ""), layout="BTAD"
  )
