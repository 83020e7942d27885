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

Integer images are scaled in strips of rows with integer arithmetic
(round(v * 255 / full) has no ties for an odd `full`), so a 16-bit image
costs its own decode plus the 8-bit result, never a float64 copy of it.

Before anything is decoded the header is read: a file with more than one
page or frame (multi-page TIFF, animated GIF / PNG) is refused, and a
`check` callable, when given, sees the image's size (as displayed, after its
EXIF orientation) and may refuse it. After decoding, a PNG whose image data
holds fewer rows than its header declares is refused as truncated (Pillow
fills the missing rows with black; `ImageFile.LOAD_TRUNCATED_IMAGES` stays
off, Pillow's default, so other short files fail in Pillow itself).

EXIF orientation (tag 274, values 2-8) is applied to images and masks alike,
as `ImageOps.exif_transpose` does, in fit and in predict: every image is
scored as it is displayed. A PNG's orientation is read only from an eXIf
chunk before its image data (the header), the one place a viewer reads it.

Every failure (a missing, empty, multi-page or undecodable file) is a
ValueError naming the file.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

from softpatch_jax.data import files
from softpatch_jax.data import geometry

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _cannot(what: str, path: str, e: Exception) -> ValueError:
  # PIL raises OSError, SyntaxError, ValueError, struct.error...
  return ValueError(
      f"cannot decode {what.lower()} file {path}: {type(e).__name__}: {e}"
  )


def _check_header(img: Image.Image, path: str, what: str, check) -> None:
  """Refuses a multi-page file; `check(size)` sees the displayed size."""
  try:
    pages = int(getattr(img, "n_frames", 1))
  except Exception as e:  # pylint: disable=broad-except
    raise _cannot(what, path, e) from e
  if pages > 1:
    raise ValueError(
        f"{what.lower()} file {path} has {pages} pages (frames): only "
        "single-page images are read; save each page as its own file"
    )
  if check is not None:
    check(geometry.oriented_size(img))


def _decode(path, what: str, convert, check=None) -> Image.Image:
  """Reads the header, then fully decodes, converts and orients a file.

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
    img = Image.open(path)  # lazy: reads the header only
  except Exception as e:  # pylint: disable=broad-except
    raise _cannot(what, path, e) from e
  # The context manager closes the file even for formats (TIFF) that keep it
  # open after load(); the result is detached from it, by conversion or by
  # copy.
  with img:
    _check_header(img, path, what, check)
    orientation = geometry.orientation(img)
    try:
      # Force the full decode now: a truncated file would otherwise fail
      # later, far from its name.
      img.load()
      out = convert(img)
      out = out.copy() if out is img else out
    except Exception as e:  # pylint: disable=broad-except
      raise _cannot(what, path, e) from e
    if (img.format or "").upper() == "PNG":
      _check_png_rows(path, what)
  if orientation in geometry.EXIF_TRANSPOSE:
    out = out.transpose(geometry.EXIF_TRANSPOSE[orientation])
  return out


def _png_layout(f) -> tuple:
  """(width, height, bits per pixel, interlaced) from a PNG's IHDR."""
  head = f.read(8 + 8 + 13)
  w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:])
  channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
  return w, h, depth * channels, bool(interlace)


