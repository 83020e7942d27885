"""A fitted model as an in-memory detector: images in, scores and maps out.

    from softpatch_jax.detector import Detector
    det = Detector.load("out/model.softpatch")   # or Detector.from_fit(model)
    (r,) = det("cell.png")                        # or arrays, PIL images
    r.score, r.score_norm, r.anomalous, r.map, r.map_norm

Inputs (`Detector.__call__`): one image or a list of them, each a path, a
PIL image or a numpy array; a 4-d array is a batch (B, H, W, C).

  * Paths are decoded exactly as the predict command and fit decode files
    (`data.open_image`: 8-bit 'L' or 'RGB').
  * Arrays are 8-bit images at their own size: (H, W) or (H, W, 1)
    grayscale, (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped). uint8 values
    are pixel values; float arrays must be on the same 0..255 scale (a float
    array in [0, 1] is refused, not guessed) and are rounded to 8 bits, as a
    PNG of them would be. An array read from a PNG therefore scores exactly
    like the PNG's path.
  * PIL images go through the same 8-bit conversion as decoded files.
Every image is then resized / cropped by the model's `data.Preprocess`
(PIL, on the host, as for files), so any input size is accepted.

Outputs: one `Result` per image: the raw score, the normalised score in
[0, 1] (`calibration`: 0.5 is the decision threshold), the decision
(score >= threshold), and the anomaly map raw and normalised, both at the
network input size (`input_map`) and at the input's own size (`map`,
`map_norm`). In whole-image mode (crop 0) the own-size map is the network
map resized back (bilinear); with a centre crop it is the crop's map placed
where the crop lies in the image, NaN outside it (never inspected).

Every image reaches the network at the one input size in batches padded to
the batch size, so the backbone and the bank search compile once per model
(jax caches them by shape) whatever the input sizes. Nothing is written.
`Detector.forward_fn()`: the network side as one pure, jittable function.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

from softpatch_jax import calibration as calibration_lib
from softpatch_jax import data
from softpatch_jax import features
from softpatch_jax import methods
from softpatch_jax import model_io
from softpatch_jax import model_scoring
from softpatch_jax import pixel_maps
from softpatch_jax import thresholds as thresholds_lib
from softpatch_jax.data import decode as decode_lib
from softpatch_jax.data import geometry


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
  """What the detector says about one image.

  score: the raw score (max weighted patch distance); score_norm: it in
  [0, 1], 0.5 at the threshold (None: the model has no image threshold);
  anomalous: score >= threshold (None without a threshold); input_map: the
  raw (H, W) map at the network input size; size: the input's (h, w);
  `map` / `map_norm`: the map at the input's own size, raw and normalised
  (map_norm None without a pixel threshold); `input_map_norm` likewise.
  """

  score: float
  score_norm: Optional[float]
  anomalous: Optional[bool]
  input_map: np.ndarray
  size: Tuple[int, int]
  pre: data.Preprocess = dataclasses.field(repr=False)
  pixel_map: Optional[calibration_lib.ScoreMap] = dataclasses.field(
      default=None, repr=False
  )

  @property
  def decision(self) -> str:
    """'anomalous', 'normal' or 'n/a' (no threshold), as predict writes."""
    if self.anomalous is None:
      return "n/a"
    return "anomalous" if self.anomalous else "normal"

  @functools.cached_property
  def map(self) -> np.ndarray:
    """(h, w) float32 raw map at the input's own size (module docstring)."""
    return input_size_map(self.input_map, self.pre, self.size)

  @functools.cached_property
  def map_norm(self) -> Optional[np.ndarray]:
    return normalised(self.pixel_map, self.map)

  @functools.cached_property
  def input_map_norm(self) -> Optional[np.ndarray]:
    return normalised(self.pixel_map, self.input_map)


def normalised(score_map, x) -> Optional[np.ndarray]:
  """`calibration.normalise` as numpy; None without a score map."""
  if score_map is None:
    return None
  return np.asarray(calibration_lib.normalise(score_map, x))


def resize_map(amap, size) -> np.ndarray:
  """Bilinear (PIL) resize of a float (H, W) map to `size` (h, w)."""
  h, w = (int(v) for v in size)
  if amap.shape == (h, w):
    return np.asarray(amap, np.float32)
  img = Image.fromarray(np.asarray(amap, np.float32), mode="F")
  return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)


