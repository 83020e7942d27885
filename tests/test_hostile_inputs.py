"""Hostile or careless inputs: one clear error, never a silent wrong answer.

Here: non-finite thresholds, negative bank weights, unknown methods, negative
blur, mistyped model metadata, a string format version, a predict run where
no input can be read, an unwritable heatmaps folder, images too thin or too
large to resize (with a peak-memory bound), the crop warning, and
whole-image mode on a 1250x500 part.

The other hostile cases have their own files: crafted .pth weight files in
test_hostile_weights.py; concurrent and killed runs, unreadable training
images, hidden files and symlink loops in test_hostile_runs.py.
"""

import json
import logging
import os
import subprocess
import sys

from flax import serialization
import numpy as np
from PIL import Image
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import data
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import predict


def random_model(grid=(4, 4)):
  # A backbone that needs no weights file: the predict CLI can rebuild it.
  # grid (8, 8) matches its 64 px input, for runs that embed images.
  return _testutil.random_model(
      m=20,
      d=8,
      grid=grid,
      backbone=model_meta.BackboneRecord(
          "efficientnet_lite0", ("stage3", "stage5"), "random", 0, "random:0"
      ),
  )


def tampered(path, edit_meta=None, edit_payload=None):
  """Writes random_model() to `path` with its payload or metadata edited."""
  payload = serialization.msgpack_restore(model_io.to_bytes(random_model()))
  if edit_meta is not None:
    meta = json.loads(payload["meta"])
    edit_meta(meta)
    payload["meta"] = json.dumps(meta)
  if edit_payload is not None:
    edit_payload(payload)
  path.write_bytes(serialization.msgpack_serialize(payload))
  return str(path)


def _set(key, value):
  def edit(meta):
    if value is KeyError:
      del meta[key]
    else:
      meta[key] = value

  return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda m: m["thresholds"].update(image=float("nan")),
            "thresholds.image must be a finite number or null, got nan",
        ),
        (
            lambda m: m["thresholds"].update(pixel=[1.0]),
            r"thresholds.pixel must be a finite number or null, got \[1.0\]",
        ),
        (_set("method", 7), "method must be a method name, got 7"),
        (_set("method", KeyError), "'method' is missing"),
        (
            lambda m: m["scoring"].update(blur_sigma=-1.0),
            "scoring.blur_sigma must be a finite number >= 0",
        ),
        (
            lambda m: m["scoring"].update(memory_budget_mb=float("inf")),
            "scoring.memory_budget_mb must be a finite number >= 0",
        ),
        (
            lambda m: m["scoring"].update(search="psychic"),
            "scoring: scoring.search must be one of",
        ),
        (_set("grid", [4, "4"]), "grid must be two positive integers"),
        (_set("grid", [4, 4, 1]), "grid must be two positive integers"),
        (_set("batch_size", 0), "batch_size must be a positive integer"),
        (
            lambda m: m["scoring"].update(soft_weight="yes"),
            "scoring.soft_weight must be true or false",
        ),
        (
            lambda m: m["embed"].update(patchsize=0),
            "embed: features.patchsize must be an integer >= 1",
        ),
        (
            lambda m: m["thresholds"].update(method="guess"),
            "thresholds: thresholds.method must be one of",
        ),
        (
            _set("backbone", ["efficientnet_lite0"]),
            "backbone must be a mapping",
        ),
        (
            lambda m: m["backbone"].pop("weights_id"),
            "backbone lacks weights_id",
        ),
    ],
)
def test_bad_metadata_is_one_clear_error(tmp_path, edit, message):
  path = tampered(tmp_path / "m.softpatch", edit_meta=edit)
  with pytest.raises(ValueError, match="bad model metadata: " + message):
    model_io.load_model(path)


def test_unknown_method_refused_before_predicting(tmp_path):
  # The model file is only a bank with records; the method name is checked
  # against the method registry where it is used, before any output.
  path = tampered(
      tmp_path / "m.softpatch", edit_meta=_set("method", "rm -rf /")
  )
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="unknown method 'rm -rf /'"):
    predict.predict(
        path, str(tmp_path), str(out), predict.PredictOptions(progress=False)
    )
  assert not out.exists()


def test_metadata_not_a_mapping(tmp_path):
  path = tampered(
      tmp_path / "m.softpatch",
      edit_payload=lambda p: p.update(meta=json.dumps([1, 2])),
  )
  with pytest.raises(ValueError, match="missing fields"):
    model_io.load_model(path)


def test_string_format_version(tmp_path):
  path = tampered(
      tmp_path / "m.softpatch",
      edit_payload=lambda p: p.update(format_version="1"),
  )
  with pytest.raises(
      ValueError,
      match=r"format_version must be an integer, " r"got '1' \(a str\)",
  ):
    model_io.load_model(path)


