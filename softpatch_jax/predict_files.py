"""What the predict command reads and writes: inputs, names, CSV, images.

Every file is written atomically (see io_utils). See `predict` for the
layout of the output folder.
"""

from __future__ import annotations

import collections
import csv
import io
import os
from typing import List, Sequence

from absl import logging
import numpy as np
from PIL import Image

from softpatch_jax import io_utils
from softpatch_jax import data
from softpatch_jax import viz
from softpatch_jax.data import _files

CSV_FILENAME = "predictions.csv"
CSV_FIELDS = [
    "path",
    "score",
    "decision",
    "threshold",
    "anomalous_pixel_fraction",
    "heatmap",
    "map",
    "mask",
    "error",
]


def list_inputs(inputs, recursive: bool = False) -> List[str]:
  """A directory, a comma-separated string, or a list -> image file paths.

  Non-image files are skipped with one warning listing them, and hidden
  files in a directory with one log line (see `_files.list_images`); a listed
  file that does not exist or is a symlink loop, or no image at all, is a
  ValueError.
  """
  if isinstance(inputs, str):
    if os.path.isdir(inputs):
      return _files.list_images(inputs, "input image", recursive=recursive)
    inputs = [p.strip() for p in inputs.split(",") if p.strip()]
  inputs = [os.fspath(p) for p in inputs]
  if not inputs:
    raise ValueError("no input given: pass a directory or image files")
  paths, skipped = [], []
  for p in inputs:
    if os.path.isdir(p):
      paths += _files.list_images(p, "input image", recursive=recursive)
    elif _files.is_symlink_loop(p):
      raise ValueError(f"input file is a symlink loop: {p}")
    elif not os.path.isfile(p):
      raise ValueError(f"input file does not exist: {p}")
    elif _files.is_image(p):
      paths.append(p)
    else:
      skipped.append(p)
  if skipped:
    logging.warning(
        "skipping %d non-image file(s) (accepted extensions %s): %s",
        len(skipped),
        ", ".join(_files.IMAGE_EXTENSIONS),
        ", ".join(skipped),
    )
  if not paths:
    raise ValueError(f"no image files among the inputs {inputs}")
  return paths


def output_names(paths: Sequence[str]) -> List[str]:
  """Unique, flat output names for input paths (see module docstring)."""
  absp = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in absp])
  rel = [os.path.relpath(p, root) for p in absp]
  names = [os.path.splitext(r)[0].replace(os.sep, "__") for r in rel]
  counts = collections.Counter(names)
  out, seen = [], set()
  for r, n in zip(rel, names):
    if counts[n] > 1:  # a.png and a.jpg: keep the extension
      n = r.replace(os.sep, "__").replace(".", "_")
    base, i = n, 1
    while n in seen:
      n, i = f"{base}_{i}", i + 1
    seen.add(n)
    out.append(n)
  return out


def color_range(image_threshold, pixel_threshold):
  """One colour scale for every heatmap: 0 .. 2 x the pixel threshold."""
  ref = pixel_threshold if pixel_threshold is not None else image_threshold
  if ref is None or not ref > 0:
    return None
  return 0.0, 2.0 * float(ref)


def png_bytes(arr) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def fmt(v):
  if v is None:
    return ""
  if isinstance(v, float):
    return repr(v)  # full precision: the CSV round-trips the float32 score
  return str(v)


def write_one(
    output,
    name,
    path,
    image,
    score,
    amap,
    pre,
    t_img,
    t_pix,
    crange,
    heatmaps,
    save_maps,
    save_masks,
) -> dict:
  row = {"path": path, "score": score, "threshold": t_img}
  row["decision"] = (
      "n/a" if t_img is None else "anomalous" if score >= t_img else "normal"
  )
  original = None
  if pre.whole_image and (
      heatmaps or save_maps or save_masks or t_pix is not None
  ):
    # Whole-image mode: the map covers the whole file, so it goes back to the
    # file's own size, drawn over the file itself.
    original = np.asarray(data.open_image(path).convert("RGB"))
    amap = original_size_map(amap, original.shape[:2])
  mask = None
  if t_pix is not None:
    mask = amap >= t_pix
    row["anomalous_pixel_fraction"] = float(mask.mean())
  if heatmaps:
    if original is not None:
      rgb = original
    else:
      rgb = viz.to_uint8_image(image, pre.mean, pre.std)
    if rgb.shape[-1] == 1:
      rgb = np.repeat(rgb, 3, axis=-1)
    lo, hi = (
        crange if crange is not None else (float(amap.min()), float(amap.max()))
    )
    over = viz.overlay(rgb, amap, lo, hi)
    if mask is not None and mask.any():
      over = viz.mask_outline(over, mask)
    rel = os.path.join("heatmaps", name + ".png")
    io_utils.write_bytes(os.path.join(output, rel), png_bytes(over))
    row["heatmap"] = rel
  if save_maps:
    rel = os.path.join("maps", name + ".npy")
    io_utils.save_npy(os.path.join(output, rel), amap.astype(np.float32))
    row["map"] = rel
  if save_masks and mask is not None:
    rel = os.path.join("masks", name + ".png")
    io_utils.write_bytes(
        os.path.join(output, rel), png_bytes(mask.astype(np.uint8) * 255)
    )
    row["mask"] = rel
  return row


def original_size_map(amap, size) -> np.ndarray:
  """Bilinear resize of a float (H, W) map to `size` (h, w)."""
  h, w = (int(v) for v in size)
  if amap.shape == (h, w):
    return np.asarray(amap, np.float32)
  img = Image.fromarray(np.asarray(amap, np.float32), mode="F")
  return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)


def write_csv(path, rows):
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: fmt(r.get(k)) for k in CSV_FIELDS})
  io_utils.write_text(path, buf.getvalue())


def read_predictions(path) -> List[dict]:
  """Reads a predictions.csv back (scores as float, '' as None)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ("score", "threshold", "anomalous_pixel_fraction"):
      r[k] = float(r[k]) if r.get(k) else None
  return rows
