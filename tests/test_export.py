"""export: the ONNX graph and the StableHLO file score like the JAX path.

Two small fitted models (EfficientNet-Lite0 with its ImageNet weights at
64 px, as the default job but smaller): a centre-crop one (square grid) and
a whole-image one (data.crop=0, a 48 x 120 input, a rectangular grid).

Parity: the JAX path is what predict runs (`model_scoring.scorer_for` on
the preprocessed images). Image scores agree to 1e-4 relative; maps to
1e-3 of the map's scale, i.e. max |onnx - jax| <= 1e-3 * max |jax map|
over the batch; calibrated outputs (in [0, 1]) to 1e-3 absolute.
"""

import jax
import numpy as np
import pytest
from PIL import Image

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import cli_flags
from softpatch_jax import exported
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import model_scoring
from softpatch_jax.configs import fit_folder
from softpatch_jax.data import synthetic

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
from softpatch_jax import export  # pylint: disable=g-import-not-at-top

IMAGE_RTOL = 1e-4
MAP_TOL = 1e-3  # of the map's scale (max |map|)
NORM_ATOL = 1e-3


def _elongated(rng, defect=False):
  """A 250 x 100 striped part; a dark square near its end if `defect`."""
  yy = np.mgrid[0:100, 0:250][0].astype(np.float32)
  img = 0.5 + 0.15 * np.sin(2 * np.pi * yy / 25 + rng.uniform(0, 6))
  img = img + rng.normal(0, 0.02, img.shape)
  if defect:
    img[40:60, 200:220] = 0.05
  return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def _fit_config(train_dir, **overrides):
  """The fit_folder config shrunk as tests/_testutil.fit_config does (64 px,
  small batches, a 'quantile' threshold on 3 folds)."""
  c = fit_folder.get_config()
  c.data.train_dir = str(train_dir)
  c.data.resize = c.data.crop = 64
  c.data.batch_size = 4
  c.data.num_workers = 1
  c.threshold.folds = 3
  for k, v in overrides.items():
    section, name = k.split(".")
    c[section][name] = v
  return c


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{'crop': (model, test images), 'whole': (...)}, fitted once."""
  tmp = tmp_path_factory.mktemp("export")
  synthetic.make_mvtec_like(
      tmp / "d", n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=1
  )
  cat = tmp / "d" / "synth"
  fit.fit_and_save(
      _fit_config(cat / "train" / "good"),
      str(tmp / "crop"),
  )
  crop_tests = sorted((cat / "test").rglob("*.png"))
  rng = np.random.default_rng(0)
  (tmp / "rect").mkdir()
  for i in range(5):
    _elongated(rng).save(tmp / "rect" / f"{i}.png")
  whole_tests = []
  for i, defect in enumerate((False, True, True)):
    whole_tests.append(tmp / f"part{i}.png")
    _elongated(rng, defect).save(whole_tests[-1])
  overrides = {"data.crop": 0, "data.resize": 48}
  fit.fit_and_save(
      _fit_config(tmp / "rect", **overrides),
      str(tmp / "whole"),
  )
  return {
      "crop": (model_io.load_model(str(tmp / "crop")), crop_tests[:4]),
      "whole": (model_io.load_model(str(tmp / "whole")), whole_tests),
  }


def _inputs(model, paths):
  """(raw [0, 255] float32 batch, normalised batch) of image files."""
  pre = model_scoring.preprocess_for(model)
  imgs = [Image.open(p).convert("RGB") for p in paths]
  raw = np.stack([np.asarray(pre.geometry(im), np.float32) for im in imgs])
  return raw, np.stack([pre.image_array(im) for im in imgs])


def _check_close(got, want):
  """Image scores, maps and calibrated outputs within the module's bounds."""
  img, maps = np.asarray(want["image_score"]), np.asarray(want["map"])
  err_img = np.abs(np.asarray(got["image_score"]) - img) / np.abs(img)
  assert err_img.max() <= IMAGE_RTOL, err_img
  err_map = np.abs(np.asarray(got["map"]) - maps).max() / np.abs(maps).max()
  assert err_map <= MAP_TOL, err_map
  for k in export.NORMALISED:
    if k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=NORM_ATOL)