def test_negative_bank_weights_refused(tmp_path):
  model = random_model()
  model.bank_weights[3] = -2.0
  with pytest.raises(ValueError, match="weights must be >= 0, 1 are negative"):
    model_io.save_model(str(tmp_path / "m.softpatch"), model)

  def negate(payload):
    payload["arrays"]["bank_weights"] = -payload["arrays"]["bank_weights"]

  path = tampered(tmp_path / "n.softpatch", edit_payload=negate)
  with pytest.raises(ValueError, match="weights must be >= 0, 20 are"):
    model_io.load_model(path)
  assert not os.path.exists(tmp_path / "m.softpatch")


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"threshold": float("nan")}, "--threshold must be a finite number"),
        ({"threshold": float("inf")}, "--threshold must be a finite number"),
        (
            {"pixel_threshold": float("nan")},
            "--pixel_threshold must be a finite",
        ),
        ({"quantile": 1.5}, r"--quantile must be in \(0, 1\]"),
    ],
)
def test_predict_refuses_non_finite_overrides(tmp_path, kw, message):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=message):
    predict.predict(
        random_model(),
        str(tmp_path),
        str(out),
        predict.PredictOptions(progress=False, **kw),
    )
  assert not out.exists()  # checked before anything is written


def test_negative_blur_sigma_in_fit_config(tmp_path):
  c = _testutil.fit_config(tmp_path, **{"scoring.blur_sigma": -1.0})
  with pytest.raises(ValueError, match=r"scoring.blur_sigma must be .*\[0, "):
    fit.fit_and_save(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused at the config edge


def test_predict_exits_nonzero_when_nothing_is_readable(tmp_path):
  model = model_io.save_model(str(tmp_path / "m.softpatch"), random_model())
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "a.png").write_bytes(b"not a png")
  (inputs / "b.png").write_bytes(b"")
  res = _testutil.run_predict_cli(model, inputs, tmp_path / "out")
  assert res.returncode == 1, res.stderr[-2000:]
  assert "error: none of the 2 input image(s) could be read" in res.stderr
  rows = predict.read_predictions(tmp_path / "out" / "predictions.csv")
  assert [r["decision"] for r in rows] == ["error", "error"]


# ------------------------------------------------------------ image bounds

_PEAK_RSS = r"""
import sys
from softpatch_jax import data


def peak_kb():
  # The high-water mark of this process (ru_maxrss may carry the parent's).
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))


pre = data.Preprocess(resize=256, crop=224, max_aspect_ratio={aspect})
before = peak_kb()
try:
  pre.load_sample(data.Sample(sys.argv[1], 0, "good"))
  print("loaded")
except ValueError as e:
  print("error:", e)
print("grew_kb", peak_kb() - before)
"""


def peak_growth(path, aspect=20.0):
  """(stdout lines, peak-RSS growth in MB) of loading `path` in a subprocess."""
  res = subprocess.run(
      [sys.executable, "-c", _PEAK_RSS.format(aspect=aspect), str(path)],
      capture_output=True,
      text=True,
      check=True,
  )
  lines = res.stdout.strip().splitlines()
  return lines, int(lines[-1].split()[1]) / 1024


def test_thin_png_refused_before_resize(tmp_path):
  # 1 x 20000: a tiny file whose short side resized to 256 would be
  # 256 x 5.12M pixels (about 1.8 GB as float32 RGB).
  path = tmp_path / "thin.png"
  Image.new("L", (1, 20000), 128).save(path, optimize=True)
  assert path.stat().st_size < 1000
  lines, grew_mb = peak_growth(path)
  assert lines[0] == (
      f"error: image {path} (1x20000 pixels, width x height) has aspect "
      "ratio 20000.0, beyond the limit 20 (config.data.max_aspect_ratio)"
  )
  assert grew_mb < 50, grew_mb


def test_pixel_bound_after_resize(tmp_path):
  # Aspect ratio 15 passes; 256 x 3840 after resizing passes the default
  # bound, a configured bound of 500k pixels refuses it.
  path = tmp_path / "long.png"
  Image.new("RGB", (3000, 200), (90, 90, 90)).save(path)
  pre = data.Preprocess(resize=256, crop=224, max_pixels=500_000)
  with pytest.raises(ValueError) as e:
    pre.load_sample(data.Sample(str(path), 0, "good"))
  assert str(e.value) == (
      f"image {path} (3000x200 pixels, width x height) would be resized to "
      "3840x256 = 983040 pixels, beyond the limit 500000 "
      "(config.data.max_pixels)"
  )
  lines, grew_mb = peak_growth(path, aspect=10.0)
  assert "aspect ratio 15.0, beyond the limit 10" in lines[0]
  assert grew_mb < 50, grew_mb


