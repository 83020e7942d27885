"""End to end: fit on a folder (CLI), predict in a new process (CLI), determinism."""

import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import model_scoring
from softpatch_jax import predict
from softpatch_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The documented fit command, at test size.
FIT_FLAGS = [
    "--config.data.resize=64",
    "--config.data.crop=64",
    "--config.data.batch_size=4",
    "--config.data.num_workers=1",
    "--config.threshold.folds=3",
]

from _testutil import fit_config  # pylint: disable=g-bad-import-order


def run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  return res


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("e2e")
  synthetic.make_mvtec_like(
      tmp / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0
  )
  train_dir = tmp / "data" / "synth" / "train" / "good"
  res = run([
      "softpatch_jax.main",
      "--config",
      "configs/fit_folder.py",
      f"--config.data.train_dir={train_dir}",
      *FIT_FLAGS,
      f"--workdir={tmp / 'out'}",
  ])
  assert "model saved to" in res.stdout
  return tmp, tmp / "out" / model_io.MODEL_FILENAME


def test_predict_cli_in_new_process(fitted):
  tmp, model_path = fitted
  test_dir = tmp / "data" / "synth" / "test"
  out = tmp / "pred"
  res = run([
      "softpatch_jax.predict",
      f"--model={model_path}",
      f"--input={test_dir}",
      "--recursive",
      f"--output={out}",
      "--save_maps",
      "--save_masks",
  ])
  assert "predict [" in res.stderr  # the progress bar
  rows = predict.read_predictions(out / "predictions.csv")
  assert len(rows) == 2 + 2 * 2
  model = model_io.load_model(str(model_path))
  for r in rows:
    assert r["decision"] in ("anomalous", "normal") and not r["error"]
    assert r["threshold"] == model.image_threshold
    assert r["decision"] == (
        "anomalous" if r["score"] >= r["threshold"] else "normal"
    )
    # The normalised score: in [0, 1], 0.5 at the threshold.
    assert 0.0 <= r["normalised_score"] <= 1.0
    assert (r["normalised_score"] >= 0.5) == (r["decision"] == "anomalous")
    heat = Image.open(out / r["heatmap"])
    assert heat.size == (64, 64) and heat.mode == "RGB"
    amap = np.load(out / r["map"])
    assert amap.shape == (64, 64) and amap.dtype == np.float32
    assert np.asarray(Image.open(out / r["mask"])).max() in (0, 255)
    assert r["score"] >= amap.max() - 1e-3  # maps are blurred patch scores
  good = [r["score"] for r in rows if "good" in r["path"]]
  bad = [r["score"] for r in rows if "good" not in r["path"]]
  assert min(bad) > max(good)
  assert sorted(os.listdir(out)) == [
      "heatmaps",
      "maps",
      "masks",
      "predictions.csv",
  ]

  # The same model in this process gives the same scores bit for bit.
  res2 = predict.predict(
      model,
      str(test_dir),
      str(tmp / "pred2"),
      predict.PredictOptions(recursive=True, progress=False),
  )
  assert [r["score"] for r in res2["rows"]] == [r["score"] for r in rows]
  assert [r["path"] for r in res2["rows"]] == [r["path"] for r in rows]


def test_fit_is_deterministic(fitted):
  """Same config and seed: a second fit (this process) is bit-identical."""
  tmp, model_path = fitted
  first = model_io.load_model(str(model_path))
  fit.fit_and_save(
      fit_config(tmp / "data/synth/train/good"), str(tmp / "again")
  )
  second = model_io.load_model(str(tmp / "again"))
  np.testing.assert_array_equal(first.bank_features, second.bank_features)
  np.testing.assert_array_equal(first.bank_weights, second.bank_weights)
  np.testing.assert_array_equal(
      first.heldout_image_scores, second.heldout_image_scores
  )
  assert first.thresholds == second.thresholds
  files = [str(p) for p in sorted((tmp / "data/synth/test/blob").iterdir())]
  quiet = predict.PredictOptions(heatmaps=False, progress=False)
  a = predict.predict(first, files, str(tmp / "pa"), quiet)
  b = predict.predict(second, files, str(tmp / "pb"), quiet)
  assert [r["score"] for r in a["rows"]] == [r["score"] for r in b["rows"]]


def test_threshold_overrides(fitted, tmp_path):
  tmp, model_path = fitted
  model = model_io.load_model(str(model_path))
  files = [
      str(tmp / "data/synth/test/good/000.png"),
      str(tmp / "data/synth/test/scratch/000.png"),
  ]
  quiet = predict.PredictOptions(heatmaps=False, progress=False)
  res = predict.predict(
      model,
      files,
      str(tmp_path / "a"),
      dataclasses.replace(quiet, threshold=0.0),
  )
  assert all(r["decision"] == "anomalous" for r in res["rows"])
  res = predict.predict(
      model,
      files,
      str(tmp_path / "b"),
      dataclasses.replace(quiet, threshold=1e30, pixel_threshold=1e30),
  )
  assert all(r["decision"] == "normal" for r in res["rows"])
  assert all(r["anomalous_pixel_fraction"] == 0.0 for r in res["rows"])
  # Re-derive from the stored held-out scores: quantile 1.0 = their max.
  res = predict.predict(
      model,
      files,
      str(tmp_path / "c"),
      dataclasses.replace(quiet, quantile=1.0),
  )
  assert res["image_threshold"] == pytest.approx(
      float(model.heldout_image_scores.max())
  )


def test_options_from_flags():
  """Every PredictOptions field but progress is a flag of the same name."""
  values = dict(
      batch_size=3,
      num_workers=1,
      save_maps=True,
      save_masks=True,
      heatmaps=False,
      threshold=1.0,
      pixel_threshold=2.0,
      quantile=0.5,
      recursive=True,
      strict=True,
      memory_budget_mb=8.0,
      backbone_weights="w.pth",
  )
  fields = {f.name for f in dataclasses.fields(predict.PredictOptions)}
  assert set(values) == fields - {"progress"}
  opts = predict.options_from_flags(types.SimpleNamespace(**values))
  assert opts == predict.PredictOptions(**values)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    predict.PredictOptions(batch_size=0)
  with pytest.raises(ValueError, match="memory_budget_mb must be >= 0"):
    predict.PredictOptions(memory_budget_mb=-1)


def test_memory_budget_comes_from_the_model(fitted, tmp_path):
  _, model_path = fitted
  model = model_io.load_model(str(model_path))
  (scorer,) = model_scoring.bank_scorers(model).values()
  assert model.scoring.memory_budget_mb == 1024.0  # the config's default
  assert scorer.search.name != "chunked"  # a tiny bank: one scan
  small = dataclasses.replace(
      model, scoring=dataclasses.replace(model.scoring, memory_budget_mb=1e-4)
  )
  (scorer,) = model_scoring.bank_scorers(small).values()
  assert scorer.search.name == "chunked"
  (scorer,) = model_scoring.bank_scorers(small, memory_budget_mb=0).values()
  assert scorer.search.name != "chunked"  # 0: no limit


def test_cli_reports_bad_model_clearly(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  (tmp_path / "x.png").write_bytes(b"")
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "softpatch_jax.predict",
          f"--model={tmp_path / 'missing.softpatch'}",
          f"--input={tmp_path}",
          f"--output={tmp_path / 'out'}",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert res.returncode == 1
  assert "error: model file does not exist" in res.stderr
  assert not os.path.exists(tmp_path / "out")
