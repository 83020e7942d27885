"""BTAD (beanTech) layout.

<root>/<category>/train/ok/*
<root>/<category>/test/{ok,ko}/*
<root>/<category>/ground_truth/ko/<stem>.png|.bmp   (also accepted: <stem>_mask.<ext>)
Images are .bmp or .png depending on the product; the normal class is 'ok'.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from ._files import find_mask, list_images, logger, require_dir, stem, subdirs
from .types import Sample

CATEGORIES = ("01", "02", "03")


def list_categories(root) -> List[str]:
    root = os.fspath(root)
    require_dir(root, "Dataset root")
    cats = [d for d in subdirs(root) if os.path.isdir(os.path.join(root, d, "train", "ok"))]
    if not cats:
        raise ValueError(f"no BTAD-style categories (<cat>/train/ok) under {root}")
    return cats


def load_category(root, category: str) -> Tuple[List[Sample], List[Sample]]:
    """(train, test) Samples: train/ok label 0; test/ok label 0; test/ko label 1 with mask."""
    root = os.fspath(root)
    cat_dir = require_dir(os.path.join(root, category), f"Category '{category}'")
    train_dir = os.path.join(cat_dir, "train", "ok")
    if not os.path.isdir(train_dir):
        raise ValueError(f"training folder not found: {train_dir} (expected the BTAD layout "
                         f"<root>/<category>/train/ok)")
    train = [Sample(p, 0, "ok", None, category=category)
             for p in list_images(train_dir, "training image")]
    test_dir = require_dir(os.path.join(cat_dir, "test"), "Test")
    test: List[Sample] = []
    for dtype in subdirs(test_dir):
        files = list_images(os.path.join(test_dir, dtype), "test image", allow_empty=True)
        if not files:
            logger.warning("empty test folder skipped: %s", os.path.join(test_dir, dtype))
        for p in files:
            if dtype == "ok":
                test.append(Sample(p, 0, dtype, None, category=category))
                continue
            gt_dir = os.path.join(cat_dir, "ground_truth", dtype)
            mask = find_mask(gt_dir, stem(p), ("", "_mask"))
            if mask is None:
                raise ValueError(f"missing ground-truth mask for {p}: expected "
                                 f"{os.path.join(gt_dir, stem(p))}.png (or .bmp)")
            test.append(Sample(p, 1, dtype, mask, category=category))
    if not test:
        raise ValueError(f"no test images under {test_dir}")
    return train, test
