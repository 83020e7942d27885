"""Image/mask decoding and the resize -> centre-crop -> normalise transform.

Geometry follows the reference (torchvision on PIL images):
  * Resize(int): the short side becomes `resize`, the long side
    int(resize * long / short), PIL bilinear (PIL always antialiases when
    shrinking, as torchvision does for PIL input).
  * CenterCrop: top = int(round((h - crop) / 2.0)), left likewise; an image
    smaller than the crop is zero-padded first ((crop - w) // 2 on the
    left/top, the rest right/bottom).

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
Grayscale images become 3 identical channels when `grayscale_to_rgb` is True.

Whole-image mode (crop None, `input_size` set): every image is resized to
the one network input size (H, W), which keeps its aspect ratio when the image
has the training images' shape (within `ASPECT_TOLERANCE`, else a ValueError);
nothing is cropped, so the patch grid is rectangular for elongated parts.

Bounds on untrusted images (`max_pixels`, `max_aspect_ratio`): a file whose
network-input size after resizing would exceed `max_pixels`, or whose aspect
ratio exceeds `max_aspect_ratio`, is refused with a ValueError naming it and
its size before anything is resized: a 1x20000 PNG is 121 bytes but resizing
its short side to 256 would allocate 256 x 5.12M pixels. A centre crop that
keeps less than 80 % of an image's area is logged once per image size.

Masks (any mode) become 8-bit 'L'; a colour mask uses the max over channels.
A 0/1 mask (max == 1) is scaled to 0/255 and any other mask is binarised at
128 first, so a clean 0/255 MVTec mask passes through unchanged. After the
same resize (bilinear) + crop as the image, a pixel is defective only where
the resized mask is exactly 255 -- the reference's rule (ToTensor then int
cast), which counts interpolated edge values as normal.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image

from softpatch_jax.data import _files
from softpatch_jax.data import geometry
from softpatch_jax.data.augment import Augment
from softpatch_jax.data.geometry import ASPECT_TOLERANCE
from softpatch_jax.data.geometry import center_crop
from softpatch_jax.data.geometry import CROP_WARN_KEPT
from softpatch_jax.data.geometry import MAX_ASPECT_RATIO
from softpatch_jax.data.geometry import MAX_PIXELS
from softpatch_jax.data.geometry import resize_short
from softpatch_jax.data.geometry import resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _decode(path, what: str, convert) -> Image.Image:
  """Opens, fully decodes and converts a file.

  Any failure becomes a ValueError naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    if _files.is_symlink_loop(path):
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


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Resize short side, centre crop, [0, 1] float32, (x - mean) / std; NHWC.

  resize / crop may be None to skip that step (then all images in a batch must
  already share one size); crop 0 means None. With crop None and
  `input_size` (H, W) set, every image is resized to that size: whole-image
  mode (module docstring). With grayscale_to_rgb=False every image is returned
  as one luminance channel (colour images are converted with PIL's 'L'
  formula) and the mean/std are averaged over the channels given.
  `max_pixels` and `max_aspect_ratio` bound what an image may cost
  (`check_size`).
  """

  resize: Optional[int] = 256
  crop: Optional[int] = 224
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  grayscale_to_rgb: bool = True
  input_size: Optional[Tuple[int, int]] = None
  max_pixels: int = MAX_PIXELS
  max_aspect_ratio: float = MAX_ASPECT_RATIO

  def __post_init__(self):
    if isinstance(self.crop, (int, np.integer)) and self.crop == 0:
      object.__setattr__(self, "crop", None)
    for name in ("resize", "crop"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
        raise ValueError(
            f"Preprocess.{name} must be a positive int or None, got {v!r}"
        )
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
      raise ValueError(
          "Preprocess mean/std need 1 or 3 values each, got "
          f"{self.mean} / {self.std}"
      )
    if any(s <= 0 for s in self.std):
      raise ValueError(f"Preprocess std must be positive, got {self.std}")
    mp = self.max_pixels
    if not isinstance(mp, (int, np.integer)) or mp < 1:
      raise ValueError(f"max_pixels must be a positive int, got {mp!r}")
    ar = self.max_aspect_ratio
    if not isinstance(ar, (int, float)) or not 1.0 <= float(ar) < 1e6:
      raise ValueError(f"max_aspect_ratio must be a number >= 1, got {ar!r}")
    if self.input_size is not None:
      size = self.input_size
      if (
          self.crop is not None
          or len(size) != 2
          or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)
      ):
        raise ValueError(
            "Preprocess.input_size must be two positive ints (H, W), and "
            f"only with crop None (whole-image mode); got {size!r} with crop "
            f"{self.crop!r}"
        )
      object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
      if size[0] * size[1] > mp:
        raise ValueError(
            f"input_size {size[0]}x{size[1]} has {size[0] * size[1]} pixels,"
            f" beyond max_pixels={mp}"
        )

  @property
  def whole_image(self) -> bool:
    return self.crop is None and self.input_size is not None

  def check_size(self, size, path) -> None:
    """Refuses an image of `size` (w, h) before it is resized (see module).

    Raises:
      ValueError: naming `path` and its size.
    """
    w, h = (int(v) for v in size)
    what = f"image {os.fspath(path)} ({w}x{h} pixels, width x height)"
    aspect = max(w, h) / max(min(w, h), 1)
    if aspect > self.max_aspect_ratio:
      raise ValueError(
          f"{what} has aspect ratio {aspect:.1f}, beyond the limit "
          f"{self.max_aspect_ratio:g} (config.data.max_aspect_ratio)"
      )
    if self.whole_image:
      hh, ww = self.input_size
      if abs((w / h) / (ww / hh) - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"{what} does not have the shape of the model input {ww}x{hh}: "
            "whole-image mode (crop 0) resizes every image to that one "
            "size, and this one would be distorted; give images of one "
            "shape, or use a centre crop (config.data.crop)"
        )
      return
    rw, rh = resized_size((w, h), self.resize) if self.resize else (w, h)
    if rw * rh > self.max_pixels:
      raise ValueError(
          f"{what} would be resized to {rw}x{rh} = {rw * rh} pixels, beyond "
          f"the limit {self.max_pixels} (config.data.max_pixels)"
      )
    if (
        self.crop is not None
        and (rw, rh, self.crop) not in geometry.CROP_WARNED
    ):
      kept = min(self.crop, rw) * min(self.crop, rh) / (rw * rh)
      if kept < CROP_WARN_KEPT:
        geometry.CROP_WARNED.add((rw, rh, self.crop))
        logging.warning(
            "the %dx%d centre crop of %s resized to %dx%d keeps %.0f%% of "
            "its area: defects outside the crop are never seen. Set "
            "config.data.crop=0 to inspect whole images.",
            self.crop,
            self.crop,
            os.fspath(path),
            rw,
            rh,
            100.0 * kept,
        )

  @property
  def channels(self) -> int:
    return 3 if self.grayscale_to_rgb else 1

  def geometry(self, img: Image.Image) -> Image.Image:
    """Resize (bilinear) + centre crop, on a PIL image."""
    if self.input_size is not None:
      hh, ww = self.input_size
      return (
          img if img.size == (ww, hh) else img.resize((ww, hh), Image.BILINEAR)
      )
    return center_crop(resize_short(img, self.resize), self.crop)

  def _stats(self):
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    if self.channels == 1:
      mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    elif mean.size == 1:
      mean, std = np.repeat(mean, 3), np.repeat(std, 3)
    return mean, std

  def image_array(self, img: Image.Image) -> np.ndarray:
    """8-bit PIL image -> normalised float32 (H, W, C)."""
    img = to_8bit(img)
    if not self.grayscale_to_rgb and img.mode != "L":
      img = img.convert("L")
    x = np.asarray(self.geometry(img), dtype=np.float32) / np.float32(255.0)
    if x.ndim == 2:
      x = x[..., None]
    if self.grayscale_to_rgb and x.shape[-1] == 1:
      x = np.repeat(x, 3, axis=-1)
    mean, std = self._stats()
    return ((x - mean) / std).astype(np.float32)

  def mask_array(self, mask: Image.Image) -> np.ndarray:
    """0/255 'L' PIL mask -> float32 (H, W) in {0, 1}, resized value == 255."""
    m = np.asarray(self.geometry(mask))
    return (m == 255).astype(np.float32)

  def denormalize(self, x: np.ndarray) -> np.ndarray:
    """Inverse of the normalisation: back to [0, 1] (for visualisation)."""
    mean, std = self._stats()
    return np.clip(np.asarray(x, np.float32) * std + mean, 0.0, 1.0)

  def load_sample(self, sample, with_mask: bool = True, augment=None):
    """Decode one Sample -> (image (H, W, C), mask (H, W) or None).

    The mask must have the image's size (ValueError naming both otherwise). A
    sample without a mask gets zeros. When sample.aug_seed is set, `augment`
    (default Augment()) is applied to image and mask alike before the
    geometry.
    """
    img = open_image(sample.path)
    self.check_size(img.size, sample.path)
    mask = None
    if with_mask:
      if sample.mask_path is not None:
        mask = open_mask(sample.mask_path)
        if mask.size != img.size:
          raise ValueError(
              f"mask {sample.mask_path} has size "
              f"{mask.size[0]}x{mask.size[1]} but image {sample.path} has "
              f"size {img.size[0]}x{img.size[1]} (width x height)"
          )
      else:
        mask = Image.new("L", img.size, 0)
    if sample.aug_seed is not None:
      img, mask = (augment if augment is not None else Augment()).apply(
          img, mask, sample.aug_seed
      )
    x = self.image_array(img)
    m = self.mask_array(mask) if mask is not None else None
    return x, m
