r"""Exports a fitted model as one ONNX or StableHLO file (the whole detector).

  python -m softpatch_jax.export --model out/model.softpatch \
      --format onnx --out out/model.onnx
  python -m softpatch_jax.export --model out/model.softpatch \
      --format stablehlo --out out/model.stablehlo

What is exported: `detector.Detector.forward_fn`, the whole network-side
detector as one pure function, with the model's backbone weights and memory
bank baked in as constants. It takes one input, ``images``: float32
(B, H, W, 3) at the model's network input size (H, W =
``model.image_size``), already resized / cropped as the model's
preprocessing does, values in [0, 255]. B is dynamic. Inside:
normalisation by the backbone's mean / std, the backbone, the patch
features, the nearest-neighbour search over the whole bank (squared L2 as
||q||^2 - 2 q.b + ||b||^2 clamped at 0, one matmul, then argmin and the
matched bank weight with soft weighting), the image score (max over
patches) and the pixel map (upsample + blur, two constant matrices).
Outputs, in this order: ``image_score`` (B,) and ``map`` (B, H, W), raw as
the predict command reports them, then the calibrated ``image_score_norm``
(B,) and ``map_norm`` (B, H, W) in [0, 1], 0.5 at the thresholds
(`calibration`; NaN for a model without that threshold).

Routes:
- ONNX through ``jax2onnx``: it converts the traced jaxpr primitive by
  primitive to ONNX operators, so the graph is the same computation as the
  JAX path (convolutions, the gathers of the patch features and of the
  bilinear resize, the distance matmul, ArgMin). The alternative routes
  were worse: torch.onnx would need a second implementation of the model
  in torch (the reference's backbone only, not the patch features and
  scoring here), and tf2onnx needs TensorFlow. The features code already
  writes adaptive pooling and resizes as takes and constant matrices, which
  convert as they are, so nothing is rewritten for the export.
- StableHLO through ``jax.export``, serialised with a symbolic batch
  dimension ``b`` for CPU, CUDA and TPU; `softpatch_jax.exported.load`
  reads it back with jax alone.

The search is dense (the whole (B*P, M) distance matrix in one product):
right for the banks fit mode makes (thousands of rows); a bank of millions
of rows would need chunking, which the exported graph does not do.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Dict, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jax2onnx
import onnx

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import detector
from softpatch_jax import io_utils
from softpatch_jax import model_io

FORMATS = ("onnx", "stablehlo")
OUTPUTS = ("image_score", "map")
# Calibrated outputs, exported when the forward function returns them.
NORMALISED = ("image_score_norm", "map_norm")
PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME = "images"
BATCH = "B"


def input_shape(model: model_io.FittedModel) -> Tuple[int, int, int]:
  """(H, W, 3) of one exported input image."""
  return (*model.image_size, 3)


def forward_fn(
    model: model_io.FittedModel, backbone=None
) -> Tuple[Callable, Dict]:
  """(fn, params) of `detector.Detector.forward_fn`: what is exported.

  `backbone`: the model's backbone if already loaded (checked against the
  model's record), else rebuilt from it.
  """
  return detector.Detector(model, backbone).forward_fn()


def output_names(outputs: Dict) -> Tuple[str, ...]:
  """The exported outputs present in `outputs`, in file order."""
  return tuple(k for k in OUTPUTS + NORMALISED if k in outputs)


def _select(fn, params, names, container):
  """images -> `container` of fn's outputs `names`, fn called once."""

  def run(images):
    out = fn(params, images)
    if container is dict:
      return {k: out[k] for k in names}
    return tuple(out[k] for k in names)

  return run


def _names_of(fn, params, shape) -> Tuple[str, ...]:
  spec = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return output_names(jax.eval_shape(fn, params, spec))


def onnx_bytes(fn, params, shape: Sequence[int]) -> bytes:
  """The serialised ONNX model of `fn(params, images)` for (B, *shape)
  images with a dynamic batch B; outputs named as `output_names`."""
  names = _names_of(fn, params, shape)
  # The converter's serialiser warns about internal shape hints it skips.
  quiet = logging.getLogger("onnx_ir.serde")
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  try:
    proto = jax2onnx.to_onnx(
        _select(fn, params, names, tuple),
        [(BATCH, *(int(s) for s in shape))],
        model_name="softpatch",
        input_names=[INPUT_NAME],
        output_names=list(names),
    )
  finally:
    quiet.setLevel(level)
  # jax2onnx records some NHWC intermediates with NCHW shapes; the runtime
  # infers every intermediate shape itself, so the hints are dropped.
  del proto.graph.value_info[:]
  onnx.checker.check_model(proto)
  return proto.SerializeToString()


def stablehlo_bytes(
    fn, params, shape: Sequence[int], platforms: Sequence[str] = PLATFORMS
) -> bytes:
  """The serialised `jax.export` of `fn(params, images)` (params baked in)
  for (b, *shape) float32 images, b symbolic; returns a dict."""
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, *(int(s) for s in shape)), jnp.float32)
  names = _names_of(fn, params, shape)
  # The output dict with the names in file order (a dict's pytree order is
  # sorted by key, so the names travel as keys).
  run = jax.jit(_select(fn, params, names, dict))
  exp = jax.export.export(run, platforms=tuple(platforms))(spec)
  return bytes(exp.serialize())


def export_model(
    model: model_io.FittedModel,
    fmt: str,
    out: str,
    *,
    backbone=None,
    platforms: Sequence[str] = PLATFORMS,
) -> str:
  """Writes `model` exported as `fmt` to `out` atomically; returns the
  absolute path. `platforms`: the StableHLO targets."""
  check_format(fmt)
  fn, params = forward_fn(model, backbone)
  shape = input_shape(model)
  if fmt == "onnx":
    data = onnx_bytes(fn, params, shape)
  else:
    data = stablehlo_bytes(fn, params, shape, platforms)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory; give a file name")
  io_utils.write_bytes(out, data)
  return out


def check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")


def export(model_path: str, fmt: str, out: str, **kw) -> str:
  """Loads the model at `model_path` and exports it (`export_model`)."""
  check_format(fmt)
  return export_model(model_io.load_model(model_path), fmt, out, **kw)


# --------------------------------------------------------------------------
# Command line.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli_flags.verbose_logging()
  f = flags.FLAGS
  try:
    path = export(f.model, f.format, f.out, platforms=f.platforms)
  except (ValueError, backbones.WeightsUnavailableError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"exported {f.format} to {path}", flush=True)


if __name__ == "__main__":
  cli_flags.prepare(sys.argv, cli_flags.define_export_flags, __doc__)
  cli_flags.run_app(main)
