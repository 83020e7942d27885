"""Model artifact: bit-exact round trip, version and backbone checks."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from flax import serialization

from softpatch_jax import backbones
from softpatch_jax import calibration
from softpatch_jax import features
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import model_scoring
from softpatch_jax import scoring
from softpatch_jax.data import open_image
from softpatch_jax.data import synthetic


import _testutil  # pylint: disable=g-bad-import-order
from _testutil import fit_config  # pylint: disable=g-bad-import-order

random_model = _testutil.random_model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A real model fitted on a tiny synthetic folder (EfficientNet-Lite0)."""
  tmp = tmp_path_factory.mktemp("fit")
  synthetic.make_mvtec_like(
      tmp / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0
  )
  work = tmp / "work"
  fit.fit_and_save(fit_config(tmp / "data/synth/train/good"), str(work))
  return tmp, work / model_io.MODEL_FILENAME


def test_round_trip_scores_bit_exact(fitted):
  tmp, path = fitted
  model = model_io.load_model(str(path))
  bb = model_scoring.backbone_for(model)
  ex = model_scoring.embedder_for(model, bb, batch_size=4)
  pre = model_scoring.preprocess_for(model)
  imgs = np.stack([
      pre.image_array(open_image(str(p)))
      for p in sorted((tmp / "data/synth/test/scratch").iterdir())
  ])
  feats = ex(imgs)
  s1, m1 = model_scoring.score_features(model, feats)
  # Save the loaded model again and reload: every array and score identical.
  path2 = str(tmp / "copy.softpatch")
  model_io.save_model(path2, model)
  model2 = model_io.load_model(path2, backbone=bb)
  s2, m2 = model_scoring.score_features(model2, feats)
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
  np.testing.assert_array_equal(model.bank_features, model2.bank_features)
  assert model.thresholds == model2.thresholds
  assert model.config == model2.config
  # The artifact holds the backbone, preprocessing, records and thresholds.
  assert model.backbone.name == "efficientnet_lite0"
  assert model.backbone.weights_id == bb.weights_id
  assert model.preprocess["crop"] == 64
  assert model.thresholds.method == "quantile"
  assert model.image_threshold is not None and model.pixel_threshold is not None
  assert model.config["data"]["train_dir"].endswith("train/good")  # info only
  assert model.embed == model2.embed and model.scoring == model2.scoring
  assert model.scoring.soft_weight is True  # softpatch_lof's choice, resolved
  assert model.batch_size == 4  # the fitting batch size
  assert model.format_version == model_io.FORMAT_VERSION == 4
  # The calibration was computed at fit time from the held-out scores.
  assert model.calibration == model2.calibration
  assert model.calibration.image.source == "heldout"
  assert model.calibration.image.threshold == model.image_threshold
  assert model.calibration.pixel.threshold == model.pixel_threshold


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_random_model(tmp_path, seed):
  model = random_model(seed)
  path = model_io.save_model(str(tmp_path / model_io.MODEL_FILENAME), model)
  back = model_io.load_model(str(tmp_path))  # a directory works too
  for name in (
      "bank_features",
      "bank_weights",
      "heldout_image_scores",
      "heldout_pixel_max",
  ):
    np.testing.assert_array_equal(getattr(model, name), getattr(back, name))
  assert back.config == model.config and back.grid == model.grid
  feats = (
      np.random.default_rng(seed).normal(size=(2, 16, 16)).astype(np.float32)
  )
  for a, b in zip(
      model_scoring.score_features(model, feats),
      model_scoring.score_features(back, feats),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp files


def test_format_version_mismatch(tmp_path):
  payload = serialization.msgpack_restore(model_io.to_bytes(random_model()))
  payload["format_version"] = model_io.FORMAT_VERSION + 1
  p = tmp_path / "future.softpatch"
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="format version"):
    model_io.load_model(str(p))


@pytest.mark.parametrize("data", [b"", b"not a model", b"\x93\x01\x02"])
def test_not_a_model_file(tmp_path, data):
  p = tmp_path / "bad.softpatch"
  p.write_bytes(data)
  with pytest.raises(ValueError, match="bad.softpatch"):
    model_io.load_model(str(p))


def test_truncated_model_file(tmp_path):
  raw = model_io.to_bytes(random_model())
  p = tmp_path / "cut.softpatch"
  p.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    model_io.load_model(str(p))
  with pytest.raises(ValueError, match="does not exist"):
    model_io.load_model(str(tmp_path / "missing.softpatch"))
  with pytest.raises(ValueError, match="no model.softpatch"):
    model_io.load_model(str(tmp_path))


