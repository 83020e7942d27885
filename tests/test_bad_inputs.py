"""Issue 5 hardening: one test per bad-input case, through the fit / predict paths.

Every case ends in one clear ValueError (naming the file, value or shape) or
in a documented handling, and never leaves a partial output file.
"""

import copy
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import backbones
from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import features
from softpatch_jax import fit
from softpatch_jax import fitting
from softpatch_jax import methods
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import options
from softpatch_jax import predict
from softpatch_jax import predict_files
from softpatch_jax import scoring
from softpatch_jax import thresholds
from softpatch_jax.data import Preprocess, Sample, mvtec, noise, synthetic

D = 64  # feature width of the small test model


def fit_config(train_dir, **overrides):
  overrides.setdefault("features.pretrain_embed_dim", D)
  overrides.setdefault("features.target_embed_dim", D)
  return _testutil.fit_config(train_dir, folds=2, **overrides)


@pytest.fixture(scope="module")
def bb():
  return backbones.load(
      "efficientnet_lite0", weights="imagenet", layers=("stage3", "stage5")
  )


@pytest.fixture(scope="module")
def model(bb):
  """A small model with a random bank: enough to exercise predict's paths."""
  rng = np.random.default_rng(0)
  return model_io.FittedModel(
      bank_features=rng.normal(size=(300, D)).astype(np.float32),
      bank_weights=np.ones((300,), np.float32),
      method="patchcore",
      grid=(8, 8),
      image_size=(64, 64),
      backbone=model_meta.BackboneRecord.of(bb, "imagenet", 0),
      preprocess=Preprocess(
          resize=64, crop=64, mean=bb.mean, std=bb.std
      ).to_record(),
      embed=features.EmbedOptions(3, D, D),
      scoring=scoring.ScoringOptions(soft_weight=False, blur_sigma=4.0),
      thresholds=thresholds.ChosenThresholds(100.0, 80.0, "manual"),
      batch_size=4,
  )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  synthetic.make_mvtec_like(
      root / "d", n_train=5, n_test_good=2, n_test_defect=1, size=64, seed=2
  )
  return root / "d" / "synth"


def good_dir(images, tmp_path, n=5):
  """A fresh training folder with n good images."""
  d = tmp_path / "train"
  d.mkdir()
  for p in sorted((images / "train" / "good").iterdir())[:n]:
    (d / p.name).write_bytes(p.read_bytes())
  return d


def no_temp_files(path):
  for _, _, files in os.walk(path):
    assert not [f for f in files if f.endswith(".tmp")], files


def run_predict(model, bb, inputs, out, **kw):
  return predict.predict(
      model,
      inputs,
      str(out),
      predict.PredictOptions(progress=False, **kw),
      backbone=bb,
  )


# ---- truncated / corrupt / zero-byte image files ---------------------------


