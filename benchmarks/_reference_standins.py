"""Stand-ins for what the official SoftPatch code imports but cannot get here.

For bench_end_to_end.py only. The official modules import torchvision
(transforms; models for its backbone registry), timm, matplotlib and tqdm
at module level. torchvision does not import beside the torch build the
benchmark uses, timm only serves backbones we do not use, and matplotlib
and tqdm are not needed for timing. `install` puts small replacements into
`sys.modules` before the official modules are imported; matplotlib and
tqdm are replaced only when they are missing.

The transforms follow torchvision's documented behaviour on PIL images:
Resize(int) sets the short side (the long side is truncated,
int(size * long / short)) with bilinear resampling and leaves an image of
that size untouched; CenterCrop rounds the offset like torchvision;
ToTensor scales 8-bit images to [0, 1] in CHW; Normalize is per channel.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
from PIL import Image
import torch


class Compose:

  def __init__(self, transforms):
    self.transforms = list(transforms)

  def __call__(self, x):
    for t in self.transforms:
      x = t(x)
    return x


class Resize:

  def __init__(self, size, interpolation=Image.BILINEAR):
    if not isinstance(size, int):
      raise NotImplementedError("stand-in Resize takes an int size only")
    self.size = size
    self.interpolation = interpolation

  def __call__(self, img):
    w, h = img.size
    if w <= h:
      new = (self.size, int(self.size * h / w))
    else:
      new = (int(self.size * w / h), self.size)
    if new == (w, h):
      return img
    return img.resize(new, self.interpolation)


class CenterCrop:

  def __init__(self, size):
    self.size = int(size)

  def __call__(self, img):
    w, h = img.size
    if self.size > w or self.size > h:
      raise NotImplementedError("stand-in CenterCrop does not pad")
    top = int(round((h - self.size) / 2.0))
    left = int(round((w - self.size) / 2.0))
    return img.crop((left, top, left + self.size, top + self.size))


class ToTensor:

  def __call__(self, img):
    if img.mode not in ("L", "RGB"):
      raise NotImplementedError(f"stand-in ToTensor: mode {img.mode}")
    # A writable copy: torch refuses to wrap PIL's read-only buffer.
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
      arr = arr[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return x.float().div(255.0)


class Normalize:

  def __init__(self, mean, std):
    self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

  def __call__(self, x):
    return (x - self.mean) / self.std


class _Unavailable:
  """A name the official code references but the benchmark never calls."""

  def __init__(self, name):
    self._name = name

  def __call__(self, *args, **kwargs):
    raise NotImplementedError(f"{self._name} is a benchmark stand-in")

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Unavailable(f"{self._name}.{attr}")


def _module(name, **attrs):
  mod = types.ModuleType(name)
  mod.__dict__.update(attrs)
  mod.__bench_standin__ = True
  return mod


def _tqdm(iterable=None, *args, **kwargs):
  del args, kwargs  # a pass-through: no progress bar

  class _Bar:

    def __iter__(self):
      return iter(iterable)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

  return _Bar()


def _missing(name: str) -> bool:
  try:
    importlib.import_module(name)
  except ImportError:
    return True
  return False


def install() -> list:
  """Injects the stand-ins into sys.modules; returns the names replaced."""
  transforms = _module(
      "torchvision.transforms",
      Compose=Compose,
      Resize=Resize,
      CenterCrop=CenterCrop,
      ToTensor=ToTensor,
      Normalize=Normalize,
      RandomAffine=_Unavailable("torchvision.transforms.RandomAffine"),
  )
  models = _module("torchvision.models")
  replaced = {
      "torchvision": _module(
          "torchvision", transforms=transforms, models=models
      ),
      "torchvision.transforms": transforms,
      "torchvision.models": models,
      "timm": _module("timm", create_model=_Unavailable("timm.create_model")),
  }
  if _missing("matplotlib"):
    pyplot = _module("matplotlib.pyplot")
    pyplot.__getattr__ = lambda attr: _Unavailable(f"pyplot.{attr}")
    replaced["matplotlib"] = _module("matplotlib", pyplot=pyplot)
    replaced["matplotlib.pyplot"] = pyplot
  if _missing("tqdm"):
    replaced["tqdm"] = _module("tqdm", tqdm=_tqdm)
  sys.modules.update(replaced)
  return sorted(replaced)