def test_backbone_mismatch_refused(fitted, tmp_path):
  _, path = fitted
  model = model_io.load_model(str(path))
  orig = backbones.efficientnet_lite.imagenet_weights_path("efficientnet_lite0")
  # A moved copy of the same weights file is accepted.
  moved = tmp_path / "lite0.pth"
  shutil.copy(orig, moved)
  bb = model_scoring.backbone_for(model, weights=str(moved))
  assert bb.weights_id == model.backbone.weights_id
  model_io.load_model(str(path), backbone=bb)
  # Other weights for the same architecture (one trailing byte changes the
  # file's identity) are refused, at load time and when rebuilding.
  other = tmp_path / "other.pth"
  shutil.copy(orig, other)
  with open(other, "ab") as f:
    f.write(b"\0")
  other_bb = backbones.load(
      "efficientnet_lite0", weights=str(other), layers=("stage3", "stage5")
  )
  with pytest.raises(ValueError, match="weights mismatch"):
    model_io.load_model(str(path), backbone=other_bb)
  with pytest.raises(ValueError, match="weights mismatch"):
    model_scoring.backbone_for(model, weights=str(other))


def test_backbone_random_seeds_differ():
  """Two 'random' seeds are two different weight identities."""
  model = random_model()
  model.backbone = dataclasses.replace(
      model.backbone, weights="random", seed=0, weights_id="random:0"
  )

  class Fake:
    name, layers, weights_id = (
        "efficientnet_lite0",
        ("stage3", "stage5"),
        "random:1",
    )

  with pytest.raises(ValueError, match="'random:0'.*'random:1'"):
    model_io.check_backbone(model, Fake())
  Fake.weights_id = "random:0"
  model_io.check_backbone(model, Fake())


def test_backbone_name_and_taps_checked():
  model = random_model()

  class Fake:
    name, layers, weights_id = "resnet18", ("layer2", "layer3"), "abc"

  with pytest.raises(ValueError, match="fitted with 'efficientnet_lite0'"):
    model_io.check_backbone(model, Fake())
  Fake.name, Fake.layers = "efficientnet_lite0", ("stage3",)
  with pytest.raises(ValueError, match="taps"):
    model_io.check_backbone(model, Fake())
  Fake.layers = ("stage3", "stage5")
  model_io.check_backbone(model, Fake())


def test_nonfinite_bank_refused(tmp_path):
  model = random_model()
  model.bank_features[3, 2] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    model_io.save_model(str(tmp_path / "nan.softpatch"), model)
  assert not os.listdir(tmp_path)
  # A file that got NaNs some other way is refused at load time.
  payload = serialization.msgpack_restore(model_io.to_bytes(random_model()))
  weights = np.array(payload["arrays"]["bank_weights"])
  weights[0] = np.inf
  payload["arrays"]["bank_weights"] = weights
  p = tmp_path / "inf.softpatch"
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="non-finite"):
    model_io.load_model(str(p))


def test_save_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "m.softpatch")
  model_io.save_model(path, random_model(0))
  before = open(path, "rb").read()

  def interrupted(fd):
    raise KeyboardInterrupt  # dies after the bytes went to the temp file

  monkeypatch.setattr(os, "fsync", interrupted)
  with pytest.raises(KeyboardInterrupt):
    model_io.save_model(path, random_model(1))
  monkeypatch.undo()
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["m.softpatch"]
  # Re-running overwrites cleanly.
  model_io.save_model(path, random_model(1))
  np.testing.assert_array_equal(
      model_io.load_model(path).bank_features, random_model(1).bank_features
  )


def v1_bytes(model, config):
  """`model` written in format 1, as softpatch_jax wrote it before records:
  flat soft_weight / blur_sigma / features, the budget in the config."""
  payload = serialization.msgpack_restore(model_io.to_bytes(model))
  meta = json.loads(payload["meta"])
  meta = {
      "method": meta["method"],
      "soft_weight": meta["scoring"]["soft_weight"],
      "grid": meta["grid"],
      "image_size": meta["image_size"],
      "blur_sigma": meta["scoring"]["blur_sigma"],
      "backbone": meta["backbone"],
      "preprocess": meta["preprocess"],
      "features": meta["embed"],
      "thresholds": meta["thresholds"],
      "config": config,
      "fit_info": {"n_train": 7},
  }
  payload["meta"] = json.dumps(meta)
  payload["format_version"] = 1
  return serialization.msgpack_serialize(payload)