def test_corrupt_or_empty_training_image_fails_clearly(images, tmp_path):
  train = good_dir(images, tmp_path)
  raw = (train / "000.png").read_bytes()
  (train / "truncated.png").write_bytes(raw[: len(raw) // 2])
  c = fit_config(
      train, **{"threshold.method": "manual", "threshold.value": 1.0}
  )
  with pytest.raises(ValueError, match="truncated.png"):
    fit.fit_and_save(c, str(tmp_path / "w1"))
  (train / "truncated.png").unlink()
  (train / "zero.png").write_bytes(b"")
  with pytest.raises(
      ValueError, match=r"zero\.png: Image file is empty \(0 bytes\)"
  ):
    fit.fit_and_save(c, str(tmp_path / "w2"))
  for w in ("w1", "w2"):
    assert os.listdir(tmp_path / w) == []  # no model, no temp files


def test_corrupt_or_empty_input_image_is_an_error_row(
    model, bb, images, tmp_path
):
  inp = tmp_path / "in"
  inp.mkdir()
  good = (images / "test" / "good" / "000.png").read_bytes()
  (inp / "a_ok.png").write_bytes(good)
  (inp / "b_cut.png").write_bytes(good[: len(good) // 3])
  (inp / "c_zero.png").write_bytes(b"")
  (inp / "d_junk.jpg").write_bytes(b"this is not a jpeg")
  res = run_predict(model, bb, str(inp), tmp_path / "out")
  rows = {os.path.basename(r["path"]): r for r in res["rows"]}
  assert rows["a_ok.png"]["decision"] in ("anomalous", "normal")
  for name in ("b_cut.png", "c_zero.png", "d_junk.jpg"):
    assert rows[name]["decision"] == "error"
    assert name in rows[name]["error"]
  assert res["n_errors"] == 3
  csv_rows = predict.read_predictions(tmp_path / "out" / "predictions.csv")
  assert [r["decision"] for r in csv_rows].count("error") == 3
  assert os.listdir(tmp_path / "out" / "heatmaps") == ["a_ok.png"]
  # --strict: the first bad file stops the run; no predictions.csv.
  with pytest.raises(ValueError, match="b_cut.png"):
    run_predict(model, bb, str(inp), tmp_path / "strict", strict=True)
  assert not os.path.exists(tmp_path / "strict" / "predictions.csv")
  no_temp_files(tmp_path)


# ---- grayscale, RGBA, palette, 16-bit PNG / TIFF: converted -----------------


def test_image_modes_are_converted_not_rejected(model, bb, tmp_path):
  rng = np.random.default_rng(1)
  inp = tmp_path / "in"
  inp.mkdir()
  gray = rng.integers(0, 256, (70, 64), dtype=np.uint8)
  rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(gray).save(inp / "gray8.png")
  Image.fromarray(gray.astype(np.uint16) * 257).save(inp / "gray16.png")
  Image.fromarray(gray.astype(np.uint16) * 257).save(inp / "gray16.tif")
  Image.fromarray(rgb).save(inp / "rgb.png")
  alpha = rng.integers(0, 256, (64, 64, 1), dtype=np.uint8)
  Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(
      inp / "rgba.png"
  )
  pal = Image.fromarray(rgb).quantize(16)
  pal.save(inp / "palette.png")
  pal.convert("RGB").save(inp / "palette_as_rgb.png")
  assert Image.open(inp / "gray16.png").mode.startswith("I")
  assert Image.open(inp / "palette.png").mode == "P"
  res = run_predict(model, bb, str(inp), tmp_path / "out")
  s = {os.path.basename(r["path"]): r["score"] for r in res["rows"]}
  assert res["n_errors"] == 0 and all(np.isfinite(v) for v in s.values())
  # 16-bit is scaled by its bit depth: v*257 / 65535 * 255 == v.
  assert s["gray16.png"] == s["gray8.png"] == s["gray16.tif"]
  assert s["rgba.png"] == s["rgb.png"]  # alpha dropped
  assert s["palette.png"] == s["palette_as_rgb.png"]  # through the palette


# ---- a mask whose size differs from its image -------------------------------


def test_mask_size_mismatch(images, tmp_path):
  img = images / "test" / "blob" / "000.png"
  small = tmp_path / "mask.png"
  Image.new("L", (32, 32), 255).save(small)
  with pytest.raises(ValueError, match=r"mask.png has size 32x32.*64x64"):
    Preprocess(resize=64, crop=64).load_sample(
        Sample(str(img), 1, "blob", str(small))
    )
  # Through fitting: an F1 threshold from a val folder with a bad mask.
  val = tmp_path / "val" / "test"
  (val / "good").mkdir(parents=True)
  (val / "blob").mkdir()
  (tmp_path / "val" / "ground_truth" / "blob").mkdir(parents=True)
  for p in (images / "test" / "good").iterdir():
    (val / "good" / p.name).write_bytes(p.read_bytes())
  (val / "blob" / "000.png").write_bytes(img.read_bytes())
  Image.new("L", (32, 32), 255).save(
      tmp_path / "val" / "ground_truth" / "blob" / "000_mask.png"
  )
  c = fit_config(
      images / "train" / "good",
      **{"threshold.method": "f1", "threshold.val_dir": str(val)},
  )
  with pytest.raises(ValueError, match="000_mask.png has size 32x32"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / model_io.MODEL_FILENAME)


# ---- an empty folder, or a category without train/good ----------------------


def test_empty_folder(model, bb, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no training image files"):
    fit.fit_and_save(fit_config(tmp_path / "empty"), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="no input image files"):
    run_predict(model, bb, str(tmp_path / "empty"), tmp_path / "out")
  assert not os.path.exists(tmp_path / "w" / model_io.MODEL_FILENAME)
  assert not os.path.exists(tmp_path / "out")
  c = fit_config(tmp_path / "missing")
  with pytest.raises(ValueError, match="directory not found"):
    fit.fit_and_save(c, str(tmp_path / "w"))


def test_category_without_train_good(tmp_path):
  (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
  with pytest.raises(ValueError, match="train"):
    mvtec.load_category(str(tmp_path), "cat")
  c = fit_config(
      "",
      **{
          "data.dataset": "mvtec",
          "data.root": str(tmp_path),
          "data.categories": "cat",
      },
  )
  with pytest.raises(ValueError, match=r"cat.*train"):
    fit.fit_and_save(c, str(tmp_path / "w"))


# ---- non-image files in a folder: skipped with a warning listing them -------


def test_non_image_files_skipped_with_warning(
    model, bb, images, tmp_path, caplog
):
  train = good_dir(images, tmp_path, n=3)
  (train / "notes.txt").write_text("hello")
  (train / "labels.csv").write_text("a,b")
  from softpatch_jax.data import folder

  with caplog.at_level(logging.WARNING):
    tr, _ = folder.load_folder(str(train))
  assert len(tr) == 3
  assert "notes.txt" in caplog.text and "labels.csv" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    res = run_predict(model, bb, str(train), tmp_path / "out")
  assert res["n_images"] == 3
  assert "notes.txt" in caplog.text and "labels.csv" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    res = run_predict(
        model,
        bb,
        f"{train / '000.png'},{train / 'notes.txt'}",
        tmp_path / "out2",
    )
  assert res["n_images"] == 1 and "notes.txt" in caplog.text


# ---- a noise ratio that needs more anomalies than exist ---------------------


def test_noise_ratio_needs_more_anomalies(images, tmp_path):
  train, test = mvtec.load_category(str(images.parent), "synth")
  with pytest.raises(
      ValueError, match=r"needs 4 anomalous test images.*only 2 exist"
  ):
    noise.inject(
        train, test, noise.NoiseOptions(ratio=0.9, overlap=True, seed=0)
    )
  c = fit_config(images / "train" / "good", **{"noise.ratio": 0.5})
  with pytest.raises(ValueError, match="only 0 exist"):
    fit.fit_and_save(c, str(tmp_path / "w"))


# ---- lof_k >= number of training images -------------------------------------


def test_lof_k_at_least_number_of_images_is_clamped(caplog):
  """Documented handling: k becomes N-1 with a warning (sklearn's rule)."""
  feats = np.random.default_rng(0).normal(size=(4, 16, 8)).astype(np.float32)

  def bank_options(lof_k):
    return fitting.BankOptions(
        denoise=denoise.DenoiseOptions(lof_k=lof_k, noise_fraction=0.1),
        coreset=coreset.CoresetOptions(
            fraction=0.5, num_starts=2, projection_dim=8
        ),
        scoring=scoring.ScoringOptions(blur_sigma=1.0),
    )

  geometry = methods.BankGeometry((4, 4), (8, 8))
  key = jax.random.PRNGKey(0)
  with caplog.at_level(logging.WARNING):
    big, _ = fitting.fit_bank(
        feats, "softpatch_lof", key, bank_options(10), geometry
    )
  assert "lof_k=10 >= number of training images (4); using k=3" in caplog.text
  ref, _ = fitting.fit_bank(
      feats, "softpatch_lof", key, bank_options(3), geometry
  )
  np.testing.assert_array_equal(
      np.asarray(big.weights), np.asarray(ref.weights)
  )


# ---- a coreset ratio outside (0, 1] -----------------------------------------


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5, float("nan")])
def test_coreset_ratio_outside_unit_interval(frac, tmp_path):
  c = fit_config(tmp_path / "does_not_matter", **{"coreset.fraction": frac})
  with pytest.raises(ValueError, match=r"coreset.fraction must be .*\(0, 1\]"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # checked before anything else
  c.coreset.fraction = 1.0
  options.from_config(c)


# ---- a training set of 1 or 2 images ----------------------------------------


def test_one_or_two_training_images(images, tmp_path):
  one = good_dir(images, tmp_path, n=1)
  with pytest.raises(
      ValueError, match=r"needs at least 2 training images.*got 1"
  ):
    fit.fit_and_save(fit_config(one), str(tmp_path / "w1"))
  (tmp_path / "train").rename(tmp_path / "t1")
  two = good_dir(images, tmp_path, n=2)
  with pytest.raises(
      ValueError,
      match="needs at least 3 training images.*got 2.*threshold.method=manual",
  ):
    fit.fit_and_save(fit_config(two), str(tmp_path / "w2"))
  # Documented handling: with a manual threshold two images fit (LOF k=1).
  c = fit_config(two, **{"threshold.method": "manual", "threshold.value": 5.0})
  fit.fit_and_save(c, str(tmp_path / "w3"))
  m = model_io.load_model(str(tmp_path / "w3"))
  assert m.fit_info["n_train"] == 2 and m.image_threshold == 5.0
  assert not os.path.exists(tmp_path / "w1" / model_io.MODEL_FILENAME)
  assert not os.path.exists(tmp_path / "w2" / model_io.MODEL_FILENAME)


# ---- NaN or inf in features (a broken checkpoint) ---------------------------


def nan_backbone(bb):
  broken = copy.copy(bb)
  leaves, tree = jax.tree_util.tree_flatten(bb.variables)
  leaves[3] = leaves[3] * np.float32(np.nan)
  broken.variables = jax.tree_util.tree_unflatten(tree, leaves)
  return broken


def test_nan_features_from_broken_checkpoint(
    model, bb, images, tmp_path, monkeypatch
):
  broken = nan_backbone(bb)
  with pytest.raises(ValueError, match="non-finite values"):
    run_predict(model, broken, str(images / "test" / "good"), tmp_path / "out")
  assert not os.path.exists(tmp_path / "out" / "predictions.csv")
  monkeypatch.setattr(
      backbones.BackboneOptions, "load", lambda self, seed=0: broken
  )
  c = fit_config(images / "train" / "good")
  with pytest.raises(ValueError, match="non-finite values"):
    fit.fit_and_save(c, str(tmp_path / "w"))
  assert os.listdir(tmp_path / "w") == []


# ---- a workdir that is not writable -----------------------------------------


def test_workdir_not_writable(model, bb, images, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  c = fit_config(images / "train" / "good")
  with pytest.raises(ValueError, match="not writable"):
    fit.fit_and_save(c, str(blocker / "out"))
  with pytest.raises(ValueError, match="not writable"):
    run_predict(model, bb, str(images / "test" / "good"), blocker / "pred")
  if os.geteuid() != 0:  # root ignores permission bits
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="not writable"):
      fit.fit_and_save(c, str(ro))


# ---- an interrupted run: re-running overwrites cleanly, atomic results ------


def test_interrupted_fit_then_rerun(images, tmp_path, monkeypatch):
  c = fit_config(images / "train" / "good")
  work = tmp_path / "w"

  def interrupted(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(fitting, "heldout_scores", interrupted)
  with pytest.raises(KeyboardInterrupt):
    fit.fit_and_save(c, str(work))
  assert os.listdir(work) == []  # nothing half-written
  monkeypatch.undo()
  fit.fit_and_save(c, str(work))
  assert sorted(os.listdir(work)) == [
      fit.SUMMARY_FILENAME,
      model_io.MODEL_FILENAME,
  ]
  model_io.load_model(str(work))


def test_interrupted_predict_then_rerun(
    model, bb, images, tmp_path, monkeypatch
):
  out = tmp_path / "out"
  inp = str(images / "test")
  first = run_predict(model, bb, inp, out, recursive=True)
  calls = []
  real = predict_files.write_one

  def dies_on_third(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*a, **k)

  monkeypatch.setattr(predict_files, "write_one", dies_on_third)
  with pytest.raises(KeyboardInterrupt):
    run_predict(model, bb, inp, out, recursive=True)
  # The previous complete CSV is kept; the interrupted run's rows so far
  # are in predictions.partial.csv. Every file that exists is complete.
  before = predict.read_predictions(out / "predictions.csv")
  assert [float(r["score"]) for r in before] == [
      r["score"] for r in first["rows"]
  ]
  assert os.path.exists(out / "predictions.partial.csv")
  for f in os.listdir(out / "heatmaps"):
    Image.open(out / "heatmaps" / f).load()
  no_temp_files(out)
  monkeypatch.undo()
  again = run_predict(model, bb, inp, out, recursive=True)
  assert [r["score"] for r in again["rows"]] == [
      r["score"] for r in first["rows"]
  ]
  assert len(predict.read_predictions(out / "predictions.csv")) == len(
      first["rows"]
  )


# ---- a memory bank bigger than the memory budget ----------------------------


def test_bank_over_memory_budget_is_scored_in_chunks(
    model, bb, images, tmp_path, monkeypatch
):
  inp = str(images / "test" / "good")
  full = run_predict(model, bb, inp, tmp_path / "a", memory_budget_mb=0)
  seen = []
  real = scoring._nearest  # pylint: disable=protected-access

  def spy(chunk, q, tile=None):
    seen.append(chunk.shape[0])
    return real(chunk, q, tile)

  monkeypatch.setattr(scoring, "_nearest", spy)
  budget = 50 * D * 4 / 2**20  # 50 rows of a 300-row bank
  small = run_predict(model, bb, inp, tmp_path / "b", memory_budget_mb=budget)
  assert seen and max(seen) <= 50  # never more than the budget at once
  np.testing.assert_allclose(
      [r["score"] for r in small["rows"]],
      [r["score"] for r in full["rows"]],
      rtol=1e-6,
  )
  assert [r["decision"] for r in small["rows"]] == [
      r["decision"] for r in full["rows"]
  ]
