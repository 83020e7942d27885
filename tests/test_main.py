"""main: the mode dispatch and its one-line errors."""

import subprocess
import sys

import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import evaluate
from softpatch_jax import fit
from softpatch_jax import main


def test_modes():
  assert main.MODES == {"evaluate": evaluate.run_options, "fit": fit.fit_model}
  c = _testutil.load_config("synthetic")
  c.mode = "train"
  with pytest.raises(ValueError, match="config.mode must be one of"):
    main.run_mode(c, "unused")


def test_bad_path_is_one_line_error(tmp_path):
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "softpatch_jax.main",
          "--config=mvtec",
          f"--config.data.root={tmp_path}/missing",
          f"--workdir={tmp_path}/w",
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert res.returncode == 1
  assert res.stderr.strip().startswith("error:"), res.stderr[-2000:]
  assert "Traceback" not in res.stderr
