"""Hostile outputs: nothing predict or a study wrote before is lost.

Covers (issue 24): the output folder inside or equal to the input folder
(case 4), 254-byte file names (12), non-UTF-8 file names (13), predict
killed with SIGKILL mid-run and stale heatmaps (14), and a study rerun with
fewer methods (15).
"""

import csv
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import defaults
from softpatch_jax import experiments
from softpatch_jax import io_utils
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import predict
from softpatch_jax import predict_files

QUIET = predict.PredictOptions(progress=False, recursive=True)


def random_model():
  # A backbone that needs no weights file: the predict CLI can rebuild it.
  m = _testutil.random_model(
      m=20,
      d=8,
      grid=(8, 8),
      backbone=model_meta.BackboneRecord(
          "efficientnet_lite0", ("stage3", "stage5"), "random", 0, "random:0"
      ),
  )
  m.image_size = (64, 64)  # the map at the input's size, for the heatmap
  return m


@pytest.fixture(scope="module")
def model():
  return random_model()


def write_images(folder, names, seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in names:
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(os.path.join(folder, name))


def read_csv_bytes(path):
  """The rows of a CSV read as strict UTF-8 (a non-UTF-8 byte fails)."""
  with open(path, newline="", encoding="utf-8", errors="strict") as f:
    return list(csv.DictReader(f))


# --------------------------------------------------------------------------
# Case 4: the output folder is never scanned as input.


def test_output_folder_equal_to_input_is_not_rescanned(tmp_path, model, caplog):
  folder = str(tmp_path / "imgs")
  write_images(folder, ["a.png", "b.png", "c.png", "d.png"])
  first = predict.predict(model, folder, folder, QUIET)
  assert first["n_images"] == 4
  assert len(os.listdir(os.path.join(folder, "heatmaps"))) == 4
  with caplog.at_level(logging.WARNING):
    again = predict.predict(model, folder, folder, QUIET)
  assert again["n_images"] == 4  # not 8: the heatmaps are not inputs
  assert [os.path.basename(r["path"]) for r in again["rows"]] == [
      "a.png",
      "b.png",
      "c.png",
      "d.png",
  ]
  hm = os.path.join(folder, "heatmaps")
  assert (
      f"skipping 4 file(s) in the output folder {folder} (results of "
      "earlier runs are never scored as inputs): "
      + ", ".join(os.path.join(hm, f"{n}.png") for n in "abcd")
  ) in caplog.text


def test_output_folder_inside_input_is_not_scanned(tmp_path, model, caplog):
  folder = tmp_path / "imgs"
  write_images(str(folder), ["a.png", "b.png"])
  write_images(str(folder / "sub"), ["c.png"])
  out = folder / "results"
  # An image someone left in the output folder is skipped too.
  write_images(str(out), ["stray.png"])
  predict.predict(model, str(folder), str(out), QUIET)
  with caplog.at_level(logging.WARNING):
    res = predict.predict(model, str(folder), str(out), QUIET)
  assert sorted(os.path.relpath(r["path"], folder) for r in res["rows"]) == [
      "a.png",
      "b.png",
      os.path.join("sub", "c.png"),
  ]
  assert f"skipping 4 file(s) in the output folder {out} " in caplog.text
  # A listed file is not a scan: it is scored wherever it is.
  stray = str(out / "stray.png")
  assert predict.predict(model, [stray], str(out), QUIET)["n_images"] == 1


# --------------------------------------------------------------------------
# Cases 12 and 13: long and non-UTF-8 names never abort the run.


def test_254_byte_file_name_gets_a_safe_output_name(tmp_path, model):
  folder = tmp_path / "imgs"
  long_name = "x" * 250 + ".png"  # 254 bytes: legal on Linux
  write_images(str(folder), [long_name, "ok.png"])
  out = tmp_path / "out"
  res = predict.predict(model, str(folder), str(out), QUIET)
  assert res["n_errors"] == 0 and res["n_images"] == 2
  rows = read_csv_bytes(out / "predictions.csv")
  assert [os.path.basename(r["path"]) for r in rows] == ["ok.png", long_name]
  heatmap = rows[1]["heatmap"]
  stem = os.path.splitext(os.path.basename(heatmap))[0]
  assert len(stem.encode()) <= predict_files.MAX_NAME_BYTES
  assert stem.startswith("x" * 100) and stem != "x" * 250
  assert os.path.isfile(out / heatmap)
  assert rows[0]["heatmap"] == os.path.join("heatmaps", "ok.png")
  # Any atomic write, whatever the name's length, fits a folder entry.
  target = str(tmp_path / ("y" * 254))
  io_utils.write_text(target, "z")
  assert open(target).read() == "z"


def test_non_utf8_file_name_still_gets_its_csv(tmp_path, model):
  folder = tmp_path / "imgs"
  write_images(str(folder), ["a.png", "b.png"])
  bad = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
  os.rename(folder / "b.png", os.path.join(folder, bad))
  out = tmp_path / "out"
  res = predict.predict(model, str(folder), str(out), QUIET)
  assert res["n_errors"] == 0 and res["n_images"] == 2
  rows = read_csv_bytes(out / "predictions.csv")
  assert [os.path.basename(r["path"]) for r in rows] == [
      "a.png",
      "caf\\xe9.png",
  ]
  assert rows[1]["heatmap"].startswith(os.path.join("heatmaps", "caf_"))
  assert os.path.isfile(out / rows[1]["heatmap"])
  # The name is valid UTF-8 and unique.
  rows[1]["heatmap"].encode("utf-8")
  assert rows[1]["heatmap"] != rows[0]["heatmap"]


def test_safe_names():
  assert predict_files.safe_name("plain") == "plain"
  bad = predict_files.safe_name(os.fsdecode(b"a\xff"))
  assert bad.startswith("a_") and len(bad) == 2 + 9
  assert predict_files.output_names(
      [os.fsdecode(b"d/a\xff.png"), os.fsdecode(b"d/a\xfe.png")]
  ) != [bad, bad]


# --------------------------------------------------------------------------
# Case 14: a killed run never loses the previous complete CSV.


def test_kill_9_mid_predict_keeps_the_previous_csv(tmp_path):
  model_path = model_io.save_model(
      str(tmp_path / "m.softpatch"), random_model()
  )
  small, big = tmp_path / "small", tmp_path / "big"
  write_images(str(small), ["a.png", "b.png"])
  write_images(str(big), [f"i{k:03d}.png" for k in range(150)], seed=1)
  out = tmp_path / "out"
  res = _testutil.run_predict_cli(model_path, small, out)
  assert res.returncode == 0, res.stderr[-2000:]
  csv_path = out / "predictions.csv"
  partial = out / predict_files.PARTIAL_FILENAME
  before = csv_path.read_bytes()
  assert not partial.exists()

  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "softpatch_jax.predict",
          f"--model={model_path}",
          f"--input={big}",
          f"--output={out}",
          "--batch_size=1",
          "--num_workers=1",
      ],
      cwd=_testutil.ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  try:
    n = 0
    while proc.poll() is None:
      if partial.exists():
        n = len(partial.read_text(encoding="utf-8").splitlines())
        if n >= 4:  # the header and at least three rows
          break
      time.sleep(0.02)
    assert proc.poll() is None, "predict finished before it could be killed"
    assert n >= 4, "no rows in the partial CSV"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  # The previous complete CSV is untouched; the killed run's rows so far
  # are in the partial file, each a whole row of the big folder.
  assert csv_path.read_bytes() == before
  rows = read_csv_bytes(partial)
  assert 3 <= len(rows) < 150
  assert rows[0]["path"] == str(big / "i000.png")
  assert all(r["decision"] in ("normal", "anomalous") for r in rows[:-1])

  # A complete rerun (the killed run's lock is stale) replaces the CSV,
  # removes the partial file and the heatmaps that are no longer named.
  res = _testutil.run_predict_cli(model_path, small, out)
  assert res.returncode == 0, res.stderr[-2000:]
  assert not partial.exists()
  assert len(read_csv_bytes(csv_path)) == 2
  assert sorted(os.listdir(out / "heatmaps")) == ["a.png", "b.png"]


