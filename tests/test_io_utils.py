"""io_utils: atomic writes, the folder lock, JSON and CSV helpers."""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from softpatch_jax import io_utils


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "out.txt"
  io_utils.write_text(str(path), "first")
  io_utils.write_text(str(path), "second")
  assert path.read_text() == "second"
  assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "out.txt"
  io_utils.write_text(str(path), "old")
  with pytest.raises(RuntimeError, match="boom"):
    with io_utils.atomic_open(str(path)) as f:
      f.write("half of the new")
      raise RuntimeError("boom")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]
  # A write that never started (no file ever existed) leaves nothing either.
  with pytest.raises(KeyboardInterrupt):
    with io_utils.atomic_open(str(tmp_path / "new.bin"), "wb"):
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["out.txt"]


def test_unwritable_destination_is_one_value_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match=f"cannot write {blocker}/x.txt"):
    io_utils.write_text(str(blocker / "x.txt"), "x")
  with pytest.raises(ValueError, match="is not writable"):
    io_utils.ensure_writable_dir(str(blocker / "sub"))
  assert io_utils.ensure_writable_dir(str(tmp_path / "d")) == str(
      tmp_path / "d"
  )
  assert os.listdir(tmp_path / "d") == []  # the probe file is gone


def test_atomic_dir(tmp_path):
  target = tmp_path / "figs"
  with io_utils.atomic_dir(str(target)) as tmp:
    open(os.path.join(tmp, "a.png"), "w").close()
  assert os.listdir(target) == ["a.png"]
  with pytest.raises(RuntimeError):
    with io_utils.atomic_dir(str(target)) as tmp:
      open(os.path.join(tmp, "b.png"), "w").close()
      raise RuntimeError
  assert os.listdir(target) == ["a.png"]  # the old folder, untouched
  assert sorted(os.listdir(tmp_path)) == ["figs"]


def test_json_of_numpy_values(tmp_path):
  obj = {
      "f": np.float32(0.5),
      "i": np.int64(3),
      "a": np.arange(3),
      "t": (1, 2),
      "s": {4},
      "other": object,
  }
  plain = io_utils.jsonable(obj)
  assert plain["f"] == 0.5 and plain["i"] == 3 and plain["a"] == [0, 1, 2]
  assert plain["t"] == [1, 2] and plain["s"] == [4]
  assert plain["other"] == str(object)
  io_utils.write_json(str(tmp_path / "x.json"), obj)
  assert json.loads((tmp_path / "x.json").read_text()) == plain


def test_csv_round_trip(tmp_path):
  path = tmp_path / "r.csv"
  rows = [
      {"name": "a", "score": 0.123456789, "n": 3, "extra": "ignored"},
      {"name": "b", "score": float("nan"), "n": None},
  ]
  io_utils.write_csv(str(path), rows, ["name", "score", "n"])
  with open(path, newline="", encoding="utf-8") as f:
    back = list(csv.DictReader(f))
  assert back == [
      {"name": "a", "score": "0.123457", "n": "3"},
      {"name": "b", "score": "n/a", "n": "n/a"},
  ]


def test_folder_lock_refuses_a_second_run_and_is_released(tmp_path):
  with io_utils.folder_lock(str(tmp_path), "workdir") as lock:
    rec = json.loads(open(lock, encoding="utf-8").read())
    assert rec["pid"] == os.getpid()
    with pytest.raises(ValueError, match="is in use by another run") as e:
      with io_utils.folder_lock(str(tmp_path), "workdir"):
        pass
    assert "choose another workdir" in str(e.value)
    assert os.path.exists(lock)  # the refused run left the lock alone
  assert not os.path.exists(lock)
  with pytest.raises(RuntimeError):
    with io_utils.folder_lock(str(tmp_path)):
      raise RuntimeError
  assert os.listdir(tmp_path) == []  # released on errors too


def test_corrupt_lock_is_refused_while_young_taken_over_when_old(tmp_path):
  lock = tmp_path / io_utils.LOCK_FILENAME
  lock.write_text("{not json")
  lock_age = time.time() - 5
  os.utime(lock, (lock_age, lock_age))
  with pytest.raises(ValueError) as e:
    with io_utils.folder_lock(str(tmp_path), "output folder"):
      pass
  assert str(e.value) == (
      f"{tmp_path} has an unreadable lock file {lock} (0 minute(s) old); if "
      "no run is using this folder, delete that file"
  )
  assert lock.read_text() == "{not json"
  old = time.time() - io_utils.CORRUPT_LOCK_STALE_S - 60
  os.utime(lock, (old, old))
  with io_utils.folder_lock(str(tmp_path), "output folder"):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert not lock.exists()


def test_pid_alive():
  assert io_utils.pid_alive(os.getpid())
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  assert not io_utils.pid_alive(proc.pid)
  assert not io_utils.pid_alive(2**80)  # not a possible pid


def test_save_npy_and_image(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  io_utils.save_npy(str(tmp_path / "a.npy"), a)
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
  io_utils.save_image(str(tmp_path / "b.jpg"), Image.new("RGB", (4, 3)))
  with Image.open(tmp_path / "b.jpg") as img:
    assert img.format == "JPEG" and img.size == (4, 3)