def test_crop_that_discards_most_of_an_image_warns(tmp_path, caplog):
  path = tmp_path / "wide.png"
  Image.new("RGB", (1237, 500), (90, 90, 90)).save(path)
  pre = data.Preprocess(resize=256, crop=224)
  with caplog.at_level(logging.WARNING):
    pre.load_sample(data.Sample(str(path), 0, "good"))
    pre.load_sample(data.Sample(str(path), 0, "good"))  # once per size
  warnings = [r.getMessage() for r in caplog.records if "keeps" in r.message]
  assert warnings == [
      f"the 224x224 centre crop of {path} resized to 633x256 keeps 31% of "
      "its area: defects outside the crop are never seen. Set "
      "config.data.crop=0 to inspect whole images."
  ]


# ------------------------------------------------------- whole-image mode


def _part(rng, defect=False):
  """A 1250 x 500 elongated part with fine grain; a dark square at its end."""
  yy = np.mgrid[0:500, 0:1250][0].astype(np.float32)
  img = 0.5 + 0.15 * np.sin(2 * np.pi * yy / 25 + rng.uniform(0, 6))
  img = img + rng.normal(0, 0.02, img.shape)
  if defect:
    img[220:280, 1120:1180] = 0.05
  return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def whole_image_model(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("whole")
  rng = np.random.default_rng(0)
  for sub, n in (("train", 6), ("test", 1)):
    (tmp / sub).mkdir()
    for i in range(n):
      _part(rng).save(tmp / sub / f"good{i}.png")
  _part(rng, defect=True).save(tmp / "test" / "defect.png")
  Image.new("L", (500, 500), 128).save(tmp / "square.png")
  c = _testutil.fit_config(tmp / "train", **{"data.crop": 0, "data.resize": 64})
  fit.fit_and_save(c, str(tmp / "out"))
  return tmp, model_io.load_model(str(tmp / "out"))


def test_whole_image_mode_keeps_the_aspect_ratio(whole_image_model):
  _, model = whole_image_model
  assert model.preprocess["crop"] is None
  assert model.preprocess["input_size"] == [64, 160]
  assert tuple(model.image_size) == (64, 160)
  assert model.grid[1] > 2 * model.grid[0]  # rectangular patch grid


def test_whole_image_predict_maps_at_original_size(whole_image_model):
  tmp, model = whole_image_model
  res = predict.predict(
      model,
      str(tmp / "test"),
      str(tmp / "pred"),
      predict.PredictOptions(save_maps=True, save_masks=True, progress=False),
  )
  rows = {os.path.basename(r["path"]): r for r in res["rows"]}
  defect = rows["defect.png"]
  heatmap = Image.open(tmp / "pred" / defect["heatmap"])
  # The original image's size, with the colour bar below it.
  assert heatmap.size[0] == 1250 and heatmap.size[1] > 500
  assert Image.open(tmp / "pred" / defect["mask"]).size == (1250, 500)
  amap = np.load(tmp / "pred" / defect["map"])
  assert amap.shape == (500, 1250)
  y, x = np.unravel_index(amap.argmax(), amap.shape)
  # The defect, near the end of the part, is found where it is; a 224 centre
  # crop of this image would keep x in [455, 795] only.
  assert 190 <= y <= 310 and 1090 <= x <= 1210, (y, x)
  assert defect["decision"] == "anomalous"
  assert rows["good0.png"]["score"] < defect["score"]


def test_whole_image_model_refuses_other_shapes(whole_image_model):
  tmp, model = whole_image_model
  res = predict.predict(
      model,
      str(tmp / "square.png"),
      str(tmp / "pred_sq"),
      predict.PredictOptions(progress=False),
  )
  (row,) = res["rows"]
  assert row["decision"] == "error"
  assert (
      "(500x500 pixels, width x height) does not have the shape of the "
      "model input 160x64"
  ) in row["error"]


def test_whole_image_metadata_needs_input_size(tmp_path):
  def edit(meta):
    meta["preprocess"]["crop"] = None

  path = tampered(tmp_path / "m.softpatch", edit_meta=edit)
  with pytest.raises(
      ValueError,
      match="preprocess.input_size must be set when crop is null",
  ):
    model_io.load_model(path)


def test_unwritable_heatmaps_folder_is_one_error(tmp_path):
  model = random_model(grid=(8, 8))
  model.image_size = (64, 64)  # the map at the input's size, for the heatmap
  model = model_io.save_model(str(tmp_path / "m.softpatch"), model)
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.new("RGB", (64, 64), (90, 90, 90)).save(inputs / "a.png")
  out = tmp_path / "out"
  out.mkdir()
  (out / "heatmaps").write_text("a file where the folder belongs")
  res = _testutil.run_predict_cli(model, inputs, out)
  assert res.returncode == 1, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot write {out / 'heatmaps' / 'a.png'} ")
  assert "Traceback" not in res.stderr
  assert sorted(os.listdir(out)) == ["heatmaps"]  # no CSV, no lock left
