"""Directory listing shared by the dataset loaders."""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

logger = logging.getLogger("softpatch_jax.data")


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{what} directory not found: {path}")
    return path


def list_images(directory: str, what: str = "image", recursive: bool = False,
                allow_empty: bool = False, skip_dirs: Sequence[str] = ()) -> List[str]:
    """Sorted image files in `directory` (relative-path order when recursive).

    Files with other extensions are skipped with one warning listing them.  An empty
    result raises ValueError unless allow_empty.  When recursive, folders named in
    skip_dirs (and hidden folders) are not entered.
    """
    require_dir(directory, what)
    images, skipped = [], []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
            for f in filenames:
                (images if is_image(f) else skipped).append(os.path.join(dirpath, f))
    else:
        for f in os.listdir(directory):
            full = os.path.join(directory, f)
            if os.path.isdir(full):
                continue
            (images if is_image(f) else skipped).append(full)
    if skipped:
        logger.warning("skipping %d non-image file(s) in %s (accepted extensions %s): %s",
                       len(skipped), directory, ", ".join(IMAGE_EXTENSIONS),
                       ", ".join(sorted(os.path.relpath(s, directory) for s in skipped)))
    images.sort(key=lambda p: os.path.relpath(p, directory))
    if not images and not allow_empty:
        raise ValueError(f"no {what} files ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    return images


def subdirs(directory: str) -> List[str]:
    return sorted(d for d in os.listdir(directory)
                  if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))


def find_mask(gt_dir: str, stem: str, suffixes: Sequence[str] = ("_mask",)) -> Optional[str]:
    """First existing `<gt_dir>/<stem><suffix><ext>` over suffixes x image extensions."""
    for suffix in suffixes:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(gt_dir, stem + suffix + e)
                if os.path.isfile(p):
                    return p
    return None


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
