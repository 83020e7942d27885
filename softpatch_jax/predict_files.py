"""What the predict command reads and writes: inputs, names, CSV, images.

Every file is written atomically (see io_utils). See `predict` for the
layout of the output folder.
"""

from __future__ import annotations

import collections
import csv
import contextlib
import dataclasses
import hashlib
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
# The rows of a run in progress, appended as they are scored; renamed onto
# predictions.csv (input order) once the run is complete.
PARTIAL_FILENAME = "predictions.partial.csv"
# The folders of per-image outputs, and the extension of each one's files.
OUTPUT_DIRS = {"heatmaps": ".png", "maps": ".npy", "masks": ".png"}
# Output names longer than this (in bytes) are cut, with a hash of the full
# name appended: a folder entry holds at most 255 bytes, and the temp file of
# an atomic write adds about 30 to the name.
MAX_NAME_BYTES = 120
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


def list_inputs(inputs, recursive: bool = False, output=None) -> List[str]:
  """A directory, a comma-separated string, or a list -> image file paths.

  Non-image files are skipped with one warning listing them, and hidden
  files in a directory with one log line (see `data.files.list_images`); a listed
  file that does not exist or is a symlink loop, or no image at all, is a
  ValueError. `output` (predict's output folder): files a folder scan finds
  among its results are skipped with one warning (`in_output`).
  """
  if isinstance(inputs, str):
    if os.path.isdir(inputs):
      inputs = [inputs]
    else:
      inputs = [p.strip() for p in inputs.split(",") if p.strip()]
  inputs = [os.fspath(p) for p in inputs]
  if not inputs:
    raise ValueError("no input given: pass a directory or image files")
  paths, skipped, outputs = [], [], []
  for p in inputs:
    if os.path.isdir(p):
      found = data_files.list_images(p, "input image", recursive=recursive)
      for f in found:
        (outputs if in_output(f, p, output) else paths).append(f)
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
  if outputs:
    logging.warning(
        "skipping %d file(s) in the output folder %s (results of earlier "
        "runs are never scored as inputs): %s",
        len(outputs),
        output,
        ", ".join(outputs[:5]) + (", ..." if len(outputs) > 5 else ""),
    )
  if not paths:
    raise ValueError(f"no image files among the inputs {inputs}")
  return paths


def in_output(path, scanned, output) -> bool:
  """Whether `path`, found by scanning the folder `scanned`, belongs to the
  output folder `output`: it is in one of its heatmaps/maps/masks folders,
  or `output` lies inside `scanned` (the output folder equal to the input
  folder keeps the images beside the results)."""
  if output is None:
    return False
  real = os.path.realpath
  path, scanned, output = real(path), real(scanned), real(output)
  under = lambda p, d: os.path.commonpath([p, d]) == d
  if any(under(path, os.path.join(output, d)) for d in OUTPUT_DIRS):
    return True
  return output != scanned and under(output, scanned) and under(path, output)


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
    n = safe_name(n)
    base, i = n, 1
    while n in seen:
      n, i = f"{base}_{i}", i + 1
    seen.add(n)
    out.append(n)
  return out


def safe_name(name: str) -> str:
  """`name` as a file name that can always be written: bytes that are not
  UTF-8 (a non-UTF-8 input name) become '_', and a name over MAX_NAME_BYTES
  is cut; either way a hash of the original name is appended."""
  raw = to_bytes(name)
  clean = raw.decode("utf-8", "replace").replace("\ufffd", "_")
  if clean == name and len(raw) <= MAX_NAME_BYTES:
    return name
  while len(clean.encode("utf-8")) > MAX_NAME_BYTES - 9:
    clean = clean[:-1]
  return f"{clean}_{hashlib.sha1(raw).hexdigest()[:8]}"


def text(v: str) -> str:
  """`v` as text that UTF-8 can store: the bytes of a non-UTF-8 file name
  (surrogate escapes) written as \\xNN."""
  return to_bytes(v).decode("utf-8", "backslashreplace")


def to_bytes(v: str) -> bytes:
  """The bytes of a file name as os.fsdecode made it (any str: no error)."""
  try:
    return v.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:  # a surrogate fsdecode does not make
    return v.encode("utf-8", "backslashreplace")


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
  return text(str(v))


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


def csv_row(r: dict) -> dict:
  return {k: fmt(r.get(k)) for k in CSV_FIELDS}


def write_csv(path, rows):
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow(csv_row(r))
  io_utils.write_text(path, buf.getvalue())


class RowLog:
  """The CSV of a run in progress: PARTIAL_FILENAME in `folder`, each row
  appended and flushed as it is scored, so that a killed run leaves the rows
  scored so far beside the previous, complete predictions.csv (never
  touched before the end). `finish` writes predictions.csv atomically, in
  input order, then removes the partial file. Use it as a context manager:
  an error closes the partial file and leaves it there when it holds rows
  (removed when it holds none).
  """

  def __init__(self, folder: str):
    self.partial = os.path.join(folder, PARTIAL_FILENAME)
    self.path = os.path.join(folder, CSV_FILENAME)
    try:
      self._file = open(self.partial, "w", newline="", encoding="utf-8")
    except OSError as e:
      raise ValueError(f"cannot write {self.partial} ({e})") from e
    self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
    self._writer.writeheader()
    self._file.flush()
    self.n_rows = 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()
    if not self.n_rows:
      with contextlib.suppress(OSError):
        os.remove(self.partial)

  def add(self, row: dict) -> None:
    self._writer.writerow(csv_row(row))
    self._file.flush()
    self.n_rows += 1

  def finish(self, rows) -> str:
    """Writes predictions.csv (`rows`, input order); returns its path."""
    self._file.close()
    write_csv(self.path, rows)
    with contextlib.suppress(OSError):
      os.remove(self.partial)
    return self.path


def remove_stale_outputs(folder: str, rows) -> int:
  """Removes heatmaps / maps / masks of earlier runs that `rows` (a
  complete run's) do not name, so the folder holds one run's files; the
  count removed, logged."""
  keep = {
      os.path.normpath(r[k])
      for r in rows
      for k in ("heatmap", "map", "mask")
      if r.get(k)
  }
  removed = 0
  for sub, ext in OUTPUT_DIRS.items():
    d = os.path.join(folder, sub)
    names = os.listdir(d) if os.path.isdir(d) else []
    for n in names:
      rel = os.path.join(sub, n)
      if n.endswith(ext) and not n.startswith(".") and rel not in keep:
        with contextlib.suppress(OSError):
          os.remove(os.path.join(folder, rel))
          removed += 1
  if removed:
    logging.info(
        "removed %d heatmap/map/mask file(s) of earlier runs from %s",
        removed,
        folder,
    )
  return removed


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
