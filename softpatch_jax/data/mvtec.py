"""MVTec AD layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect_type>/*.png          ('good' = normal)
<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png
"""

from __future__ import annotations

from typing import List, Tuple

from softpatch_jax.data.files import list_layout_categories
from softpatch_jax.data.files import load_layout
from softpatch_jax.data.types import Sample

CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def list_categories(root) -> List[str]:
  """Sorted sub-folders of root that look like categories (have train/good)."""
  return list_layout_categories(root, normal="good", layout="MVTec")


def load_category(root, category: str) -> Tuple[List[Sample], List[Sample]]:
  """(train, test) Samples of one category, in sorted, deterministic order.

  train: train/good, label 0. test: test/good label 0 without mask; every
  other test/<type> label 1 with mask ground_truth/<type>/<stem>_mask.png
  (ValueError naming the expected path when missing).
  """
  return load_layout(
      root, category, normal="good", mask_suffixes=("_mask",), layout="MVTec AD"
  )
