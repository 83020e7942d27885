"""Heatmap rendering with Pillow only (no plotting library needed).

`overlay` blends a colour-mapped anomaly map over the input image;
`heat_tile` does that on a figure's shared `ColorScale` and draws the
threshold contour; `tile_rows` lays rows of such tiles out in one PNG with
titles; `with_legend` adds the colour bar (and caption lines) below.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Optional, Sequence, Tuple

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


CONTOUR_COLOR = (0, 255, 0)


def _erode(m: np.ndarray) -> np.ndarray:
  p = np.pad(m, 1, mode="edge")
  return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """The pixels of a binary mask within `width` 4-neighbour steps of its
  outside (the image border continues the mask: a region is not outlined
  along the border)."""
  m = np.asarray(mask) > 0.5
  inner = m
  for _ in range(max(1, int(width))):
    inner = _erode(inner)
  return m & ~inner


def outline_width(shape) -> int:
  """Outline thickness for an image of `shape`: 2 px from 128 px up."""
  return 2 if min(shape[:2]) >= 128 else 1


def mask_outline(
    image_u8: np.ndarray, mask: np.ndarray, color=CONTOUR_COLOR, width=1
) -> np.ndarray:
  """Draws the boundary of a binary mask onto an image."""
  out = image_u8.copy()
  out[boundary(mask, width)] = color
  return out


@dataclasses.dataclass(frozen=True)
class ColorScale:
  """One colour scale shared by every map of a figure.

  vmin, vmax: the values drawn darkest / brightest (clipped beyond);
  threshold: where the contour is drawn (None: no contour); ticks: the
  values labelled under the colour bar (empty: vmin, threshold, vmax).
  """

  vmin: float
  vmax: float
  threshold: Optional[float] = None
  ticks: Tuple[float, ...] = ()

  def tick_values(self) -> Tuple[float, ...]:
    if self.ticks:
      return tuple(self.ticks)
    mid = () if self.threshold is None else (self.threshold,)
    return (self.vmin,) + mid + (self.vmax,)


def heat_tile(image_u8, amap, scale: ColorScale, alpha: float = 0.5):
  """The map over the image on the shared scale, with the contour of
  map >= scale.threshold drawn in CONTOUR_COLOR."""
  out = overlay(image_u8, amap, scale.vmin, scale.vmax, alpha)
  if scale.threshold is not None:
    mask = np.asarray(amap) >= scale.threshold
    out = mask_outline(out, mask, width=outline_width(out.shape))
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


BAR_MARGIN, BAR_TOP, BAR_HEIGHT, BAR_MAX_LEN = 8, 4, 12, 512
LINE_HEIGHT = 12  # one line of Pillow's default font
LEGEND_MIN_WIDTH = 96  # narrower images get no colour bar (no room)


def colorbar_box(width: int) -> Tuple[int, int, int, int]:
  """(x0, y0, x1, y1) of the colour bar in a legend `width` pixels wide;
  column x0 + j shows vmin + (vmax - vmin) * j / (x1 - x0 - 1)."""
  length = max(2, min(int(width) - 2 * BAR_MARGIN, BAR_MAX_LEN))
  return BAR_MARGIN, BAR_TOP, BAR_MARGIN + length, BAR_TOP + BAR_HEIGHT


def bar_column(scale: ColorScale, width: int, value: float) -> int:
  """The legend column (x) where the colour bar shows `value`."""
  x0, _, x1, _ = colorbar_box(width)
  frac = (value - scale.vmin) / max(scale.vmax - scale.vmin, 1e-12)
  return x0 + int(round(float(np.clip(frac, 0, 1)) * (x1 - x0 - 1)))


def legend(width: int, scale: ColorScale, caption: Sequence[str] = ()):
  """A white strip `width` wide: the colour bar of `scale`, its tick labels,
  the threshold marked in CONTOUR_COLOR, then the caption lines (wrapped).
  -> (H, width, 3) uint8."""
  x0, y0, x1, y1 = colorbar_box(width)
  chars = max(10, (int(width) - 2 * BAR_MARGIN) // 6)
  lines = [w for c in caption for w in textwrap.wrap(str(c), chars) or [""]]
  label_y = y1 + 4
  height = label_y + LINE_HEIGHT * (1 + len(lines)) + 4
  canvas = Image.new("RGB", (int(width), height), (255, 255, 255))
  values = np.linspace(scale.vmin, scale.vmax, x1 - x0)
  bar = np.broadcast_to(
      colorize(values[None], scale.vmin, scale.vmax),
      (
          y1 - y0,
          x1 - x0,
          3,
      ),
  )
  canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (x0, y0))
  draw = ImageDraw.Draw(canvas)
  draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=(0, 0, 0))
  for v in scale.tick_values():
    x = bar_column(scale, width, v)
    draw.line((x, y1, x, y1 + 2), fill=(0, 0, 0))
    text = f"{v:.3g}"
    tx = min(
        max(0, x - draw.textlength(text) / 2), width - draw.textlength(text)
    )
    draw.text((tx, label_y), text, fill=(0, 0, 0))
  if scale.threshold is not None:
    x = bar_column(scale, width, scale.threshold)
    draw.line((x, y0 - 2, x, y1 + 1), fill=CONTOUR_COLOR, width=1)
  for k, line in enumerate(lines):
    draw.text(
        (BAR_MARGIN, label_y + LINE_HEIGHT * (k + 1)), line, fill=(0, 0, 0)
    )
  return np.asarray(canvas)


def with_legend(image, scale: ColorScale, caption: Sequence[str] = ()):
  """The image (PIL or uint8 array) with `legend` stacked below -> PIL."""
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  strip = legend(img.width, scale, caption)
  out = Image.new("RGB", (img.width, img.height + strip.shape[0]), "white")
  out.paste(img.convert("RGB"), (0, 0))
  out.paste(Image.fromarray(strip), (0, img.height))
  return out


def reference_scale(maps, normal) -> Tuple[float, float]:
  """(median, 99th percentile) of the pixels of `maps` (N, H, W) on the
  images where `normal` is True (all images when none is)."""
  normal = np.asarray(normal, bool)
  ref = np.asarray(maps)[normal] if normal.any() else np.asarray(maps)
  lo, hi = np.percentile(ref, [50.0, 99.0])
  return float(lo), float(max(hi, lo + 1e-12))


def normalise_map(amap, ref: Tuple[float, float]) -> np.ndarray:
  """(map - median) / (p99 - median) of `reference_scale`: 0 is the median
  normal pixel, 1 the top 1 % of normal pixels."""
  lo, hi = ref
  return (np.asarray(amap, np.float64) - lo) / (hi - lo)


# The shared scale of figures whose maps went through `normalise_map`.
NORMALISED_SCALE = ColorScale(0.0, 2.0, 1.0, (0.0, 0.5, 1.0, 1.5, 2.0))


def normalised_caption(n_normal: int, masks: bool) -> Tuple[str, ...]:
  """The caption lines that explain `NORMALISED_SCALE` in a figure."""
  outline = " Mask column: the ground-truth defect outline." if masks else ""
  return (
      (
          "Colour: each method's pixel score s as (s - m) / (q - m), m and q"
          " the median and 99th percentile of that method's pixels on the"
          f" {n_normal} normal test images; one scale, 0 to 2, for every panel."
      ),
      (
          "Green contour: s = q (1.0), as high as the top 1 % of normal pixels."
          + outline
      ),
  )


def row_title(label: int, defect_type: str, name: str) -> str:
  """'normal: name', 'defective: name' or 'defective (type): name'."""
  if label == 0:
    return f"normal: {name}"
  kind = "" if defect_type in ("", "defective") else f" ({defect_type})"
  return f"defective{kind}: {name}"


def pick_rows(labels, num: int, prefer=None) -> list:
  """Indices of the rows of a heatmap figure: max(1, num // 2) normal
  (label 0) images spread evenly over the normal ones, then up to `num`
  defective ones in order, half of them (at most) where `prefer` is True."""
  labels = np.asarray(labels)
  prefer = np.zeros(len(labels), bool) if prefer is None else prefer
  normal = np.flatnonzero(labels == 0)
  n_norm = min(len(normal), max(1, num // 2))
  spread = np.linspace(0, len(normal) - 1, n_norm).round().astype(int)
  defective = [int(i) for i in np.flatnonzero(labels == 1)]
  seen = [i for i in defective if prefer[i]][: num // 2]
  rest = [i for i in defective if i not in seen][: num - len(seen)]
  return [int(i) for i in normal[spread]] + sorted(seen + rest)
