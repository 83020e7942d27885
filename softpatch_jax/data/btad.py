"""BTAD (beanTech) layout.

<root>/<category>/train/ok/*
<root>/<category>/test/{ok,ko}/*
<root>/<category>/ground_truth/ko/<stem>.png|.bmp   (also accepted: <stem>_mask.<ext>)
Images are .bmp or .png depending on the product; the normal class is 'ok'.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from ._files import load_layout, require_dir, subdirs
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
    return load_layout(root, category, normal="ok", mask_suffixes=("_mask", ""),
                       layout="BTAD")
