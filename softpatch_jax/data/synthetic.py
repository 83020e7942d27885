"""Procedural MVTec-layout data sets for tests and smoke runs.

Each category gets one texture family (stripes, grid or smooth noise, by its
position in `categories`) with per-image jitter of phase, angle, period,
brightness and noise so normal images differ. Defects are drawn with PIL (no
antialiasing), so masks are exactly 0/255 and the image is changed only
where the mask is 255:
  scratch: a thick dark polyline;
  blob:    a filled ellipse in the complementary colour;
  spot:    several small saturated colour discs.
Defects lie inside the central region so a 256 -> 224 centre crop keeps them.

`SyntheticOptions.difficulty` d in [0, 1] makes the task harder: defect
pixels move only 1 - 0.9 d of the way from the texture to the defect colour
(so they keep the texture beneath), defects shrink by up to half (scratches
thin to 1-2 px), and the per-image jitter of the normal textures grows by
1 + 2 d. d = 0 is the original generator, bit for bit (same random draws).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from softpatch_jax import io_utils
from softpatch_jax.data.types import SyntheticOptions

DEFECT_TYPES = ("scratch", "blob", "spot")
# The defect types `ensure_generated` writes.
DEFAULT_DEFECTS = ("scratch", "blob")
_KINDS = ("stripes", "grid", "noise")


def _save_png(arr: np.ndarray, path: str) -> None:
  io_utils.save_image(path, Image.fromarray(arr))  # atomic: temp file + rename


def _smooth(rng, size: int, cells: int) -> np.ndarray:
  low = rng.random((cells, cells)).astype(np.float32)
  return np.asarray(
      Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC)
  )


def _texture(
    kind: str, base: dict, rng, size: int, spread: float = 1.0
) -> np.ndarray:
  """float (size, size, 3) in [0, 1]; `spread` scales the per-image jitter."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  angle = base["angle"] + rng.normal(0, 0.05 * spread)
  period = base["period"] * (1 + rng.normal(0, 0.03 * spread))
  phase = rng.uniform(0, 2 * np.pi)
  u = xx * np.cos(angle) + yy * np.sin(angle)
  if kind == "stripes":
    pattern = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase)
  elif kind == "grid":
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    a = np.abs(np.sin(np.pi * u / period + phase))
    b = np.abs(np.sin(np.pi * v / period + phase * 0.7))
    pattern = np.minimum(a, b) ** 0.3
  else:
    pattern = _smooth(rng, size, base["cells"])
  pattern = 0.75 * pattern + 0.25 * _smooth(rng, size, 6)
  shade = 0.55 + 0.4 * pattern
  img = (
      shade[..., None]
      * base["colour"][None, None, :]
      * (1 + rng.normal(0, 0.03 * spread))
  )
  img = img + rng.normal(0, 0.015 * spread, size=img.shape)
  return np.clip(img, 0, 1)


def _point(rng, size: int, lo: float = 0.3):
  return tuple(
      float(v) for v in rng.uniform(lo * size, (1 - lo) * size, size=2)
  )


