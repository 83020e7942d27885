"""The `softpatch` command: one entry point for every program.

  softpatch evaluate --config=default --workdir out/default
  softpatch fit --config.data.train_dir=/path/to/images --workdir out/model
  softpatch predict --model out/model --input /path/to/images --output out/p
  softpatch experiments --config=experiments/noise_sweep --workdir out/sweep
  softpatch export --model out/model --format onnx --out out/model.onnx

Each command runs the same program as its `python -m` form
(softpatch_jax.main, .predict, .experiments, .export) with the same flags;
`evaluate` and `fit` set config.mode. `softpatch <command> --help` lists the
command's flags. The program's module is imported only to run, so a --help
costs no jax import.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from typing import Callable, List, Optional, Sequence


from softpatch_jax import cli_flags


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: its program module, flags and what it adds to argv."""

  module: str
  define: Callable[[], None]
  summary: str
  mode: Optional[str] = None  # forced config.mode
  default_config: Optional[str] = None  # when --config is not given
  extra: Optional[str] = None  # the extra a missing package points to


COMMANDS = {
    "evaluate": Command(
        "softpatch_jax.main",
        cli_flags.define_main_flags,
        "Fit on each category's training split and evaluate on its test "
        "split (config.mode=evaluate; --config defaults to 'default').",
        mode="evaluate",
        default_config="default",
    ),
    "fit": Command(
        "softpatch_jax.main",
        cli_flags.define_main_flags,
        "Fit on a folder of images and save a model (config.mode=fit; "
        "--config defaults to 'fit_folder').",
        mode="fit",
        default_config="fit_folder",
    ),
    "predict": Command(
        "softpatch_jax.predict",
        cli_flags.define_predict_flags,
        "Score images with a saved model: scores, decisions, heatmaps, CSV.",
    ),
    "experiments": Command(
        "softpatch_jax.experiments",
        cli_flags.define_experiment_flags,
        "Run a study of the paper: results, tables, figures (resumable).",
    ),
    "export": Command(
        "softpatch_jax.export",
        cli_flags.define_export_flags,
        "Export a saved model as one ONNX or StableHLO file.",
        extra="export",
    ),
}


def usage() -> str:
  """The top-level help: the commands and what each one does."""
  lines = [__doc__.strip(), "", "commands:"]
  for name, c in COMMANDS.items():
    lines += textwrap.wrap(
        c.summary,
        79,
        initial_indent=f"  {name:<12} ",
        subsequent_indent=" " * 15,
    )
  return "\n".join(lines)


def command_argv(name: str, args: Sequence[str]) -> List[str]:
  """The program's argv for `softpatch <name> <args>`."""
  cmd = COMMANDS[name]
  argv = [f"softpatch {name}", *args]
  if cmd.default_config and not cli_flags.has_flag(args, "config"):
    argv.insert(1, f"--config={cmd.default_config}")
  if cmd.mode:
    argv.append(f"--config.mode={cmd.mode}")
  return argv


def load_main(cmd: Command) -> Callable[[List[str]], None]:
  """The program's absl main; a missing optional package is one line."""
  try:
    return importlib.import_module(cmd.module).main
  except ImportError as e:
    if cmd.extra is None:
      raise
    print(
        f"error: {e}; this command needs the '{cmd.extra}' extra: "
        f"pip install 'softpatch-jax[{cmd.extra}]'",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of the `softpatch` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in cli_flags.HELP_ARGS + ("help",):
    print(usage(), flush=True)
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    print(
        f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(2)
  cmd = COMMANDS[name]
  doc = f"usage: softpatch {name} [flags]\n\n{textwrap.fill(cmd.summary, 79)}"
  cli_flags.prepare(command_argv(name, argv[2:]), cmd.define, doc)
  cli_flags.run_app(load_main(cmd))


if __name__ == "__main__":
  main()
