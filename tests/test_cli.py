"""The `softpatch` command: subcommands, --help, --config by name."""

import os
import subprocess
import sys

import pytest

from softpatch_jax import cli
from softpatch_jax import cli_flags


def _run(*args, env=None):
  return subprocess.run(
      [sys.executable, *args],
      capture_output=True,
      text=True,
      check=False,
      timeout=300,
      env=dict(os.environ, **(env or {})),
  )


def test_config_names_resolve_to_packaged_files(tmp_path):
  path = cli_flags.config_path("default")
  assert os.path.isfile(path) and path.startswith(cli_flags.CONFIG_DIR)
  assert cli_flags.resolve_config("default") == path
  assert cli_flags.resolve_config("default.py") == path
  # The layout before the configs moved into the package.
  assert cli_flags.resolve_config("configs/default.py") == path
  sweep = cli_flags.config_path("experiments/noise_sweep")
  assert cli_flags.resolve_config("experiments/noise_sweep:synthetic") == (
      sweep + ":synthetic"
  )
  own = tmp_path / "mine.py"
  own.write_text("def get_config(): return None\n")
  assert cli_flags.resolve_config(str(own)) == str(own)
  assert cli_flags.resolve_config(f"{own}:x") == f"{own}:x"
  names = cli_flags.config_names()
  assert {"default", "fit_folder", "experiments/noise_sweep"} <= set(names)
  assert not any("__init__" in n for n in names)


def test_unknown_config_is_one_clear_error():
  with pytest.raises(ValueError, match="no config of that name.*default"):
    cli_flags.resolve_config("no_such_config")


def test_argv_rewriting():
  path = cli_flags.config_path("synthetic")
  assert cli_flags.resolve_argv(["--config", "synthetic", "--workdir=w"]) == [
      f"--config={path}",
      "--workdir=w",
  ]
  assert cli_flags.resolve_argv(["--config=synthetic", "--config.seed=1"]) == [
      f"--config={path}",
      "--config.seed=1",
  ]


def test_subcommands_set_mode_and_default_config():
  argv = cli.command_argv("fit", ["--workdir=w"])
  assert argv == [
      "softpatch fit",
      "--config=fit_folder",
      "--workdir=w",
      "--config.mode=fit",
  ]
  argv = cli.command_argv("evaluate", ["--config=synthetic"])
  assert (
      argv[1] == "--config=synthetic" and argv[-1] == "--config.mode=evaluate"
  )
  assert cli.command_argv("predict", ["--model=m"]) == [
      "softpatch predict",
      "--model=m",
  ]
  assert set(cli.COMMANDS) == {
      "fit",
      "evaluate",
      "predict",
      "experiments",
      "export",
  }


@pytest.mark.parametrize(
    "sub", [[], ["--help"], *[[c, "--help"] for c in cli.COMMANDS]]
)
def test_help_exits_zero_without_jax(sub):
  # -X importtime lists every module imported, on stderr.
  res = _run("-X", "importtime", "-m", "softpatch_jax.cli", *sub)
  if not sub:
    assert res.returncode == 2 and "commands:" in res.stdout
    return
  assert res.returncode == 0, res.stderr[-2000:]
  assert "commands:" in res.stdout or "flags:" in res.stdout
  imported = {
      line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
  }
  assert "jax" not in imported and "softpatch_jax.main" not in imported


def test_subcommand_help_lists_its_flags():
  res = _run("-m", "softpatch_jax.cli", "predict", "--help")
  for flag in ("--model", "--input", "--output", "--compilation_cache"):
    assert flag in res.stdout
  res = _run("-m", "softpatch_jax.cli", "evaluate", "--help")
  assert "--config" in res.stdout and "experiments/noise_sweep" in res.stdout


def test_program_help_exits_zero():
  res = _run("-m", "softpatch_jax.experiments", "--help")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--workdir" in res.stdout


def test_bad_config_name_is_one_line():
  res = _run("-m", "softpatch_jax.cli", "evaluate", "--config=nope")
  assert res.returncode == 1
  assert res.stderr.strip().startswith("error: --config=nope")
  assert "Traceback" not in res.stderr


def test_unknown_command():
  res = _run("-m", "softpatch_jax.cli", "train")
  assert res.returncode == 2 and "unknown command 'train'" in res.stderr


_PROBE = """
import sys
from absl import app
from absl import logging
import jax
from softpatch_jax import cli_flags


def main(argv):
  if argv[1] == "command":
    cli_flags.verbose_logging()  # what every command's main does
  else:
    logging.set_verbosity(logging.INFO)
  print(jax.devices())


app.run(main)
"""


def test_cpu_run_has_no_tpu_backend_line():
  # jax logs each backend it cannot start at INFO on first device use; the
  # commands log at INFO, and keep jax's backend probe at WARNING.
  env = {"JAX_PLATFORMS": ""}
  plain = _run("-c", _PROBE, "plain", env=env)
  command = _run("-c", _PROBE, "command", env=env)
  assert plain.returncode == 0 and command.returncode == 0, command.stderr
  if "Unable to initialize backend" not in plain.stderr:
    pytest.skip("this jax logs no backend probe line here")
  assert "Unable to initialize backend" not in command.stderr
