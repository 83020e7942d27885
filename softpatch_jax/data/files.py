"""Image files on disk: listing folders, the MVTec-like layouts, read errors."""

from __future__ import annotations

import errno
import os
from typing import List, Optional, Sequence

from absl import logging

from softpatch_jax.data.types import Sample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_symlink_loop(path: str) -> bool:
  """Whether `path` is a symlink that resolves back to itself (ELOOP)."""
  if not os.path.islink(path) or os.path.exists(path):
    return False
  try:
    os.stat(path)
  except OSError as e:
    return e.errno == errno.ELOOP
  return False


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise ValueError(f"{what} directory not found: {path}")
  return path


def list_images(
    directory: str,
    what: str = "image",
    recursive: bool = False,
    allow_empty: bool = False,
    skip_dirs: Sequence[str] = (),
) -> List[str]:
  """Sorted image files in `directory` (relative-path order when recursive).

  Files with other extensions are skipped with one warning listing them.
  Hidden files and folders (name starting with '.', such as macOS's '._x.png'
  resource forks) are skipped too, with one log line giving their count. An
  empty result raises ValueError unless allow_empty. When recursive, folders
  named in skip_dirs are not entered either.
  """
  require_dir(directory, what)
  images, skipped, hidden = [], [], 0
  if recursive:
    for dirpath, dirnames, filenames in os.walk(directory):
      dirnames[:] = sorted(
          d for d in dirnames if d not in skip_dirs and not d.startswith(".")
      )
      for f in filenames:
        if f.startswith("."):
          hidden += 1
          continue
        (images if is_image(f) else skipped).append(os.path.join(dirpath, f))
  else:
    for f in os.listdir(directory):
      full = os.path.join(directory, f)
      if os.path.isdir(full):
        continue
      if f.startswith("."):
        hidden += 1
        continue
      (images if is_image(f) else skipped).append(full)
  if hidden:
    logging.info("skipped %d hidden file(s) in %s", hidden, directory)
  if skipped:
    logging.warning(
        "skipping %d non-image file(s) in %s (accepted extensions %s): %s",
        len(skipped),
        directory,
        ", ".join(IMAGE_EXTENSIONS),
        ", ".join(sorted(os.path.relpath(s, directory) for s in skipped)),
    )
  images.sort(key=lambda p: os.path.relpath(p, directory))
  if not images and not allow_empty:
    raise ValueError(
        f"no {what} files ({', '.join(IMAGE_EXTENSIONS)}) in {directory}"
    )
  return images


def unreadable_message(failed, what: str = "image", limit: int = 20) -> str:
  """'N <what>(s) cannot be read:' and one '  path: reason' line per file.

  `failed` holds (path, decoder message) pairs; a path given twice (an
  augmented copy) is listed once. After `limit` lines: '  ... and K more'.
  """
  reasons = {}
  for path, msg in failed:
    # The decoder's message names the file, which starts the line already.
    reasons.setdefault(
        path, msg.replace(f": {path}", "").replace(f" {path}", "")
    )
  lines = [f"  {p}: {r}" for p, r in list(reasons.items())[:limit]]
  if len(reasons) > limit:
    lines.append(f"  ... and {len(reasons) - limit} more")
  return f"{len(reasons)} {what}(s) cannot be read:\n" + "\n".join(lines)


def subdirs(directory: str) -> List[str]:
  return sorted(
      d
      for d in os.listdir(directory)
      if os.path.isdir(os.path.join(directory, d)) and not d.startswith(".")
  )


def find_mask(
    gt_dir: str, stem: str, suffixes: Sequence[str] = ("_mask",)
) -> Optional[str]:
  """First existing `<gt_dir>/<stem><suffix><ext>`, suffixes x extensions."""
  for suffix in suffixes:
    for ext in IMAGE_EXTENSIONS:
      for e in (ext, ext.upper()):
        p = os.path.join(gt_dir, stem + suffix + e)
        if os.path.isfile(p):
          return p
  return None


def stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def load_layout(
    root,
    category: str,
    *,
    normal: str,
    mask_suffixes: Sequence[str],
    layout: str,
):
  """(train, test) Samples of an MVTec-like folder layout.

  <root>/<category>/train/<normal>/*, <root>/<category>/test/<type>/*
  (<normal> = label 0, any other type = label 1 with a mask
  ground_truth/<type>/<stem><suffix>.<ext>). Missing folders and masks raise
  ValueError naming the expected path.
  """
  root = os.fspath(root)
  cat_dir = require_dir(os.path.join(root, category), f"Category '{category}'")
  train_dir = os.path.join(cat_dir, "train", normal)
  if not os.path.isdir(train_dir):
    raise ValueError(
        f"training folder not found: {train_dir} (expected the {layout} "
        f"layout <root>/<category>/train/{normal})"
    )
  train = [
      Sample(p, 0, normal, None, category=category)
      for p in list_images(train_dir, "training image")
  ]
  test_dir = require_dir(os.path.join(cat_dir, "test"), "Test")
  test = []
  for dtype in subdirs(test_dir):
    files = list_images(
        os.path.join(test_dir, dtype), "test image", allow_empty=True
    )
    if not files:
      logging.warning(
          "empty test folder skipped: %s", os.path.join(test_dir, dtype)
      )
    for p in files:
      if dtype == normal:
        test.append(Sample(p, 0, dtype, None, category=category))
        continue
      gt_dir = os.path.join(cat_dir, "ground_truth", dtype)
      mask = find_mask(gt_dir, stem(p), tuple(mask_suffixes))
      if mask is None:
        raise ValueError(
            f"missing ground-truth mask for {p}: expected "
            f"{os.path.join(gt_dir, stem(p) + mask_suffixes[-1])}.png"
        )
      test.append(Sample(p, 1, dtype, mask, category=category))
  if not test:
    raise ValueError(f"no test images under {test_dir}")
  return train, test


def list_layout_categories(root, *, normal: str, layout: str) -> List[str]:
  """Sorted sub-folders of root that hold <cat>/train/<normal>."""
  root = os.fspath(root)
  require_dir(root, "Dataset root")
  cats = [
      d
      for d in subdirs(root)
      if os.path.isdir(os.path.join(root, d, "train", normal))
  ]
  if not cats:
    raise ValueError(
        f"no {layout}-style categories (<cat>/train/{normal}) under {root}"
    )
  return cats