def _defect(kind: str, img: np.ndarray, base: dict, rng, size: int, d=0.0):
  """(image with a `kind` defect, its bool mask); `d` is the difficulty."""
  shrink = 1.0 - 0.5 * d
  mask_img = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(mask_img)
  if kind == "scratch":
    n_pts = int(rng.integers(2, 4))
    for _ in range(
        100
    ):  # redraw until the scratch is long enough to be obvious
      pts = [_point(rng, size) for _ in range(n_pts)]
      if (
          sum(np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(pts, pts[1:]))
          >= 0.25 * size
      ):
        break
    width = max(3, size // 28)
    draw.line(pts, fill=255, width=max(1, round(width * (1.0 - 0.6 * d))))
    colour = base["colour"] * 0.12
  elif kind == "blob":
    cx, cy = _point(rng, size, 0.35)
    rx, ry = rng.uniform(size / 14, size / 8, size=2) * shrink
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    colour = 1.0 - base["colour"] * 0.8
  elif kind == "spot":
    for _ in range(int(rng.integers(3, 6))):
      cx, cy = _point(rng, size, 0.35)
      r = (rng.uniform(size / 40, size / 20) + 1.5) * shrink
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    colour = (
        np.array([1.0, 0.1, 0.9])
        if base["colour"][1] > 0.4
        else np.array([0.1, 1.0, 0.2])
    )
  else:
    raise ValueError(
        f"unknown synthetic defect type {kind!r}; choose from {DEFECT_TYPES}"
    )
  mask = np.asarray(mask_img) == 255
  if (
      not mask.any()
  ):  # degenerate draw (cannot happen with the sizes above, but be safe)
    mask[size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2] = True
  out = img.copy()
  texture = 0.9 + 0.1 * rng.random(size=(size, size, 1))
  target = colour[None, :] * texture[mask]
  if d > 0:  # a partial step keeps the texture beneath: a faint defect
    target = img[mask] + (1.0 - 0.9 * d) * (target - img[mask])
  out[mask] = np.clip(target, 0, 1)
  return out, mask


def make_mvtec_like(
    root,
    categories: Sequence[str] = ("synth",),
    *,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    size: int,
    seed: int,
    defect_types: Sequence[str] = DEFAULT_DEFECTS,
) -> str:
  """Writes an MVTec-like data set of PNGs under `root`.

  The layout is <root>/<cat>/{train/good, test/good, test/<type>,
  ground_truth/<type>}. n_train / n_test_good images per category,
  n_test_defect per defect type; size x size pixels (>= 32). Masks are 0/255
  'L' PNGs named <stem>_mask.png. Deterministic for a given seed. Returns
  root.

  Raises:
    ValueError: a count below 0, a size below 32, an unknown defect type.
  """
  spec = SyntheticOptions(
      n_train=n_train,
      n_test_good=n_test_good,
      n_test_defect=n_test_defect,
      size=size,
      seed=seed,
  )
  return generate(root, categories, spec, defect_types)


def generate(
    root,
    categories: Sequence[str],
    spec: SyntheticOptions,
    defect_types: Sequence[str] = DEFAULT_DEFECTS,
) -> str:
  """`make_mvtec_like` with the sizes (and difficulty) in `spec`."""
  if spec.size < 32:
    raise ValueError(f"synthetic image size must be >= 32, got {spec.size}")
  for d in defect_types:
    if d not in DEFECT_TYPES:
      raise ValueError(
          f"unknown synthetic defect type {d!r}; choose from {DEFECT_TYPES}"
      )
  for ci, cat in enumerate(categories):
    _write_category(os.path.join(os.fspath(root), cat), ci, spec, defect_types)
  return os.fspath(root)


def _write_category(cat_dir, index, spec, defect_types) -> None:
  """The images of the `index`-th category, in <cat_dir>."""
  size = spec.size
  rng = np.random.default_rng([spec.seed, index])
  base = dict(
      colour=rng.uniform(0.35, 0.9, size=3),
      angle=rng.uniform(0, np.pi),
      period=rng.uniform(0.08, 0.16),
      cells=int(rng.integers(4, 9)),
  )
  kind = _KINDS[index % len(_KINDS)]
  spread = 1.0 + 2.0 * spec.difficulty

  def write(folder, n):
    d = os.path.join(cat_dir, folder)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
      img = _texture(kind, base, rng, size, spread)
      _save_png(
          (img * 255).round().astype(np.uint8), os.path.join(d, f"{i:03d}.png")
      )

  write(os.path.join("train", "good"), spec.n_train)
  write(os.path.join("test", "good"), spec.n_test_good)
  for dt in defect_types:
    d = os.path.join(cat_dir, "test", dt)
    g = os.path.join(cat_dir, "ground_truth", dt)
    os.makedirs(d, exist_ok=True)
    os.makedirs(g, exist_ok=True)
    for i in range(spec.n_test_defect):
      normal = _texture(kind, base, rng, size, spread)
      img, mask = _defect(dt, normal, base, rng, size, spec.difficulty)
      _save_png(
          (img * 255).round().astype(np.uint8), os.path.join(d, f"{i:03d}.png")
      )
      _save_png(
          np.where(mask, 255, 0).astype(np.uint8),
          os.path.join(g, f"{i:03d}_mask.png"),
      )


def ensure_generated(
    workdir, categories: Sequence[str], spec: SyntheticOptions
) -> str:
  """Generates the data into <workdir>/synthetic_data once per parameter set.

  The parameters are recorded beside the data in params.json; a call with the
  same parameters reuses the data. Other parameters (or an interrupted
  generation, which leaves no record) mean a fresh generation into a temporary
  folder in `workdir` that then replaces the old one, so the folder never holds
  a mix of two parameter sets.

  Args:
    workdir: an existing, writable folder.
    categories: the category names (see `make_mvtec_like`).
    spec: the image counts, size, seed and difficulty
      (`DataOptions.synthetic`).

  Returns:
    The data root, <workdir>/synthetic_data.
  """
  root = os.path.join(os.fspath(workdir), "synthetic_data")
  params = dict(
      categories=list(categories),
      n_train=spec.n_train,
      n_test_good=spec.n_test_good,
      n_test_defect=spec.n_test_defect,
      size=spec.size,
      seed=spec.seed,
  )
  if spec.difficulty:  # absent at 0, so the records of old data still match
    params["difficulty"] = spec.difficulty
  record = os.path.join(root, "params.json")
  try:
    with open(record, encoding="utf-8") as f:
      if json.load(f) == params:
        return root
  except (OSError, ValueError):
    pass
  with io_utils.atomic_dir(root) as tmp:
    generate(tmp, tuple(categories), spec)
    io_utils.write_json(os.path.join(tmp, "params.json"), params)
  return root
