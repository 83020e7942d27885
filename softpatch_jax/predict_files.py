"""What the predict command reads and writes: inputs, names, CSV, images.

Every file is written atomically (see io_utils). See `predict` for the
layout of the output folder.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
from typing import List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image

from softpatch_jax import data
from softpatch_jax import detector
from softpatch_jax import io_utils
from softpatch_jax import viz
from softpatch_jax.data import files as data_files

CSV_FILENAME = "predictions.csv"
CSV_FIELDS = [
    "path",
    "score",
    "normalised_score",
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
  files in a directory with one log line (see `data.files.list_images`); a listed
  file that does not exist or is a symlink loop, or no image at all, is a
  ValueError.
  """
  if isinstance(inputs, str):
    if os.path.isdir(inputs):
      return data_files.list_images(inputs, "input image", recursive=recursive)
    inputs = [p.strip() for p in inputs.split(",") if p.strip()]
  inputs = [os.fspath(p) for p in inputs]
  if not inputs:
    raise ValueError("no input given: pass a directory or image files")
  paths, skipped = [], []
  for p in inputs:
    if os.path.isdir(p):
      paths += data_files.list_images(p, "input image", recursive=recursive)
    elif data_files.is_symlink_loop(p):
      raise ValueError(f"input file is a symlink loop: {p}")
    elif not os.path.isfile(p):
      raise ValueError(f"input file does not exist: {p}")
    elif data_files.is_image(p):
      paths.append(p)
    else:
      skipped.append(p)
  if skipped:
    logging.warning(
        "skipping %d non-image file(s) (accepted extensions %s): %s",
        len(skipped),
        ", ".join(data_files.IMAGE_EXTENSIONS),
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


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """What predict writes for each scored image, and where.

  folder: the output folder; pre: the model's preprocessing (whole-image
  mode, and the normalisation undone for the heatmap background);
  image_threshold / pixel_threshold: the decision thresholds (None: no
  decision / no mask); color_range: (lo, hi) of every heatmap's colour
  scale (None: each map's own range); heatmaps, save_maps, save_masks: which
  files to write.
  """

  folder: str
  pre: data.Preprocess
  image_threshold: Optional[float] = None
  pixel_threshold: Optional[float] = None
  color_range: Optional[Tuple[float, float]] = None
  heatmaps: bool = True
  save_maps: bool = False
  save_masks: bool = False

  @property
  def needs_original(self) -> bool:
    """Whether a whole-image map goes back to each file's own size."""
    return self.pre.whole_image and (
        self.heatmaps
        or self.save_maps
        or self.save_masks
        or self.pixel_threshold is not None
    )

  def decision(self, score: float) -> str:
    t = self.image_threshold
    return "n/a" if t is None else "anomalous" if score >= t else "normal"


def error_row(spec: OutputSpec, path: str, error: str) -> dict:
  """The row of an input that could not be scored."""
  return {
      "path": path,
      "decision": "error",
      "threshold": spec.image_threshold,
      "error": error,
  }


def write_one(
    spec: OutputSpec, name, path, image, score, amap, score_norm=None
) -> dict:
  """Writes one image's heatmap / map / mask; returns its CSV row.

  image, amap: the network input and its raw map; score, score_norm: the
  raw and normalised image scores (`detector.Result`).
  """
  row = {"path": path, "score": score, "threshold": spec.image_threshold}
  row["normalised_score"] = score_norm
  row["decision"] = spec.decision(score)
  original = None
  if spec.needs_original:
    # Whole-image mode: the map covers the whole file, so it goes back to the
    # file's own size, drawn over the file itself.
    original = np.asarray(data.open_image(path).convert("RGB"))
    amap = original_size_map(amap, original.shape[:2])
  mask = None
  if spec.pixel_threshold is not None:
    mask = amap >= spec.pixel_threshold
    row["anomalous_pixel_fraction"] = float(mask.mean())
  if spec.heatmaps:
    if original is None:
      original = viz.to_uint8_image(image, spec.pre.mean, spec.pre.std)
    row["heatmap"] = write_heatmap(spec, name, original, amap, mask)
  if spec.save_maps:
    row["map"] = os.path.join("maps", name + ".npy")
    io_utils.save_npy(
        os.path.join(spec.folder, row["map"]), amap.astype(np.float32)
    )
  if spec.save_masks and mask is not None:
    row["mask"] = os.path.join("masks", name + ".png")
    io_utils.write_bytes(
        os.path.join(spec.folder, row["mask"]),
        png_bytes(mask.astype(np.uint8) * 255),
    )
  return row


def heatmap_scale(spec: OutputSpec, amap) -> viz.ColorScale:
  """The colour scale of a heatmap: `spec.color_range` (one scale for every
  image; the map's own range without it), the pixel threshold marked."""
  lo, hi = spec.color_range or (float(amap.min()), float(amap.max()))
  return viz.ColorScale(lo, hi, threshold=spec.pixel_threshold)


def write_heatmap(spec: OutputSpec, name, rgb, amap, mask) -> str:
  """heatmaps/<name>.png: the map over `rgb`, the mask (map >= pixel
  threshold) outlined in green, and below it the colour bar with the
  threshold marked (images narrower than viz.LEGEND_MIN_WIDTH: no bar, no
  room for its labels); its path relative to the output folder."""
  if rgb.shape[-1] == 1:
    rgb = np.repeat(rgb, 3, axis=-1)
  scale = heatmap_scale(spec, amap)
  over = viz.overlay(rgb, amap, scale.vmin, scale.vmax)
  if mask is not None and mask.any():
    over = viz.mask_outline(over, mask, width=viz.outline_width(over.shape))
  if over.shape[1] >= viz.LEGEND_MIN_WIDTH:
    caption = ["pixel score; green: map >= threshold"]
    if scale.threshold is None:
      caption = ["pixel score" + ("" if spec.color_range else " (own range)")]
    over = np.asarray(viz.with_legend(over, scale, caption))
  rel = os.path.join("heatmaps", name + ".png")
  io_utils.write_bytes(os.path.join(spec.folder, rel), png_bytes(over))
  return rel


def original_size_map(amap, size) -> np.ndarray:
  """Bilinear resize of a float (H, W) map to `size` (h, w), as the
  detector's own-size maps of whole-image models (`detector.resize_map`)."""
  return detector.resize_map(amap, size)


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
    for k in (
        "score",
        "normalised_score",
        "threshold",
        "anomalous_pixel_fraction",
    ):
      r[k] = float(r[k]) if r.get(k) else None
  return rows