def _inflated_size(f) -> int:
  """Bytes the IDAT chunks inflate to, streamed 1 MiB at a time."""
  inflater = zlib.decompressobj()
  total = 0
  f.seek(8)
  while len(head := f.read(8)) == 8:
    length, kind = struct.unpack(">I4s", head)
    if kind == b"IEND":
      break
    if kind != b"IDAT":
      f.seek(length + 4, 1)
      continue
    for _ in range(0, length, 1 << 20):
      data = f.read(min(1 << 20, length))
      length -= len(data)
      while data and not inflater.eof:
        total += len(inflater.decompress(data, 1 << 20))
        data = inflater.unconsumed_tail
    f.seek(4, 1)  # the CRC
  return total


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4))
_ADAM7 += ((0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_rows(path: str, what: str) -> None:
  """Refuses a PNG whose image data is shorter than its header declares."""
  with open(path, "rb") as f:
    w, h, bpp, interlaced = _png_layout(f)
    try:
      got = _inflated_size(f)
    except zlib.error:
      return  # Pillow decoded it: damage past the image data
  row = 1 + (w * bpp + 7) // 8
  if not interlaced:
    if got < h * row:
      raise ValueError(
          f"{what.lower()} file {path} is truncated: its PNG data holds "
          f"{got // row} of the {h} rows its header declares"
      )
    return
  want = 0
  for x0, y0, dx, dy in _ADAM7:
    cols, rows = -(-max(w - x0, 0) // dx), -(-max(h - y0, 0) // dy)
    want += rows * (1 + (cols * bpp + 7) // 8) if cols else 0
  if got < want:
    raise ValueError(
        f"{what.lower()} file {path} is truncated: its interlaced PNG data "
        f"holds {got} of the {want} bytes its header declares"
    )


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


def _strips(img: Image.Image):
  """(top, rows as an array) of `img`, about 1M pixels at a time."""
  w, h = img.size
  step = max(1, (1 << 20) // max(w, 1))
  for top in range(0, h, step):
    yield top, np.asarray(img.crop((0, top, w, min(h, top + step))))


def _int_to_uint8(img: Image.Image, full: int) -> Image.Image:
  """round(max(v, 0) * 255 / full) clipped at 255, in integers by strips."""
  out = np.empty((img.size[1], img.size[0]), np.uint8)
  for top, rows in _strips(img):
    v = np.clip(rows.astype(np.int64), 0, None)
    out[top : top + len(rows)] = np.minimum((v * 510 + full) // (2 * full), 255)
  return Image.fromarray(out, mode="L")


def _float_to_uint8(img: Image.Image) -> Image.Image:
  """A float image scaled by the smallest full scale covering its maximum."""
  peaks = [
      np.fmax.reduce(r.astype(np.float64), axis=None) for _, r in _strips(img)
  ]
  hi = float(np.fmax.reduce(np.asarray(peaks))) if peaks else 1.0
  full = next((f for f in (1.0, 255.0, 65535.0) if hi <= f), hi)
  out = np.empty((img.size[1], img.size[0]), np.uint8)
  for top, rows in _strips(img):
    out[top : top + len(rows)] = _scale_to_uint8(np.nan_to_num(rows), full)
  return Image.fromarray(out, mode="L")


def to_8bit(img: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit 'L' or 'RGB' (rules in the module docstring)."""
  mode = img.mode
  if mode in ("L", "RGB"):
    return img
  if mode == "1":
    return img.convert("L")
  if mode in _SIXTEEN_BIT_MODES or mode == "I":
    return _int_to_uint8(img, 2 ** _bit_depth(img) - 1)
  if mode == "F":
    return _float_to_uint8(img)
  if mode in ("LA", "La"):
    return img.getchannel("L") if mode == "LA" else img.convert("L")
  if mode in ("RGBA", "RGBa", "RGBX"):
    return img.convert("RGB")
  if mode in ("P", "PA"):
    # Through RGBA so a palette with transparency converts without a warning.
    return img.convert("RGBA").convert("RGB")
  return img.convert("RGB")


def open_image(path, check=None) -> Image.Image:
  """Decodes an image file to an 8-bit 'L' or 'RGB' PIL image.

  `check(size)`, when given, sees the (width, height) from the header, as
  displayed, before anything is decoded, and may raise.

  Raises:
    ValueError: naming the file, when it is missing, empty, multi-page,
      truncated or undecodable.
  """
  return _decode(path, "Image", to_8bit, check)


def _binary_mask(img: Image.Image) -> Image.Image:
  arr = np.asarray(to_8bit(img))
  if arr.ndim == 3:
    arr = arr.max(axis=2)
  if arr.size and arr.max() <= 1:
    arr = arr * 255
  else:
    arr = np.where(arr >= 128, 255, 0)
  return Image.fromarray(arr.astype(np.uint8), mode="L")


def open_mask(path, check=None) -> Image.Image:
  """Decodes a mask file to a binary 0/255 'L' image (`check` as in
  `open_image`).

  Raises:
    ValueError: naming the file, when it is missing, empty, multi-page,
      truncated or undecodable.
  """
  return _decode(path, "Mask", _binary_mask, check)