def _crop_axis(length: int, resized: int, crop: int):
  """(map slice, original slice) of one axis of a centre-cropped image."""
  if resized >= crop:
    off = int(round((resized - crop) / 2.0))
    m0, m1, r0, r1 = 0, crop, off, off + crop
  else:  # zero-padded before the crop: the whole image lies inside
    pad = (crop - resized) // 2
    m0, m1, r0, r1 = pad, pad + resized, 0, resized
  scale = length / resized
  o0 = min(length - 1, int(round(r0 * scale)))
  o1 = max(o0 + 1, min(length, int(round(r1 * scale))))
  return slice(m0, m1), slice(o0, o1)


def input_size_map(amap, pre: data.Preprocess, size) -> np.ndarray:
  """A network-size map at an input image's own size `size` (h, w).

  Whole-image mode: resized back. Resize + centre crop: the crop's part of
  the map resized onto the region of the image it came from, NaN elsewhere.
  """
  h, w = (int(v) for v in size)
  amap = np.asarray(amap, np.float32)
  if pre.crop is None:
    return resize_map(amap, (h, w))
  rw, rh = geometry.resized_size((w, h), pre.resize) if pre.resize else (w, h)
  mrow, orow = _crop_axis(h, rh, pre.crop)
  mcol, ocol = _crop_axis(w, rw, pre.crop)
  out = np.full((h, w), np.nan, np.float32)
  part = amap[mrow, mcol]
  out[orow, ocol] = resize_map(
      part, (orow.stop - orow.start, ocol.stop - ocol.start)
  )
  return out


def _array_image(x: np.ndarray, what: str) -> Image.Image:
  """An (H, W[, C]) uint8 / 0..255 float array -> an 8-bit PIL image."""
  x = np.asarray(x)
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_:
      raise ValueError(f"{what}: expected uint8 or float pixels, got {x.dtype}")
    xf = x.astype(np.float64)
    if not np.all(np.isfinite(xf)) or xf.min() < 0 or xf.max() > 255:
      raise ValueError(f"{what}: pixel values must be finite, in [0, 255]")
    if 0 < xf.max() <= 1.0:
      raise ValueError(
          f"{what}: float pixels look like [0, 1] (max {xf.max():g}); pass "
          "them on the 0..255 scale (x * 255) or as uint8"
      )
    x = np.rint(xf).astype(np.uint8)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  modes = {2: "L", 3: "RGB", 4: "RGBA"}
  chans = 2 if x.ndim == 2 else x.shape[-1] if x.ndim == 3 else 0
  if chans not in modes or min(x.shape[:2]) < 1:
    raise ValueError(
        f"{what}: expected an image (H, W), (H, W, 1), (H, W, 3) or "
        f"(H, W, 4), got shape {x.shape}"
    )
  return Image.fromarray(np.ascontiguousarray(x), mode=modes[chans])


def as_image_list(images) -> list:
  """One image or a sequence of them -> a list (a 4-d array: its rows)."""
  if isinstance(images, (str, os.PathLike, Image.Image)):
    return [images]
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    arr = np.asarray(images)
    return list(arr) if arr.ndim == 4 else [arr]
  images = list(images)
  if not images:
    raise ValueError("no images given")
  return images


def decode_input(item, index: int, pre: data.Preprocess):
  """One input -> (8-bit PIL image, its name for messages). A file's size
  is checked from its header before decoding; a PIL image is turned as its
  EXIF orientation says, as a file is."""
  if isinstance(item, (str, os.PathLike)):
    check = functools.partial(pre.check_size, path=os.fspath(item))
    return data.open_image(item, check=check), os.fspath(item)
  what = f"image {index}"
  if isinstance(item, Image.Image):
    img = decode_lib.to_8bit(ImageOps.exif_transpose(item))
  elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
    img = _array_image(np.asarray(item), what)
  else:
    raise ValueError(
        f"{what}: expected a path, a PIL image or an array, got "
        f"{type(item).__name__}"
    )
  return decode_lib.to_8bit(img), what


