"""Per-image latency of the exported ONNX detector vs the JAX path, on CPU.

  python benchmarks/bench_export.py --model out/model.softpatch \
      [--images DIR] [--batch 1,8] [--repeat 20] \
      [--out benchmarks/results_export.json]

Exports the model to ONNX (`softpatch_jax.export`, timed), then runs the
same float32 [0, 255] input batches through:
  onnx      onnxruntime, CPUExecutionProvider, default session options;
  jax       the exported function itself under jax.jit (`export.forward_fn`);
  predict   the predict command's scorer (`model_scoring.scorer_for`, the
            normalised images; its fixed batch padding included).
Each time is the median of --repeat warm calls (one warm-up call, so
compilation is excluded), divided by the batch size; ratios are onnx / jax
and onnx / predict. With --images (a folder of images, preprocessed as the
model does) it also reports the parity of the ONNX outputs with the predict
path on them: the max relative image-score error and the max map error
relative to the map's scale (max |map|), as tests/test_export.py defines
them; without it, inputs are uniform random in [0, 255].

Writes --out as JSON and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import onnxruntime as ort
from PIL import Image

from softpatch_jax import export
from softpatch_jax import io_utils
from softpatch_jax import model_io
from softpatch_jax import model_scoring

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _median_seconds(fn, repeat):
  """Median seconds of `repeat` warm calls of fn (after one warm-up)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _inputs(model, images_dir, n, seed=0):
  """(raw [0, 255] batch (n, H, W, C), normalised batch) for the model."""
  pre = model_scoring.preprocess_for(model)
  if images_dir:
    names = sorted(
        f for f in os.listdir(images_dir) if f.lower().endswith(IMAGE_EXTS)
    )[:n]
    imgs = [Image.open(os.path.join(images_dir, f)) for f in names]
    imgs = [im.convert("RGB") for im in imgs]
    raw = np.stack([np.asarray(pre.geometry(im), np.float32) for im in imgs])
    raw = raw.reshape(len(imgs), *export.input_shape(model))
  else:
    rng = np.random.default_rng(seed)
    shape = (n, *export.input_shape(model))
    raw = np.round(rng.uniform(0, 255, size=shape)).astype(np.float32)
  mean = np.broadcast_to(np.asarray(pre.mean, np.float32), (3,))
  std = np.broadcast_to(np.asarray(pre.std, np.float32), (3,))
  return raw, ((raw / np.float32(255.0) - mean) / std).astype(np.float32)


def _parity(sess, scorer, raw, norm):
  img, maps = (np.asarray(a) for a in scorer(norm))
  o_img, o_map = sess.run(list(export.OUTPUTS), {export.INPUT_NAME: raw})
  return {
      "images": int(len(raw)),
      "max_rel_image_score_error": float(
          (np.abs(o_img - img) / np.abs(img)).max()
      ),
      "max_map_error_rel_to_scale": float(
          np.abs(o_map - maps).max() / np.abs(maps).max()
      ),
      "map_scale": float(np.abs(maps).max()),
  }


def _latency(sess, model, fn, params, raw, norm, repeat):
  """Per-image medians (seconds) of the three paths on one batch."""
  b = len(raw)
  jitted = jax.jit(fn)
  scorer = model_scoring.scorer_for(model, batch_size=b)
  t = {
      "onnx": _median_seconds(
          lambda: sess.run(None, {export.INPUT_NAME: raw}), repeat
      ),
      "jax": _median_seconds(lambda: jitted(params, raw), repeat),
      "predict": _median_seconds(lambda: scorer(norm), repeat),
  }
  per = {k: v / b for k, v in t.items()}
  return {
      "batch": b,
      "per_image_s": per,
      "onnx_over_jax": per["onnx"] / per["jax"],
      "onnx_over_predict": per["onnx"] / per["predict"],
  }


def run(args):
  model = model_io.load_model(args.model)
  fn, params = export.forward_fn(model)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    path = export.export_model(model, "onnx", os.path.join(tmp, "m.onnx"))
    export_s = time.perf_counter() - t0
    size = os.path.getsize(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  batches = [int(b) for b in args.batch.split(",")]
  res = {
      "machine": args.machine or f"{platform.machine()}, {os.cpu_count()} CPUs",
      "model": os.path.abspath(args.model),
      "input_shape": list(export.input_shape(model)),
      "bank_rows": int(model.bank_features.shape[0]),
      "onnx_export_s": export_s,
      "onnx_bytes": size,
      "versions": {"jax": jax.__version__, "onnxruntime": ort.__version__},
      "repeat": args.repeat,
      "latency": [],
  }
  for b in batches:
    raw, norm = _inputs(model, args.images, b)
    res["latency"].append(
        _latency(sess, model, fn, params, raw, norm, args.repeat)
    )
  if args.images:
    raw, norm = _inputs(model, args.images, args.parity_images)
    scorer = model_scoring.scorer_for(model, batch_size=len(raw))
    res["parity"] = _parity(sess, scorer, raw, norm)
  return res


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--images", default=None, help="A folder of test images.")
  p.add_argument("--batch", default="1,8", help="Comma-separated sizes.")
  p.add_argument("--repeat", type=int, default=20)
  p.add_argument("--parity_images", type=int, default=32)
  p.add_argument("--machine", default=None, help="Machine description.")
  p.add_argument("--out", default="benchmarks/results_export.json")
  args = p.parse_args()
  res = run(args)
  io_utils.write_json(args.out, res)
  print(io_utils.jsonable(res))


if __name__ == "__main__":
  main()
