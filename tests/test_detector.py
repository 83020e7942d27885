"""The in-memory detector: inputs of every kind, results, forward_fn."""

import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import calibration
from softpatch_jax import data
from softpatch_jax import detector
from softpatch_jax import features
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax.data import synthetic
from softpatch_jax.detector import Detector


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A real model fitted in memory on a tiny synthetic folder, and a copy
  saved to a file."""
  tmp = tmp_path_factory.mktemp("det")
  synthetic.make_mvtec_like(
      tmp / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0
  )
  config = _testutil.fit_config(tmp / "data/synth/train/good")
  model = fit.fit(config, str(tmp / "work"))
  assert not os.path.exists(tmp / "work" / model_io.MODEL_FILENAME)
  path = model_io.save_model(str(tmp / "model.softpatch"), model)
  det = Detector.from_fit(model)
  files = sorted(str(p) for p in (tmp / "data/synth/test").rglob("*.png"))
  return tmp, model, path, det, files


def scores(results):
  return [r.score for r in results]


def test_every_input_kind_scores_like_the_file(fitted):
  _, _, path, det, files = fitted
  by_path = det(files)
  assert len(by_path) == len(files)
  arrays = [np.asarray(Image.open(f)) for f in files]
  assert arrays[0].dtype == np.uint8 and arrays[0].shape == (64, 64, 3)
  assert scores(det(arrays)) == scores(by_path)  # list of arrays
  assert scores(det(np.stack(arrays))) == scores(by_path)  # (B, H, W, 3)
  assert scores(det([Image.open(f) for f in files])) == scores(by_path)
  assert scores(det(arrays[1])) == scores(by_path[1:2])  # one (H, W, 3)
  assert scores(det(files[2])) == scores(by_path[2:3])  # one path
  floats = [a.astype(np.float32) for a in arrays]
  assert scores(det(floats)) == scores(by_path)
  # A loaded file scores like the fit in memory.
  assert scores(Detector.load(path)(files)) == scores(by_path)
  for a, b in zip(det(arrays), by_path):
    np.testing.assert_array_equal(a.map, b.map)


def test_rotated_jpeg_as_a_pil_image_scores_like_its_file(fitted, tmp_path):
  _, _, _, det, files = fitted
  img = Image.open(files[0]).convert("RGB")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: displayed turned 90 degrees clockwise
  path = tmp_path / "rotated.jpg"
  img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
  (want,) = det(str(path))
  assert det(Image.open(path))[0].score == want.score
  assert want.size == (64, 64)


def test_an_oversized_file_is_refused_from_its_header(fitted, tmp_path):
  _, _, _, det, _ = fitted
  path = tmp_path / "huge.png"
  Image.new("L", (9000, 9000)).save(path)
  with pytest.raises(ValueError, match="huge.png.*beyond the limit"):
    det(str(path))


def test_grayscale_array_scores_like_its_png(fitted, tmp_path):
  _, _, _, det, files = fitted
  gray = np.asarray(Image.open(files[0]).convert("L"))
  Image.fromarray(gray).save(tmp_path / "g.png")
  (want,) = det(str(tmp_path / "g.png"))
  assert det(gray)[0].score == want.score
  assert det(gray[..., None])[0].score == want.score


def test_results(fitted):
  _, model, _, det, files = fitted
  res = det(files)
  t, cal = model.image_threshold, model.calibration
  assert cal.image.source == "heldout" and cal.image.threshold == t
  for r in res:
    assert r.decision == ("anomalous" if r.score >= t else "normal")
    assert r.anomalous == (r.score >= t)
    want = float(calibration.normalise(cal.image, r.score))
    assert r.score_norm == want and 0.0 <= r.score_norm <= 1.0
    assert r.map.shape == (64, 64) and r.map.dtype == np.float32
    np.testing.assert_array_equal(r.map, r.input_map)  # 64 px: same size
    np.testing.assert_array_equal(
        r.map_norm, np.asarray(calibration.normalise(cal.pixel, r.map))
    )
    assert 0.0 <= r.map_norm.min() and r.map_norm.max() <= 1.0
  good = [r.score_norm for r, f in zip(res, files) if "/good/" in f]
  bad = [r.score_norm for r, f in zip(res, files) if "/good/" not in f]
  assert max(good) < 0.5 <= min(bad)
  # Other thresholds: the calibration follows them.
  other = det.with_thresholds(res[0].score)
  assert other.calibration.image.threshold == res[0].score
  assert other(files[0])[0].score_norm == 0.5 and other.scorer is det.scorer
  assert det.calibration is model.calibration  # unchanged


def test_map_at_the_inputs_own_size(fitted):
  _, _, _, det, files = fitted
  big = np.asarray(Image.open(files[-1]).resize((96, 80), Image.BILINEAR))
  (r,) = det(big)  # short side 80 -> 64, long 96 -> 76, centre crop 64
  assert r.input_map.shape == (64, 64) and r.map.shape == (80, 96)
  inside = ~np.isnan(r.map)
  cols = np.nonzero(inside.all(axis=0))[0]
  assert inside.any(axis=0).sum() == cols.size  # whole columns
  assert (cols[0], cols[-1]) == (8, 87) and inside.all(axis=1).sum() == 0
  assert inside[:, cols].all()
  assert np.nanmax(r.map) <= r.input_map.max() + 1e-6


@pytest.mark.parametrize("size", [(80, 96), (64, 64), (50, 120)])
def test_input_size_map_inverts_the_geometry(size):
  """A coordinate ramp through resize + crop and back lands where it was."""
  h, w = size
  ramp = np.tile(np.arange(w, dtype=np.float32), (h, 1))
  for pre in (
      data.Preprocess(resize=64, crop=48),
      data.Preprocess(resize=None, crop=None, input_size=(32, 40)),
  ):
    if pre.whole_image and abs((w / h) / (40 / 32) - 1) > 0.05:
      continue
    net = np.asarray(pre.geometry(Image.fromarray(ramp, mode="F")))
    back = detector.input_size_map(net, pre, (h, w))
    assert back.shape == (h, w)
    ok = ~np.isnan(back)
    rect = np.outer(ok.any(axis=1), ok.any(axis=0))
    assert ok.any() and np.array_equal(ok, rect)  # one rectangle
    err = np.abs(back - ramp)[ok]
    assert np.median(err) < 1.0 and err.max() < 0.1 * w


def test_forward_fn_matches_the_detector(fitted):
  _, model, _, det, files = fitted
  fn, params = det.forward_fn()
  arrays = np.stack([np.asarray(Image.open(f)) for f in files])
  out = jax.jit(fn)(params, arrays.astype(np.float32))
  res = det(arrays)
  np.testing.assert_allclose(out["image_score"], scores(res), rtol=1e-5)
  np.testing.assert_allclose(
      out["image_score_norm"], [r.score_norm for r in res], atol=1e-5
  )
  maps = np.stack([r.input_map for r in res])
  assert out["map"].shape == maps.shape == (len(files), *model.image_size)
  np.testing.assert_allclose(
      out["map"], maps, rtol=1e-5, atol=1e-5 * maps.max()
  )
  np.testing.assert_allclose(
      out["map_norm"], np.stack([r.input_map_norm for r in res]), atol=1e-5
  )


def test_one_compiled_network_for_every_input_size(fitted):
  _, _, _, det, files = fitted
  det(files[0])
  before = features.embed_jit._cache_size()  # pylint: disable=protected-access
  img = np.asarray(Image.open(files[1]))
  for shape in ((80, 96), (70, 70), (64, 100)):
    det(np.asarray(Image.fromarray(img).resize(shape[::-1])))
  det([files[0]] * (det.batch_size + 1))  # two batches, the last padded
  assert features.embed_jit._cache_size() == before  # pylint: disable=protected-access


def test_bad_inputs(fitted, tmp_path):
  _, _, _, det, files = fitted
  img = np.asarray(Image.open(files[0]))
  with pytest.raises(
      ValueError, match=r"image 0: float pixels look like \[0, 1\]"
  ):
    det(img / 255.0)
  with pytest.raises(ValueError, match="must be finite, in"):
    det(np.full((64, 64, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"got shape \(64, 64, 5\)"):
    det(np.zeros((64, 64, 5), np.uint8))
  with pytest.raises(ValueError, match="image 1: expected a path"):
    det([img, 3])
  with pytest.raises(ValueError, match="does not exist: .*missing.png"):
    det(str(tmp_path / "missing.png"))
  with pytest.raises(ValueError, match="no images given"):
    det([])
  with pytest.raises(ValueError, match="aspect ratio"):
    det(np.zeros((2, 400, 3), np.uint8))
  with pytest.raises(ValueError, match="from_fit takes a FittedModel"):
    Detector.from_fit(42)


README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_readme_detector_snippet_runs(capsys):
  with open(README, encoding="utf-8") as f:
    text = f.read()
  section = text.split("## Use a fitted model from Python", 1)[1]
  section = section.split("\n## ", 1)[0]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len([l for l in code.splitlines() if l.strip()]) <= 22
  ns = {}
  exec(compile(code, README, "exec"), ns)  # pylint: disable=exec-used
  r, model = ns["r"], ns["model"]
  assert isinstance(model, model_io.FittedModel)
  assert r.decision == "anomalous" and 0.5 <= r.score_norm <= 1.0
  assert r.map.shape == (64, 64) and r.map_norm.max() <= 1.0
  assert "normalised: anomalous" in capsys.readouterr().out