def preprocess(images, pre: data.Preprocess):
  """Inputs -> (network batch (N, H, W, C) float32, [(h, w) of each])."""
  xs, sizes = [], []
  for i, item in enumerate(as_image_list(images)):
    img, what = decode_input(item, i, pre)
    pre.check_size(img.size, what)
    xs.append(pre.image_array(img))
    sizes.append((img.size[1], img.size[0]))
  return np.stack(xs), sizes


class Detector:
  """A fitted model, ready to score images in memory (module docstring).

  Build one with `Detector.load(path)` or `Detector.from_fit(model)`;
  `backbone` (an already loaded one, checked against the model's record),
  `batch_size`, `memory_budget_mb` and `weights` as in
  `model_scoring.scorer_for`.
  """

  def __init__(
      self,
      model: model_io.FittedModel,
      backbone=None,
      *,
      batch_size: Optional[int] = None,
      memory_budget_mb: Optional[float] = None,
      weights: Optional[str] = None,
  ):
    methods.get_method(model.method)  # a known bank method, or one error
    self.model = model
    self.scorer = model_scoring.scorer_for(
        model,
        backbone,
        batch_size=batch_size,
        memory_budget_mb=memory_budget_mb,
        weights=weights,
    )

  @classmethod
  def load(cls, path, backbone=None, **kwargs) -> "Detector":
    """The Detector of a model file (or the fit workdir that holds it)."""
    return cls(model_io.load_model(path, backbone=backbone), backbone, **kwargs)

  @classmethod
  def from_fit(cls, fitted, backbone=None, **kwargs) -> "Detector":
    """The Detector of a fit: a `model_io.FittedModel` in memory (what
    `fit.fit` returns), the summary `fit.fit_and_save` returns (its model
    file is read), or a model path / fit workdir."""
    if isinstance(fitted, dict) and "model" in fitted:
      fitted = fitted["model"]
    if isinstance(fitted, model_io.FittedModel):
      return cls(fitted, backbone, **kwargs)
    if isinstance(fitted, (str, os.PathLike)):
      return cls.load(fitted, backbone, **kwargs)
    raise ValueError(
        "Detector.from_fit takes a FittedModel, fit_and_save's summary or a "
        f"model path, got {type(fitted).__name__}"
    )

  @property
  def pre(self) -> data.Preprocess:
    return self.scorer.pre

  @property
  def batch_size(self) -> int:
    """Images per network call (batches are padded to it)."""
    return self.scorer.inputs.batch_size

  @property
  def image_threshold(self) -> Optional[float]:
    return self.model.image_threshold

  @property
  def pixel_threshold(self) -> Optional[float]:
    return self.model.pixel_threshold

  @property
  def calibration(self) -> Optional[calibration_lib.Calibration]:
    return self.model.calibration

  def with_thresholds(self, image=None, pixel=None) -> "Detector":
    """This detector with other thresholds (None: keep the model's), the
    calibration rebuilt for them from the model's held-out scores (the
    thresholds alone when it has none). The networks are shared."""
    model = self.model
    image = model.image_threshold if image is None else float(image)
    pixel = model.pixel_threshold if pixel is None else float(pixel)
    if (image, pixel) == (model.image_threshold, model.pixel_threshold):
      return self
    chosen = thresholds_lib.ChosenThresholds(
        image, pixel, model.thresholds.method, model.thresholds.details
    )
    out = copy.copy(self)
    out.model = dataclasses.replace(model, thresholds=chosen, calibration=None)
    return out

  def score_network(self, x) -> Tuple[np.ndarray, np.ndarray]:
    """(raw scores (N,), raw maps (N, H, W)) of preprocessed network inputs
    (N, H, W, C), in batches of the batch size."""
    x = np.asarray(x, np.float32)
    bs = self.batch_size
    parts = [self.scorer(x[s : s + bs]) for s in range(0, x.shape[0], bs)]
    return (
        np.concatenate([np.asarray(p[0]) for p in parts]),
        np.concatenate([np.asarray(p[1]) for p in parts]),
    )

  def results(self, scores, maps, sizes: Optional[Sequence] = None):
    """One Result per image of raw scores, network-size maps and the
    inputs' (h, w) sizes (None: network-size inputs) -> [Result]."""
    if sizes is None:
      sizes = [np.shape(maps)[1:3]] * len(scores)
    t = self.image_threshold
    calib = self.calibration
    norm = None
    if calib is not None:
      norm = np.asarray(calibration_lib.normalise(calib.image, scores))
    return [
        Result(
            score=float(s),
            score_norm=None if norm is None else float(norm[i]),
            anomalous=None if t is None else bool(float(s) >= t),
            input_map=np.asarray(maps[i], np.float32),
            size=tuple(int(v) for v in sizes[i]),
            pre=self.pre,
            pixel_map=None if calib is None else calib.pixel,
        )
        for i, s in enumerate(np.asarray(scores))
    ]

  def __call__(self, images) -> List[Result]:
    """Scores images (module docstring) -> one Result per image."""
    x, sizes = preprocess(images, self.pre)
    scores, maps = self.score_network(x)
    return self.results(scores, maps, sizes)

  def forward_fn(self):
    """(fn, params): the detector as one pure, jittable function.

    `fn(params, images)` takes a float32 (B, H, W, 3) batch at the network
    input size (`model.image_size`), already resized / cropped, values in
    [0, 255], and returns dict(image_score (B,), image_score_norm (B,),
    map (B, H, W), map_norm (B, H, W)). Inside: the backbone's mean / std
    normalisation, the backbone and patch features, the dense nearest
    neighbour search in plain jnp (squared L2, one matmul), the soft
    weights, the max, the upsampling and blur. The calibration anchors are
    constants; a model without an image (pixel) threshold returns NaN as
    image_score_norm (map_norm). params: dict(backbone, bank_features,
    bank_weights) as jax arrays.
    """
    return forward_fn(self.model, self.scorer.inputs.features)


