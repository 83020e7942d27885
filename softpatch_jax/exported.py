"""Runs a detector exported as StableHLO, with jax alone.

    from softpatch_jax import exported
    detector = exported.load("model.stablehlo")
    out = detector(images)   # float32 (B, H, W, C) in [0, 255]
    out["image_score"], out["map"]

The file is what ``python -m softpatch_jax.export --format stablehlo``
writes: a serialised ``jax.export.Exported`` with the backbone weights and
the memory bank inside, a symbolic batch dimension, and a dict of outputs
(``image_score`` (B,), ``map`` (B, H, W), and the calibrated
``image_score_norm`` / ``map_norm`` when the model has them). This module
imports jax and numpy only, so a deployment needs neither flax nor the rest
of this package: copy this file next to the model if the package is not
installed.
"""

from __future__ import annotations

import os

import jax
import numpy as np


class ExportedDetector:
  """A deserialised exported detector; call it on a batch of images."""

  def __init__(self, exp: "jax.export.Exported", path: str = "<bytes>"):
    self.exp = exp
    self.path = path
    aval = exp.in_avals[0]
    # (H, W, C) of one image: the fixed part of the (b, H, W, C) input.
    self.input_shape = tuple(int(s) for s in aval.shape[1:])
    self.output_names = tuple(
        jax.tree_util.tree_unflatten(exp.out_tree, range(len(exp.out_avals)))
    )
    self._call = jax.jit(exp.call)

  def __call__(self, images) -> dict:
    """float32 (B, H, W, C) images, values in [0, 255] -> dict of arrays.

    Raises:
      ValueError: images not of shape (B, *input_shape).
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(
          f"{self.path}: expects float32 images of shape "
          f"(B, {', '.join(map(str, self.input_shape))}), got {x.shape}"
      )
    return self._call(x)


def from_bytes(data: bytes, origin: str = "<bytes>") -> ExportedDetector:
  """The detector of serialised bytes (ValueError if they are not one)."""
  try:
    exp = jax.export.deserialize(bytearray(data))
  except Exception as e:  # flatbuffers raises several unrelated types
    raise ValueError(
        f"{origin}: not an exported StableHLO detector ({type(e).__name__}: "
        f"{e})"
    ) from None
  if len(exp.in_avals) != 1 or len(exp.in_avals[0].shape) != 4:
    raise ValueError(
        f"{origin}: not an exported detector (it takes "
        f"{[tuple(a.shape) for a in exp.in_avals]})"
    )
  return ExportedDetector(exp, origin)


def load(path: str) -> ExportedDetector:
  """Reads an exported detector file; `load(path)(images)` runs it."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise ValueError(f"exported model file does not exist: {path!r}")
  with open(path, "rb") as f:
    return from_bytes(f.read(), path)
