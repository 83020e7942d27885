"""Hostile runs: concurrent runs, killed runs, broken or hidden inputs.

Covers: a second predict into a folder in use, stale locks (corrupt ones
in test_io_utils.py), the lock released on errors, temp files left by
killed writers, fit listing every unreadable training image at once, hidden
files, symlink loops.
"""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import data
from softpatch_jax import fit
from softpatch_jax import io_utils
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import predict
from softpatch_jax.data import files as data_files

QUIET = predict.PredictOptions(progress=False)


def random_model():
  # A backbone that needs no weights file: the predict CLI can rebuild it.
  return _testutil.random_model(
      m=20,
      d=8,
      backbone=model_meta.BackboneRecord(
          "efficientnet_lite0", ("stage3", "stage5"), "random", 0, "random:0"
      ),
  )


def write_images(folder, names, seed=0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in names:
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / name)


def unreadable_inputs(tmp_path):
  """A folder whose one image cannot be decoded: predict runs, scores none."""
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "a.png").write_bytes(b"not a png")
  return inputs


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def snapshot(folder):
  return {
      os.path.relpath(os.path.join(d, f), folder): (
          open(os.path.join(d, f), "rb").read()
      )
      for d, _, files in os.walk(folder)
      for f in files
  }


def test_second_predict_into_a_folder_in_use_is_refused(tmp_path):
  model = model_io.save_model(str(tmp_path / "m.softpatch"), random_model())
  inputs = unreadable_inputs(tmp_path)
  out = tmp_path / "out"
  (out / "heatmaps").mkdir(parents=True)
  (out / "predictions.csv").write_text("path,score\nfirst.png,1.0\n")
  (out / "heatmaps" / "first.png").write_bytes(b"first run's heatmap")
  with io_utils.folder_lock(str(out), "output folder") as lock:
    before = snapshot(out)
    with open(lock, encoding="utf-8") as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid()
    expected = (
        f"{out} is in use by another run (pid {os.getpid()} on host "
        f"{socket.gethostname()} since {holder['started']}); wait for it to "
        "finish, or choose another output folder"
    )
    with pytest.raises(ValueError) as e:
      predict.predict(model, str(inputs), str(out), QUIET)
    assert str(e.value) == expected
    res = _testutil.run_predict_cli(model, inputs, out)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "error: " + expected
    # The first run's files, its lock included, are as they were.
    assert snapshot(out) == before
  assert not os.path.exists(lock)  # released by its holder on exit


def test_lock_is_released_when_predict_fails(tmp_path):
  model = random_model()
  model.heldout_image_scores = model.heldout_pixel_max = None
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="--quantile needs a model fitted"):
    predict.predict(
        model,
        str(unreadable_inputs(tmp_path)),
        str(out),
        predict.PredictOptions(quantile=0.9, progress=False),
    )
  assert os.listdir(out) == []


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
  out = tmp_path / "out"
  out.mkdir()
  lock = out / io_utils.LOCK_FILENAME
  pid = dead_pid()
  lock.write_text(
      json.dumps({
          "pid": pid,
          "host": socket.gethostname(),
          "started": "2024-01-01T00:00:00+00:00",
          "command": "predict (killed)",
      })
  )
  with caplog.at_level(logging.WARNING):
    res = predict.predict(
        random_model(),
        str(unreadable_inputs(tmp_path)),
        str(out),
        QUIET,
    )
  assert (
      f"taking over the stale lock {lock} (pid {pid} no longer runs on this "
      "host)"
      in caplog.text
  )
  assert res["n_images"] == 1 and os.path.exists(res["csv"])
  assert not lock.exists()