def forward_fn(model: model_io.FittedModel, embedder):
  """`Detector.forward_fn` of a model and its Embedder."""
  pre = data.Preprocess.from_record(model.preprocess)
  if not pre.grayscale_to_rgb:
    raise ValueError("forward_fn needs a model of RGB inputs")
  mean = np.broadcast_to(np.asarray(pre.mean, np.float32), (3,))
  std = np.broadcast_to(np.asarray(pre.std, np.float32), (3,))
  spec, calib = embedder.spec, model.calibration
  bank_args = (model.grid, model.image_size, float(model.scoring.blur_sigma))
  soft = bool(model.scoring.soft_weight)

  def norm(score_map, x):
    if score_map is None:
      return jnp.full(x.shape, jnp.nan, jnp.float32)
    return calibration_lib.normalise(score_map, x)

  def fn(params, images):
    x = (jnp.asarray(images, jnp.float32) / jnp.float32(255.0) - mean) / std
    feats, _ = features.embed(params["backbone"], x, spec)
    scores = dense_scores(feats, params["bank_features"], params, soft)
    img = jnp.max(scores, axis=-1)
    maps = pixel_maps.anomaly_maps(scores, *bank_args)
    return {
        "image_score": img,
        "image_score_norm": norm(calib and calib.image, img),
        "map": maps,
        "map_norm": norm(calib and calib.pixel, maps),
    }

  params = {
      "backbone": embedder.variables,
      "bank_features": jnp.asarray(model.bank_features),
      "bank_weights": jnp.asarray(model.bank_weights),
  }
  return fn, params


def dense_scores(feats, bank, params, soft: bool):
  """(B, P) patch scores: nearest squared L2 distance to a bank row, times
  its weight with `soft`; one HIGHEST-precision matmul, plain jnp."""
  b, p, d = feats.shape
  q = feats.reshape(b * p, d)
  dots = jnp.matmul(q, bank.T, precision=jax.lax.Precision.HIGHEST)
  qq = jnp.sum(q * q, axis=1)[:, None]
  dist = jnp.maximum(qq - 2.0 * dots + jnp.sum(bank * bank, axis=1)[None], 0.0)
  idx = jnp.argmin(dist, axis=1)
  nearest = jnp.min(dist, axis=1)
  if soft:
    nearest = nearest * jnp.take(params["bank_weights"], idx)
  return nearest.reshape(b, p)
