"""MVTec AD layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect_type>/*.png          ('good' = normal)
<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png
"""
from __future__ import annotations

import os
from typing import List, Tuple

from ._files import find_mask, list_images, logger, require_dir, stem, subdirs
from .types import Sample

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def list_categories(root) -> List[str]:
    """Sorted sub-folders of root that look like categories (have train/good)."""
    root = os.fspath(root)
    require_dir(root, "Dataset root")
    cats = [d for d in subdirs(root) if os.path.isdir(os.path.join(root, d, "train", "good"))]
    if not cats:
        raise ValueError(f"no MVTec-style categories (<cat>/train/good) under {root}")
    return cats


def load_category(root, category: str) -> Tuple[List[Sample], List[Sample]]:
    """(train, test) Samples of one category, in sorted, deterministic order.

    train: train/good, label 0.  test: test/good label 0 without mask; every other
    test/<type> label 1 with mask ground_truth/<type>/<stem>_mask.png (ValueError naming
    the expected path when missing).
    """
    root = os.fspath(root)
    cat_dir = require_dir(os.path.join(root, category), f"Category '{category}'")
    train_dir = os.path.join(cat_dir, "train", "good")
    if not os.path.isdir(train_dir):
        raise ValueError(f"training folder not found: {train_dir} (expected the MVTec AD layout "
                         f"<root>/<category>/train/good)")
    train = [Sample(p, 0, "good", None, category=category)
             for p in list_images(train_dir, "training image")]

    test_dir = require_dir(os.path.join(cat_dir, "test"), "Test")
    test: List[Sample] = []
    for dtype in subdirs(test_dir):
        files = list_images(os.path.join(test_dir, dtype), "test image", allow_empty=True)
        if not files:
            logger.warning("empty test folder skipped: %s", os.path.join(test_dir, dtype))
        for p in files:
            if dtype == "good":
                test.append(Sample(p, 0, dtype, None, category=category))
                continue
            gt_dir = os.path.join(cat_dir, "ground_truth", dtype)
            mask = find_mask(gt_dir, stem(p), ("_mask",))
            if mask is None:
                raise ValueError(f"missing ground-truth mask for {p}: expected "
                                 f"{os.path.join(gt_dir, stem(p) + '_mask.png')}")
            test.append(Sample(p, 1, dtype, mask, category=category))
    if not test:
        raise ValueError(f"no test images under {test_dir}")
    return train, test