def test_format_1_file_is_read_into_records(tmp_path):
  model = random_model(3)
  config = {
      "data": {"batch_size": 4},
      "scoring": {"memory_budget_mb": 0.5, "search": "dense"},
  }
  p = tmp_path / "old.softpatch"
  p.write_bytes(v1_bytes(model, config))
  old = model_io.load_model(str(p))
  assert old.format_version == 1
  assert old.embed == features.EmbedOptions(3, 16, 16)
  assert old.scoring == scoring.ScoringOptions(
      soft_weight=True, blur_sigma=2.0, memory_budget_mb=0.5, search="dense"
  )
  assert old.batch_size == 4 and old.backbone == model.backbone
  assert old.thresholds == model.thresholds and old.fit_info["n_train"] == 7
  feats = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
  for a, b in zip(
      model_scoring.score_features(model, feats),
      model_scoring.score_features(old, feats),
  ):
    np.testing.assert_array_equal(a, b)
  # A calibration rebuilt from its held-out scores and thresholds.
  assert old.calibration == model.calibration
  # Saving it again writes format 3, with the same records.
  model_io.save_model(str(tmp_path / "new.softpatch"), old)
  new = model_io.load_model(str(tmp_path / "new.softpatch"))
  assert new.format_version == 4 and new.scoring == old.scoring
  assert new.calibration == old.calibration


def test_format_1_defaults(tmp_path):
  # A format 1 config without a budget meant no limit; no batch size: 16;
  # a backbone record without a seed: seed 0.
  model = random_model()
  payload = serialization.msgpack_restore(v1_bytes(model, {}))
  meta = json.loads(payload["meta"])
  del meta["backbone"]["seed"]
  payload["meta"] = json.dumps(meta)
  p = tmp_path / "old.softpatch"
  p.write_bytes(serialization.msgpack_serialize(payload))
  old = model_io.load_model(str(p))
  assert old.scoring.memory_budget_mb == 0.0 and old.scoring.search == "auto"
  assert old.batch_size == 16 and old.backbone.seed == 0
  # Format 1 checks name the format 1 fields.
  del meta["soft_weight"]
  payload["meta"] = json.dumps(meta)
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="'soft_weight' is missing"):
    model_io.load_model(str(p))


def test_model_needs_a_resolved_soft_weight():
  with pytest.raises(ValueError, match="soft_weight must be true or false"):
    random_model(soft=None)


def v2_bytes(model, drop_heldout=False):
  """`model` written in format 2: no calibration record."""
  payload = serialization.msgpack_restore(model_io.to_bytes(model))
  meta = json.loads(payload["meta"])
  del meta["calibration"]
  payload["meta"] = json.dumps(meta)
  payload["format_version"] = 2
  if drop_heldout:
    del payload["arrays"]["heldout_image_scores"]
    del payload["arrays"]["heldout_pixel_max"]
  return serialization.msgpack_serialize(payload)


def test_format_2_file_gets_a_calibration(tmp_path):
  model = random_model(4)
  p = tmp_path / "v2.softpatch"
  p.write_bytes(v2_bytes(model))
  old = model_io.load_model(str(p))
  assert old.format_version == 2
  cal = calibration.for_thresholds(
      1.5, 1.25, model.heldout_image_scores, model.heldout_pixel_max
  )
  assert old.calibration == cal == model.calibration
  assert cal.image.source == cal.pixel.source == "heldout"
  feats = np.random.default_rng(1).normal(size=(2, 16, 16)).astype(np.float32)
  for a, b in zip(
      model_scoring.score_features(model, feats),
      model_scoring.score_features(old, feats),
  ):
    np.testing.assert_array_equal(a, b)
  # Without held-out scores: from the thresholds alone.
  p.write_bytes(v2_bytes(model, drop_heldout=True))
  bare = model_io.load_model(str(p))
  assert bare.calibration == calibration.for_thresholds(1.5, 1.25)
  assert bare.calibration.image.xs == (0.0, 1.5, 3.0)


def test_format_3_calibration_round_trip_and_checks(tmp_path):
  model = random_model(5)
  model.calibration = calibration.Calibration(
      calibration.ScoreMap((1.0, 1.5, 4.0), threshold=1.5),
      calibration.ScoreMap((0.0, 1.25, 9.0), threshold=1.25),
  )
  path = model_io.save_model(str(tmp_path / "m.softpatch"), model)
  assert model_io.load_model(path).calibration == model.calibration
  payload = serialization.msgpack_restore(model_io.to_bytes(model))
  meta = json.loads(payload["meta"])
  meta["calibration"]["image"]["xs"] = [1.0, 1.5, float("nan")]
  payload["meta"] = json.dumps(meta)
  p = tmp_path / "bad.softpatch"
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(
      ValueError,
      match=(
          "bad.softpatch: bad model metadata: "
          "calibration: anchor must be a finite number"
      ),
  ):
    model_io.load_model(str(p))
  meta["calibration"]["image"]["xs"] = [1.0, 1.6, 4.0]
  meta["calibration"]["image"]["threshold"] = 1.6
  payload["meta"] = json.dumps(meta)
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(
      ValueError,
      match="bad.softpatch: .*calibration maps " r"thresholds \(1.6, 1.25\)",
  ):
    model_io.load_model(str(p))
  del meta["calibration"]
  payload["meta"] = json.dumps(meta)
  p.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="'calibration' is missing"):
    model_io.load_model(str(p))