def test_stale_heatmaps_are_removed_after_a_complete_run(tmp_path, model):
  folder = tmp_path / "imgs"
  write_images(str(folder), ["a.png", "b.png", "c.png"])
  out = tmp_path / "out"
  opts = predict.PredictOptions(progress=False, save_maps=True)
  predict.predict(model, str(folder), str(out), opts)
  (out / "heatmaps" / "notes.txt").write_text("mine")
  os.remove(folder / "c.png")
  res = predict.predict(model, str(folder), str(out), opts)
  assert res["n_images"] == 2
  assert sorted(os.listdir(out / "heatmaps")) == ["a.png", "b.png", "notes.txt"]
  assert sorted(os.listdir(out / "maps")) == ["a.npy", "b.npy"]
  assert not (out / predict_files.PARTIAL_FILENAME).exists()


def test_failed_run_keeps_the_previous_csv(tmp_path, model, monkeypatch):
  folder = tmp_path / "imgs"
  write_images(str(folder), ["a.png", "b.png"])
  out = tmp_path / "out"
  predict.predict(model, str(folder), str(out), QUIET)
  before = (out / "predictions.csv").read_bytes()

  real, calls = predict_files.write_heatmap, []

  def fail_second(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      raise ValueError("disk full")
    return real(*args, **kwargs)

  monkeypatch.setattr(predict_files, "write_heatmap", fail_second)
  with pytest.raises(ValueError, match="disk full"):
    predict.predict(model, str(folder), str(out), QUIET)
  assert (out / "predictions.csv").read_bytes() == before
  partial = out / predict_files.PARTIAL_FILENAME
  assert [r["path"] for r in read_csv_bytes(partial)] == [str(folder / "a.png")]
  # A run that fails before its first row leaves no partial file.
  calls.append(1)
  with pytest.raises(ValueError, match="disk full"):
    predict.predict(model, str(folder), str(out), QUIET)
  assert (out / "predictions.csv").read_bytes() == before
  assert not partial.exists()


# --------------------------------------------------------------------------
# Case 15: a study rerun with fewer methods keeps the other methods' rows.


def _fake_run_cell(cell, stacks, workdir):
  del stacks, workdir
  return [
      dict(category=cell.category, method=m, image_auroc=0.5 + 0.1 * i)
      for i, m in enumerate(cell.config.methods.split(","))
  ]


def test_study_rerun_with_fewer_methods_keeps_rows(
    tmp_path, monkeypatch, caplog
):
  b = defaults.study_base("synthetic")
  b.methods = "softpatch_lof,patchcore"
  config = defaults.experiment_config(b, "seed=0", "tiny", "image_auroc")
  config.study.figures = False
  monkeypatch.setattr(experiments, "run_cell", _fake_run_cell)
  workdir = str(tmp_path / "w")
  experiments.run(config, workdir)
  path = os.path.join(workdir, "results.csv")
  assert [r["method"] for r in read_csv_bytes(path)] == [
      "softpatch_lof",
      "patchcore",
  ]
  config.base.methods = "patchcore"
  with caplog.at_level(logging.INFO):
    out = experiments.run(config, workdir)
  assert out["ran"] == 1
  rows = read_csv_bytes(path)
  assert sorted(r["method"] for r in rows) == ["patchcore", "softpatch_lof"]
  assert (
      "cell seed=0,category=synth: keeping 1 row(s) of method(s) "
      "softpatch_lof from an earlier run (not run now) in results.csv"
  ) in caplog.text
  # The table counts the methods of the current configuration only.
  assert "softpatch_lof" not in out["table"]
