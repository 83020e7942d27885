"""Deterministic augmentation of injected training copies.

The noisy training protocol (SoftPatch, Jiang et al., NeurIPS 2022;
see noise.py) adds anomalous test images to the training set. With
`NoiseOptions.augment` (or when a small pool forces repeats) each injected
copy carries a seed, and the stream transforms it with `Augment` so the copy
is not pixel-identical to the test image it came from.

Every random number is drawn from np.random.default_rng(aug_seed) in a fixed
order whatever the flags, so switching one transform on or off never changes
the others. Applied on the decoded 8-bit PIL image, before
resize/crop/normalisation. Geometry uses reflected borders so no artificial
black corners (which would look like defects) appear.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class Augment:
  """Which transforms to apply to an injected copy, and how strong.

  affine:  random translation of up to +-max_translate of the image size per
           axis, and scaling by 1 +- max_scale.
  rotate:  random rotation of up to +-max_rotate_deg degrees about the centre.
  noise:   additive Gaussian noise, std noise_std (fraction of full range 255).
  blur:    Gaussian blur, sigma (pixels) uniform in blur_sigma.
  The defaults (+-3 deg rotation, +-3 % translation) are a mild jitter that
  leaves defects recognisable.
  """

  affine: bool = True
  rotate: bool = True
  noise: bool = False
  blur: bool = False
  max_translate: float = 0.03
  max_scale: float = 0.0
  max_rotate_deg: float = 3.0
  noise_std: float = 0.02
  blur_sigma: Tuple[float, float] = (0.5, 1.5)

  def __post_init__(self):
    if not 0 <= self.max_translate < 0.5:
      raise ValueError(
          f"Augment.max_translate must be in [0, 0.5), got {self.max_translate}"
      )
    if not 0 <= self.max_scale < 1:
      raise ValueError(
          f"Augment.max_scale must be in [0, 1), got {self.max_scale}"
      )
    if self.noise_std < 0:
      raise ValueError(f"Augment.noise_std must be >= 0, got {self.noise_std}")
    lo, hi = self.blur_sigma
    if not 0 <= lo <= hi:
      raise ValueError(
          "Augment.blur_sigma must be (lo, hi) with 0 <= lo <= hi, got "
          f"{self.blur_sigma}"
      )

  def params(self, seed: int) -> dict:
    """The random draws for `seed` (all of them, regardless of the flags)."""
    rng = np.random.default_rng(seed)
    tx, ty = rng.uniform(-1.0, 1.0, size=2) * self.max_translate
    angle = rng.uniform(-1.0, 1.0) * self.max_rotate_deg
    scale = 1.0 + rng.uniform(-1.0, 1.0) * self.max_scale
    sigma = rng.uniform(*self.blur_sigma)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    return dict(
        tx=float(tx),
        ty=float(ty),
        angle=float(angle),
        scale=float(scale),
        sigma=float(sigma),
        noise_seed=noise_seed,
    )

  def apply(self, img: Image.Image, mask: Optional[Image.Image], seed: int):
    """Augment an 8-bit 'L'/'RGB' image (and its 'L' mask, geometry only)."""
    p = self.params(seed)
    x = np.asarray(img, dtype=np.float64)
    m = None if mask is None else np.asarray(mask)
    h, w = x.shape[:2]

    angle = p["angle"] if self.rotate else 0.0
    tx, ty = (p["tx"] * w, p["ty"] * h) if self.affine else (0.0, 0.0)
    scale = p["scale"] if self.affine else 1.0
    if angle != 0.0 or tx != 0.0 or ty != 0.0 or scale != 1.0:
      matrix, offset = _inverse_map(h, w, np.deg2rad(angle), scale, ty, tx)
      x = _warp(x, matrix, offset, order=1)
      if m is not None:
        m = _warp(m, matrix, offset, order=0)
    if self.blur:
      sig = (p["sigma"], p["sigma"]) + ((0.0,) if x.ndim == 3 else ())
      x = ndimage.gaussian_filter(x, sigma=sig, mode="reflect")
    if self.noise and self.noise_std > 0:
      noise_rng = np.random.default_rng(p["noise_seed"])
      x = x + noise_rng.normal(0.0, self.noise_std * 255.0, size=x.shape)
    out = Image.fromarray(
        np.clip(np.round(x), 0, 255).astype(np.uint8), mode=img.mode
    )
    out_mask = (
        None
        if m is None
        else Image.fromarray(np.asarray(m, np.uint8), mode="L")
    )
    return out, out_mask


def _inverse_map(h, w, theta, scale, dy, dx):
  """Output -> input (row, col) map of a rotation and scaling, then a shift.

  The rotation (by theta) and scaling are about the image centre.
  """
  c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  cos, sin = np.cos(theta), np.sin(theta)
  forward = scale * np.array([[cos, -sin], [sin, cos]])
  inv = np.linalg.inv(forward)
  # out = F (in - c) + c + t  =>  in = F^-1 out + (c - F^-1 (c + t))
  offset = c - inv @ (c + np.array([dy, dx]))
  return inv, offset


def _warp(a, matrix, offset, order):
  if a.ndim == 2:
    return ndimage.affine_transform(
        a, matrix, offset=offset, order=order, mode="reflect"
    )
  return np.stack(
      [
          ndimage.affine_transform(
              a[..., k], matrix, offset=offset, order=order, mode="reflect"
          )
          for k in range(a.shape[-1])
      ],
      axis=-1,
  )
