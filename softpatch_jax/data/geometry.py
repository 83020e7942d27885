"""Image geometry: torchvision-style resize and centre crop, size bounds.

Resize(int): the short side becomes `resize`, the long side
int(resize * long / short). CenterCrop: top = int(round((h - crop) / 2.0)),
left likewise; an image smaller than the crop is zero-padded first.

Sizes read from a header are as displayed: EXIF orientations 5-8 (a quarter
turn) swap width and height (`oriented_size`).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from PIL import Image

# Pixel bound of the network input (after resizing): 4.2M pixels is a
# 2048 x 2048 image, 50 MB as float32 RGB, already slow on a CPU backbone.
MAX_PIXELS = 1 << 22
# Pixel bound of an original image, from its header, before it is decoded, in
# every mode (an 8192 x 8192 image; config.data.max_pixels raises it when
# larger): a 200 KB PNG can declare 10,000 x 10,000 pixels.
MAX_SOURCE_PIXELS = 1 << 26
# Hard ceilings on the settings themselves (config and model file alike):
# the resize / crop side, and images per batch.
MAX_SIDE = 8192
MAX_BATCH = 1024
MAX_ASPECT_RATIO = 20.0
# Whole-image mode: how far an image's aspect ratio may differ (relative) from
# the network input's before resizing it would visibly distort it.
ASPECT_TOLERANCE = 0.05
# A centre crop that keeps less than this share of the image's area warns.
CROP_WARN_KEPT = 0.8
# (resized w, h, crop) already warned about, once per process.
CROP_WARNED: set = set()


# EXIF orientation (tag 274) -> the transpose that displays the image upright,
# as ImageOps.exif_transpose applies it.
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
  """The EXIF orientation of an opened (not yet decoded) image; 1 if none.

  A PNG's is read only from an eXIf chunk before its image data: asking
  Pillow for a later one would decode the whole image.
  """
  if (img.format or "").upper() == "PNG" and "exif" not in img.info:
    return 1
  try:
    value = int(img.getexif().get(0x0112, 1))
  except Exception:  # pylint: disable=broad-except
    return 1  # unreadable EXIF: shown as stored
  return value if value in EXIF_TRANSPOSE else 1


def oriented_size(img: Image.Image) -> Tuple[int, int]:
  """(w, h) of an opened image as displayed, after its EXIF orientation."""
  w, h = img.size
  return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def resized_size(size: Tuple[int, int], resize: int) -> Tuple[int, int]:
  """(w, h) after torchvision Resize(int): short side -> resize, long cut."""
  w, h = size
  short, long_ = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long_ / short)
  return (new_short, new_long) if w <= h else (new_long, new_short)


def whole_image_size(path, resize: Optional[int]) -> Tuple[int, int]:
  """The (H, W) network input of whole-image mode, from one image's header.

  The short side becomes `resize` (None: the image's own size), the long
  side keeps the aspect ratio, as Resize(int) does.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as img:  # reads the header only
      size = oriented_size(img)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"cannot read image size of {path}: {type(e).__name__}: {e}"
    ) from e
  w, h = resized_size(size, resize) if resize else size
  return int(h), int(w)


def resize_short(
    img: Image.Image, resize: Optional[int], resample=Image.BILINEAR
) -> Image.Image:
  if resize is None:
    return img
  new = resized_size(img.size, resize)
  if new == img.size:
    return img
  return img.resize(new, resample)


def center_crop(img: Image.Image, crop: Optional[int]) -> Image.Image:
  if crop is None:
    return img
  w, h = img.size
  if crop > w or crop > h:
    left = (crop - w) // 2 if crop > w else 0
    top = (crop - h) // 2 if crop > h else 0
    right = (crop - w + 1) // 2 if crop > w else 0
    bottom = (crop - h + 1) // 2 if crop > h else 0
    padded = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
    padded.paste(img, (left, top))
    img = padded
    w, h = img.size
    if (w, h) == (crop, crop):
      return img
  top = int(round((h - crop) / 2.0))
  left = int(round((w - crop) / 2.0))
  return img.crop((left, top, left + crop, top + crop))
