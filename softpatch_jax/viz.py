"""Heatmap rendering with Pillow only (no plotting library needed).

`overlay` blends a colour-mapped anomaly map over the input image;
`tile_rows` lays rows of such tiles out in one PNG with titles.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Anchor points of a perceptual "inferno"-like map, interpolated to 256 steps.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    np.float64,
)


def _lut() -> np.ndarray:
  x = np.linspace(0, 1, len(_ANCHORS))
  t = np.linspace(0, 1, 256)
  return np.stack(
      [np.interp(t, x, _ANCHORS[:, c]) for c in range(3)], -1
  ).astype(np.uint8)


LUT = _lut()


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """(H, W) float -> (H, W, 3) uint8 via the colour table."""
  scale = max(vmax - vmin, 1e-12)
  idx = np.clip((np.asarray(amap, np.float64) - vmin) / scale, 0, 1)
  return LUT[(idx * 255).astype(np.int64)]


def to_uint8_image(image: np.ndarray, mean=None, std=None) -> np.ndarray:
  """Undoes the normalisation of a network input for display."""
  img = np.asarray(image, np.float32)
  if mean is not None and std is not None:
    img = img * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def overlay(
    image_u8: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
  heat = colorize(amap, vmin, vmax).astype(np.float32)
  out = (1 - alpha) * image_u8.astype(np.float32) + alpha * heat
  return out.round().astype(np.uint8)


def mask_outline(
    image_u8: np.ndarray, mask: np.ndarray, color=(0, 255, 0)
) -> np.ndarray:
  """Draws the boundary of a binary mask onto an image."""
  m = np.asarray(mask) > 0.5
  edge = m & ~(
      np.roll(m, 1, 0)
      & np.roll(m, -1, 0)
      & np.roll(m, 1, 1)
      & np.roll(m, -1, 1)
  )
  out = image_u8.copy()
  out[edge] = color
  return out


def tile_rows(
    rows: Sequence[Sequence[np.ndarray]],
    row_titles: Optional[Sequence[str]] = None,
    col_titles: Optional[Sequence[str]] = None,
) -> Image.Image:
  """Lays out rows of equally sized uint8 RGB tiles with titles."""
  if not rows or not rows[0]:
    raise ValueError("tile_rows needs at least one tile")
  h, w = rows[0][0].shape[:2]
  pad, th = 4, 14
  ncol = max(len(r) for r in rows)
  top = th if col_titles else 0
  canvas = Image.new(
      "RGB",
      (ncol * (w + pad) + pad, top + len(rows) * (h + pad + th) + pad),
      (255, 255, 255),
  )
  draw = ImageDraw.Draw(canvas)
  if col_titles:
    for c, t in enumerate(col_titles):
      draw.text(
          (pad + c * (w + pad), 2), str(t)[: max(8, w // 6)], fill=(0, 0, 0)
      )
  for r, tiles in enumerate(rows):
    y = top + pad + r * (h + pad + th)
    if row_titles is not None:
      draw.text((pad, y), str(row_titles[r])[:100], fill=(0, 0, 0))
    for c, tile in enumerate(tiles):
      canvas.paste(
          Image.fromarray(np.asarray(tile, np.uint8)),
          (pad + c * (w + pad), y + th),
      )
  return canvas
