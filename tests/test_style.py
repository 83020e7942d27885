"""One formatter over the whole tree: pyink with the pyproject.toml config."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tree_is_pyink_formatted():
  res = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--diff", "."],
      cwd=ROOT,
      capture_output=True,
      text=True,
  )
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