@pytest.mark.parametrize("kind", ["crop", "whole"])
def test_onnx_matches_the_jax_path(models, kind, tmp_path):
  model, paths = models[kind]
  raw, normalised = _inputs(model, paths)
  img, maps = model_scoring.scorer_for(model, batch_size=len(paths))(normalised)
  fn, params = export.forward_fn(model)
  want = dict(jax.jit(fn)(params, raw))
  # The exported function is the predict path's computation.
  _check_close(want, {"image_score": img, "map": maps})
  assert set(want) == {"image_score", "map", *export.NORMALISED}
  out = export.export_model(model, "onnx", str(tmp_path / "m.onnx"))
  sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  names = [o.name for o in sess.get_outputs()]
  assert names == list(export.OUTPUTS + export.NORMALISED)
  assert sess.get_inputs()[0].shape == ["B", *export.input_shape(model)]
  got = dict(zip(names, sess.run(None, {export.INPUT_NAME: raw})))
  assert got["map"].shape == (len(paths), *model.image_size)
  _check_close(got, {"image_score": img, "map": maps, **want})
  # Dynamic batch: one image alone scores as in the batch.
  one = dict(zip(names, sess.run(None, {export.INPUT_NAME: raw[1:2]})))
  _check_close(one, {k: v[1:2] for k, v in want.items()})


def test_stablehlo_round_trip(models, tmp_path):
  model, paths = models["whole"]
  raw, _ = _inputs(model, paths)
  fn, params = export.forward_fn(model)
  out = str(tmp_path / "m.stablehlo")
  path = export.export(_saved(model, tmp_path), "stablehlo", out)
  det = exported.load(path)
  assert det.input_shape == export.input_shape(model)
  assert set(det.output_names) == set(export.OUTPUTS + export.NORMALISED)
  # The exported program is the JAX path with the weights and the bank as
  # constants: equal bit for bit to that; to float rounding (constant
  # folding) to the weights-as-arguments program.
  baked = jax.jit(lambda images: fn(params, images))
  for batch in (raw, raw[:1], np.concatenate([raw, raw[::-1]])):
    got = det(batch)
    for k, v in baked(batch).items():
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), k)
    want = jax.jit(fn)(params, batch)
    for k in export.OUTPUTS:
      v = np.asarray(want[k])
      err = np.abs(np.asarray(got[k]) - v).max() / np.abs(v).max()
      assert err <= 1e-5, (k, err)
  with pytest.raises(ValueError, match=r"expects float32 images of shape"):
    det(raw[:, :10])


def _saved(model, tmp_path):
  return model_io.save_model(str(tmp_path / "model.softpatch"), model)


def test_bad_input_is_one_clear_error(models, tmp_path):
  model, _ = models["crop"]
  path = _saved(model, tmp_path)
  with pytest.raises(ValueError, match=r"unknown export format 'tflite'"):
    export.export(path, "tflite", str(tmp_path / "x"))
  with pytest.raises(ValueError, match="model file does not exist"):
    export.export(str(tmp_path / "nope.softpatch"), "onnx", str(tmp_path / "x"))
  with pytest.raises(ValueError, match="is a directory"):
    export.export(path, "stablehlo", str(tmp_path))
  bad = tmp_path / "bad.stablehlo"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not an exported StableHLO detector"):
    exported.load(str(bad))
  with pytest.raises(ValueError, match="does not exist"):
    exported.load(str(tmp_path / "missing.stablehlo"))


def _run_cli(*args):
  return _testutil.run_module("softpatch_jax.export", *args)


def test_command_line(models, tmp_path):
  model, _ = models["crop"]
  path = _saved(model, tmp_path)
  out = tmp_path / "m.stablehlo"
  res = _run_cli(f"--model={path}", "--format=stablehlo", f"--out={out}")
  assert res.returncode == 0, res.stderr
  assert out.is_file() and f"exported stablehlo to {out}" in res.stdout
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
  res = _run_cli(f"--model={path}", "--format=tflite", f"--out={out}")
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1] == (
      "error: unknown export format 'tflite'; use one of ('onnx', 'stablehlo')"
  )


def test_the_command_line_lists_the_export_platforms():
  assert cli_flags.EXPORT_PLATFORMS == export.PLATFORMS
