"""Decoding image and mask files into 8-bit PIL images.

Image modes are brought to 8-bit 'L' or 'RGB' before the geometry:
  * 'L', 'RGB' unchanged; '1' -> 'L'.
  * 'I;16*' (16-bit PNG/TIFF) and 'I' (32-bit int; a 16-bit PNG on older
    Pillow) are scaled by their bit depth, v * 255 / (2**bits - 1) rounded,
    never clipped at 255. The depth is the TIFF BitsPerSample tag when
    present, otherwise 16 for 'I;16*' and PNG 'I', 32 for other 'I' images.
    Negative values become 0.
  * 'F' (float TIFF): taken as [0, 1] when max <= 1, else scaled by 255, 65535
    or the image maximum, whichever is the smallest that covers the data.
  * 'RGBA' / 'LA' / 'PA': the alpha channel is dropped (colour kept as
    stored, not composited).
  * 'P' -> 'RGB' through its palette; 'CMYK', 'YCbCr', ... -> 'RGB'.

Masks (any mode) become 8-bit 'L'; a colour mask uses the max over channels.
A 0/1 mask (max == 1) is scaled to 0/255 and any other mask is binarised at
128 first, so a clean 0/255 MVTec mask passes through unchanged.

Every failure (a missing, empty or undecodable file) is a ValueError naming
the file.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from softpatch_jax.data import files

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _decode(path, what: str, convert) -> Image.Image:
  """Opens, fully decodes and converts a file.

  Any failure becomes a ValueError naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    if files.is_symlink_loop(path):
      raise ValueError(f"{what} file is a symlink loop: {path}")
    raise ValueError(f"{what} file does not exist: {path}")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{what} file is empty (0 bytes): {path}")
  try:
    # The context manager closes the file even for formats (TIFF) that keep it
    # open after load(); the result is detached from it, by conversion or by
    # copy.
    with Image.open(path) as img:
      # Force the full decode now: Image.open is lazy and a truncated file would
      # otherwise fail later, far from its name.
      img.load()
      out = convert(img)
      return out.copy() if out is img else out
  except (
      Exception
  ) as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
    raise ValueError(
        f"cannot decode {what.lower()} file {path}: {type(e).__name__}: {e}"
    ) from e


def _bit_depth(img: Image.Image) -> int:
  tags = getattr(img, "tag_v2", None)
  if tags is not None and 258 in tags:  # TIFF BitsPerSample
    bps = tags[258]
    bps = bps[0] if isinstance(bps, (tuple, list)) else bps
    if int(bps) > 8:
      return int(bps)
  if img.mode in _SIXTEEN_BIT_MODES:
    return 16
  if img.mode == "I" and (img.format or "").upper() == "PNG":
    return 16
  return 32


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
  arr = np.asarray(arr, dtype=np.float64)
  out = np.round(np.clip(arr, 0.0, None) * (255.0 / full_scale))
  return np.clip(out, 0, 255).astype(np.uint8)


def to_8bit(img: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit 'L' or 'RGB' (rules in the module docstring)."""
  mode = img.mode
  if mode in ("L", "RGB"):
    return img
  if mode == "1":
    return img.convert("L")
  if mode in _SIXTEEN_BIT_MODES or mode == "I":
    full = float(2 ** _bit_depth(img) - 1)
    return Image.fromarray(_scale_to_uint8(np.asarray(img), full), mode="L")
  if mode == "F":
    arr = np.asarray(img, dtype=np.float64)
    hi = float(np.nanmax(arr)) if arr.size else 1.0
    full = next((f for f in (1.0, 255.0, 65535.0) if hi <= f), hi)
    return Image.fromarray(_scale_to_uint8(np.nan_to_num(arr), full), mode="L")
  if mode in ("LA", "La"):
    return img.getchannel("L") if mode == "LA" else img.convert("L")
  if mode in ("RGBA", "RGBa", "RGBX"):
    return img.convert("RGB")
  if mode in ("P", "PA"):
    # Through RGBA so a palette with transparency converts without a warning.
    return img.convert("RGBA").convert("RGB")
  return img.convert("RGB")


def open_image(path) -> Image.Image:
  """Decodes an image file to an 8-bit 'L' or 'RGB' PIL image.

  Raises:
    ValueError: naming the file, when it is missing, empty or undecodable.
  """
  return _decode(path, "Image", to_8bit)


def _binary_mask(img: Image.Image) -> Image.Image:
  arr = np.asarray(to_8bit(img))
  if arr.ndim == 3:
    arr = arr.max(axis=2)
  if arr.size and arr.max() <= 1:
    arr = arr * 255
  else:
    arr = np.where(arr >= 128, 255, 0)
  return Image.fromarray(arr.astype(np.uint8), mode="L")


def open_mask(path) -> Image.Image:
  """Decodes a mask file to a binary 0/255 'L' image.

  Raises:
    ValueError: naming the file, when it is missing, empty or undecodable.
  """
  return _decode(path, "Mask", _binary_mask)