def test_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
  out = tmp_path / "out"
  (out / "heatmaps").mkdir(parents=True)
  # atomic_open names its temp file after the writing process.
  with io_utils.atomic_open(str(out / "x.txt")) as f:
    f.write("x")
    (tmp,) = [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert re.fullmatch(rf"\.x\.txt\.{os.getpid()}\.[a-z0-9_]{{8}}\.tmp", tmp)
  dead, live = dead_pid(), os.getpid()
  gone = [
      f".predictions.csv.{dead}.abcd1234.tmp",
      f"heatmaps/.a.png.{dead}.k_9zzzzz.tmp",
      "heatmaps/.b.png.oldstyle.tmp",  # no pid, two hours old
  ]
  kept = [
      f"heatmaps/.c.png.{live}.abcd1234.tmp",
      ".d.png.newstyle.tmp",  # no pid, just written
      "notes.tmp",
  ]
  for name in gone + kept:
    (out / name).write_bytes(b"partial")
  two_hours_ago = time.time() - 2 * 3600
  os.utime(out / gone[2], (two_hours_ago, two_hours_ago))
  predict.predict(
      random_model(), str(unreadable_inputs(tmp_path)), str(out), QUIET
  )
  for name in gone:
    assert not (out / name).exists(), name
  for name in kept:
    assert (out / name).exists(), name


def test_fit_lists_every_unreadable_training_image_and_writes_nothing(
    tmp_path,
):
  train = tmp_path / "train"
  write_images(train, ["ok_0.png", "ok_1.png", "ok_2.png"])
  bad = [train / n for n in ("bad_empty.png", "bad_junk.png", "bad_trunc.png")]
  bad[0].write_bytes(b"")
  bad[1].write_bytes(b"GIF? no")
  bad[2].write_bytes((train / "ok_0.png").read_bytes()[:200])
  workdir = tmp_path / "work"
  c = _testutil.fit_config(
      train,
      folds=None,
      **{
          "backbone.weights": "random",
          "threshold.method": "manual",
          "threshold.value": 1.0,
      },
  )
  with pytest.raises(ValueError) as e:
    fit.fit_and_save(c, str(workdir))
  lines = str(e.value).splitlines()
  assert lines[0] == "3 training image(s) cannot be read:"
  assert lines[1] == f"  {bad[0]}: Image file is empty (0 bytes)"
  assert lines[2].startswith(
      f"  {bad[1]}: cannot decode image file: UnidentifiedImageError: "
  )
  assert lines[3].startswith(f"  {bad[2]}: cannot decode image file: ")
  assert len(lines) == 4
  assert os.listdir(workdir) == []  # no model, no summary, no lock


def test_unreadable_list_is_capped():
  failed = [
      (f"/d/{i:02d}.png", f"Image file is empty: /d/{i:02d}.png")
      for i in range(25)
  ]
  lines = data_files.unreadable_message(failed, "training image").splitlines()
  assert lines[0] == "25 training image(s) cannot be read:"
  assert lines[1] == "  /d/00.png: Image file is empty"
  assert len(lines) == 22 and lines[-1] == "  ... and 5 more"


def test_hidden_files_are_skipped_with_their_count(tmp_path, caplog):
  train = tmp_path / "train"
  write_images(train, ["0.png", "1.png", "2.png"])
  (train / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  (train / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  (train / ".hidden.png").write_bytes(b"")
  write_images(train / ".thumbnails", ["t.png"])
  c = _testutil.fit_config(
      train,
      folds=None,
      **{
          "backbone.weights": "random",
          "threshold.method": "manual",
          "threshold.value": 1.0,
      },
  )
  with caplog.at_level(logging.INFO):
    summary = fit.fit_and_save(c, str(tmp_path / "work"))
  assert summary["n_train"] == 3
  assert f"skipped 3 hidden file(s) in {train}" in caplog.text
  assert sorted(os.listdir(tmp_path / "work")) == [
      fit.SUMMARY_FILENAME,
      model_io.MODEL_FILENAME,
  ]
  caplog.clear()
  inputs = tmp_path / "in"
  write_images(inputs, ["a.png", "b.png"], seed=1)
  (inputs / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  with caplog.at_level(logging.INFO):
    res = predict.predict(
        summary["model"], str(inputs), str(tmp_path / "out"), QUIET
    )
  assert [os.path.basename(r["path"]) for r in res["rows"]] == [
      "a.png",
      "b.png",
  ]
  assert res["n_errors"] == 0
  assert f"skipped 1 hidden file(s) in {inputs}" in caplog.text


def test_symlink_loop_is_named(tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  a, b = inputs / "a.png", inputs / "b.png"
  os.symlink(b, a)
  os.symlink(a, b)
  os.symlink(inputs / "nowhere.png", inputs / "dangling.png")
  with pytest.raises(ValueError) as e:
    predict.list_inputs([str(a)])
  assert str(e.value) == f"input file is a symlink loop: {a}"
  with pytest.raises(ValueError) as e:
    predict.list_inputs([str(inputs / "dangling.png")])
  assert str(e.value) == f"input file does not exist: {inputs}/dangling.png"
  with pytest.raises(ValueError) as e:
    data.open_image(str(a))
  assert str(e.value) == f"Image file is a symlink loop: {a}"
  # Listed from a folder, a loop becomes an error row that names it.
  res = predict.predict(
      random_model(), str(inputs), str(tmp_path / "out"), QUIET
  )
  errors = {os.path.basename(r["path"]): r["error"] for r in res["rows"]}
  assert errors == {
      "a.png": f"Image file is a symlink loop: {a}",
      "b.png": f"Image file is a symlink loop: {b}",
      "dangling.png": f"Image file does not exist: {inputs}/dangling.png",
  }
