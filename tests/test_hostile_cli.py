"""Hostile CLI use and degenerate fits (issue 24, cases 6 and 18-20).

Covers: a config typo, a zero embedding size and an infinite memory budget
as one line (exit status 1, no traceback; the traceback only with
--verbosity=1), any uncaught error made one line, the wrong-architecture
weights error kept short, and training sets of copies of one image.
"""

import logging
import os

import numpy as np
from PIL import Image
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import detector
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import model_meta
from softpatch_jax import thresholds


def softpatch(*args):
  """`softpatch <args>` in a new process -> CompletedProcess."""
  return _testutil.run_module("softpatch_jax.cli", *args)


def one_error_line(proc):
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_config_typo_is_one_line_with_the_hint(tmp_path):
  proc = softpatch("fit", "--config.data.trian_dir=x", f"--workdir={tmp_path}")
  assert proc.stderr.strip() == (
      "error: --config.data.trian_dir: the config has no field 'trian_dir'; "
      "did you mean 'train_dir'? (--verbosity=1 shows the traceback)"
  )
  assert proc.returncode == 1
  assert os.listdir(tmp_path) == []  # nothing written


def test_config_typo_traceback_with_verbosity(tmp_path):
  proc = softpatch(
      "fit",
      "--config.data.trian_dir=x",
      "--verbosity=1",
      f"--workdir={tmp_path}",
  )
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "train_dir" in proc.stderr


def test_zero_target_embed_dim_is_one_line(tmp_path):  # case 18
  proc = softpatch(
      "fit",
      f"--config.data.train_dir={tmp_path}",
      "--config.features.target_embed_dim=0",
      f"--workdir={tmp_path / 'w'}",
  )
  assert one_error_line(proc) == (
      "error: config.features.target_embed_dim must be an integer >= 1, got 0"
  )
  assert not (tmp_path / "w").exists()


def test_infinite_memory_budget_is_one_line(tmp_path):  # case 19
  model = _testutil.random_model(
      m=20,
      d=8,
      backbone=model_meta.BackboneRecord(
          "efficientnet_lite0", ("stage3", "stage5"), "random", 0, "random:0"
      ),
  )
  path = model_io.save_model(str(tmp_path / "m.softpatch"), model)
  (tmp_path / "in").mkdir()
  Image.new("RGB", (64, 64)).save(tmp_path / "in" / "a.png")
  proc = softpatch(
      "predict",
      f"--model={path}",
      f"--input={tmp_path / 'in'}",
      f"--output={tmp_path / 'out'}",
      "--memory_budget_mb=inf",
  )
  assert one_error_line(proc) == (
      "error: config.scoring.memory_budget_mb must be a finite number in "
      "[0, inf], got inf"
  )
  assert not (tmp_path / "out" / "predictions.csv").exists()


def test_uncaught_error_is_one_line(capsys, monkeypatch):
  def boom(argv):
    del argv
    raise RuntimeError("first line\n  second line")

  monkeypatch.setattr(cli_flags, "debug_requested", lambda argv=None: False)
  with pytest.raises(SystemExit) as e:
    cli_flags.guarded(boom)(["prog"])
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      "error: first line; second line (RuntimeError; --verbosity=1 shows "
      "the traceback)\n"
  )
  monkeypatch.setattr(cli_flags, "debug_requested", lambda argv=None: True)
  with pytest.raises(RuntimeError, match="first line"):
    cli_flags.guarded(boom)(["prog"])


def test_verbosity_is_read_before_parsing():
  assert cli_flags.argv_asks_debug(["p", "--verbosity=1"])
  assert cli_flags.argv_asks_debug(["p", "-v", "2"])
  assert not cli_flags.argv_asks_debug(["p", "--verbosity=0"])
  assert not cli_flags.argv_asks_debug(["p"])


def test_wrong_architecture_weights_error_is_short(tmp_path):
  torch = pytest.importorskip("torch")
  state = {f"block{i}.conv.weight": torch.zeros(3, 3) for i in range(300)}
  path = tmp_path / "other.pth"
  torch.save(state, path)
  with pytest.raises(ValueError) as e:
    backbones.load("efficientnet_lite0", weights=str(path))
  msg = str(e.value)
  assert len(msg) < 1500, len(msg)
  assert "\n" not in msg
  assert msg.startswith(
      f"{path}: weights do not fit the model (is it the weights of another "
      "architecture?); missing keys ("
  )
  assert "unexpected keys (300): block0.conv.weight" in msg
  assert "... and 295 more" in msg


# --------------------------------------------------------------------------
# Degenerate training sets (case 6).


def write_copies(folder, n, noise=0, seed=0):
  folder.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  for i in range(n):
    delta = rng.integers(-noise, noise + 1, base.shape) if noise else 0
    img = np.clip(base.astype(int) + delta, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"{i:02d}.png")


@pytest.mark.parametrize("noise", [0, 1])
def test_copies_of_one_image_are_refused(tmp_path, noise):
  write_copies(tmp_path / "train", 12, noise)
  c = _testutil.fit_config(tmp_path / "train", folds=None)
  with pytest.raises(ValueError) as e:
    fit.fit_and_save(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert msg.startswith(
      "the 12 training images are (nearly) identical: they differ from each "
      "other by "
  )
  assert msg.endswith(
      "of the patch spread within an image (at least 1% is needed); their "
      "held-out threshold would not flag real defects: add varied normal "
      "images, or set --config.threshold.method=manual "
      "--config.threshold.value=<score>"
  )
  assert not (tmp_path / "w" / model_io.MODEL_FILENAME).exists()


def test_copies_with_a_manual_threshold_warn_and_rank_a_defect_higher(
    tmp_path, caplog
):
  write_copies(tmp_path / "train", 4)
  c = _testutil.fit_config(
      tmp_path / "train",
      folds=None,
      **{"threshold.method": "manual", "threshold.value": 100.0},
  )
  with caplog.at_level(logging.WARNING):
    model = fit.fit(c, str(tmp_path / "w"))
  assert "the 4 training images are (nearly) identical" in caplog.text
  assert model.thresholds.image == 100.0
  # The user's threshold is kept; the model still ranks a defect above
  # the image it was fitted on, and flags it.
  good = np.asarray(Image.open(tmp_path / "train" / "00.png"))
  bad = good.copy()
  bad[24:40, 24:40] = 255
  normal, defect = detector.Detector.from_fit(model)(np.stack([good, bad]))
  assert defect.score > normal.score and defect.anomalous


def test_fewer_than_three_images_warn(tmp_path, caplog):
  folder = tmp_path / "train"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(folder / f"{i}.png")
  c = _testutil.fit_config(folder, folds=None, methods="patchcore")
  with caplog.at_level(logging.WARNING):
    fit.fit(c, str(tmp_path / "w"))
  assert "fit: only 2 training image(s)" in caplog.text


def test_image_spread():
  rng = np.random.default_rng(0)
  one = rng.normal(size=(1, 16, 8))
  assert thresholds.image_spread(np.repeat(one, 5, axis=0)) < 1e-12
  assert thresholds.image_spread(rng.normal(size=(5, 16, 8))) > 0.5
  assert thresholds.degenerate_message(5, 0.5) is None
