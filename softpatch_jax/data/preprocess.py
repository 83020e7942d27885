"""The resize -> centre-crop -> normalise transform of images and masks.

Geometry follows the reference (torchvision on PIL images):
  * Resize(int): the short side becomes `resize`, the long side
    int(resize * long / short), PIL bilinear (PIL always antialiases when
    shrinking, as torchvision does for PIL input).
  * CenterCrop: top = int(round((h - crop) / 2.0)), left likewise; an image
    smaller than the crop is zero-padded first ((crop - w) // 2 on the
    left/top, the rest right/bottom).

Images are decoded to 8-bit 'L' or 'RGB' first (decode.py).
Grayscale images become 3 identical channels when `grayscale_to_rgb` is True.

Whole-image mode (crop None, `input_size` set): every image is resized to
the one network input size (H, W), which keeps its aspect ratio when the image
has the training images' shape (within `ASPECT_TOLERANCE`, else a ValueError);
nothing is cropped, so the patch grid is rectangular for elongated parts.

Bounds on untrusted images (`max_pixels`, `max_aspect_ratio`): a file whose
network-input size after resizing would exceed `max_pixels`, or whose aspect
ratio exceeds `max_aspect_ratio`, is refused with a ValueError naming it and
its size before anything is decoded (from the file's header): a 1x20000 PNG
is 121 bytes but resizing its short side to 256 would allocate 256 x 5.12M
pixels. In every mode, whole-image mode included, the original image's own
pixel count is bounded too, by the larger of `MAX_SOURCE_PIXELS` (8192 x
8192) and `max_pixels`: a 245 KB PNG can declare 14,000 x 5,600 pixels. A centre crop that
keeps less than 80 % of an image's area is logged once per image size.

Masks are decoded to 0/255 'L' images (decode.py). After the same resize
(bilinear) + crop as the image, a pixel is defective only where the resized
mask is exactly 255 -- the reference's rule (ToTensor then int cast), which
counts interpolated edge values as normal.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image

from softpatch_jax.data import geometry
from softpatch_jax.data.augment import Augment
from softpatch_jax.data.decode import open_image
from softpatch_jax.data.decode import open_mask
from softpatch_jax.data.decode import to_8bit
from softpatch_jax.data.geometry import ASPECT_TOLERANCE
from softpatch_jax.data.geometry import center_crop
from softpatch_jax.data.geometry import CROP_WARN_KEPT
from softpatch_jax.data.geometry import MAX_ASPECT_RATIO
from softpatch_jax.data.geometry import MAX_PIXELS
from softpatch_jax.data.geometry import MAX_SOURCE_PIXELS
from softpatch_jax.data.geometry import resize_short
from softpatch_jax.data.geometry import resized_size
from softpatch_jax.data.geometry import whole_image_size
from softpatch_jax.data.types import DataOptions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Refuses an image of `size` (w, h) before it is decoded (see module).

    Raises:
      ValueError: naming `path` and its size.
    """
    w, h = (int(v) for v in size)
    what = f"image {os.fspath(path)} ({w}x{h} pixels, width x height)"
    limit = max(MAX_SOURCE_PIXELS, int(self.max_pixels))
    if w * h > limit:
      raise ValueError(
          f"{what} has {w * h} pixels, beyond the limit {limit} on an "
          f"original image (the larger of {MAX_SOURCE_PIXELS} and "
          "config.data.max_pixels)"
      )
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
    if self.crop is not None:
      _warn_crop(rw, rh, self.crop, path)

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
    # Sizes are checked from the headers, before anything is decoded.
    img = open_image(
        sample.path, functools.partial(self.check_size, path=sample.path)
    )
    mask = None
    if with_mask:
      if sample.mask_path is not None:
        same = functools.partial(_same_size, image_size=img.size, sample=sample)
        mask = open_mask(sample.mask_path, same)
      else:
        mask = Image.new("L", img.size, 0)
    if sample.aug_seed is not None:
      img, mask = (augment if augment is not None else Augment()).apply(
          img, mask, sample.aug_seed
      )
    x = self.image_array(img)
    m = self.mask_array(mask) if mask is not None else None
    return x, m

  def to_record(self) -> dict:
    """The preprocessing as stored in a saved model (JSON types)."""
    return {
        "resize": self.resize,
        "crop": self.crop,
        "mean": list(self.mean),
        "std": list(self.std),
        "grayscale_to_rgb": bool(self.grayscale_to_rgb),
        "input_size": list(self.input_size) if self.input_size else None,
        "max_pixels": int(self.max_pixels),
        "max_aspect_ratio": float(self.max_aspect_ratio),
    }

  @classmethod
  def from_record(cls, record) -> "Preprocess":
    """Inverse of `to_record`; records written before the size bounds (and
    grayscale_to_rgb) existed get the values those models were made with."""
    size = record.get("input_size")
    return cls(
        resize=record["resize"],
        crop=record["crop"],
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
        grayscale_to_rgb=bool(record.get("grayscale_to_rgb", True)),
        input_size=tuple(size) if size else None,
        max_pixels=int(record.get("max_pixels", MAX_PIXELS)),
        max_aspect_ratio=float(
            record.get("max_aspect_ratio", MAX_ASPECT_RATIO)
        ),
    )


def _warn_crop(rw: int, rh: int, crop: int, path) -> None:
  """Logs once per size when a centre crop keeps < CROP_WARN_KEPT."""
  if (rw, rh, crop) in geometry.CROP_WARNED:
    return
  kept = min(crop, rw) * min(crop, rh) / (rw * rh)
  if kept < CROP_WARN_KEPT:
    geometry.CROP_WARNED.add((rw, rh, crop))
    logging.warning(
        "the %dx%d centre crop of %s resized to %dx%d keeps %.0f%% of "
        "its area: defects outside the crop are never seen. Set "
        "config.data.crop=0 to inspect whole images.",
        crop,
        crop,
        os.fspath(path),
        rw,
        rh,
        100.0 * kept,
    )


def _same_size(mask_size, image_size, sample) -> None:
  """Refuses a mask whose (header) size is not its image's."""
  if tuple(mask_size) != tuple(image_size):
    raise ValueError(
        f"mask {sample.mask_path} has size "
        f"{mask_size[0]}x{mask_size[1]} but image {sample.path} has "
        f"size {image_size[0]}x{image_size[1]} (width x height)"
    )


def preprocess_for(data: DataOptions, mean, std, train=()) -> Preprocess:
  """The preprocessing of `data` with a backbone's normalisation mean/std.

  In whole-image mode (data.crop 0) the network input size follows the first
  training image's shape, so `train` (Samples) must be given.

  Raises:
    ValueError: whole-image mode without training images.
  """
  input_size = None
  if not data.crop:
    if not train:
      raise ValueError(
          "whole-image mode (config.data.crop=0) takes its input size from "
          "the training images, and there are none"
      )
    input_size = whole_image_size(train[0].path, data.resize or None)
  return Preprocess(
      resize=data.resize or None,
      crop=data.crop or None,
      mean=tuple(mean),
      std=tuple(std),
      input_size=input_size,
      max_pixels=data.max_pixels,
      max_aspect_ratio=data.max_aspect_ratio,
  )
