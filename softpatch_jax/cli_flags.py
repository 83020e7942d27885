"""The command lines' flags, their --help, and --config by name.

The flags of every command (`softpatch <command>` and the `python -m
softpatch_jax.<program>` forms) are defined here, in a module that imports
only absl and ml_collections: `--help` prints them and exits 0 without
importing jax, and the program is imported only to run.

--config takes a path, or the name of a config shipped inside the package:
`--config=default` is softpatch_jax/configs/default.py, and
`--config=experiments/noise_sweep:synthetic` the packaged experiment with
its variant (the text after ':'). A path that exists is used as it is; a
path that does not, such as `configs/default.py` from before the configs
moved into the package, resolves by its name.
"""

from __future__ import annotations

import glob
import logging as pylogging
import os
import re
import sys
from typing import Callable, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort")
HELPFULL_ARGS = ("-helpfull", "--helpfull")
# jax logs each backend it cannot start (the TPU one on every CPU or GPU
# machine) at INFO; the command lines log their own progress at INFO.
QUIET_LOGGERS = ("jax._src.xla_bridge",)
_CONFIG_HELP = (
    " A path, or the name of a config shipped with the package ({names}),"
    " optionally followed by ':variant'."
)
# export.PLATFORMS, restated so that --help imports no jax (a test checks).
EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")


def config_names() -> List[str]:
  """The packaged configs by name: 'default', 'experiments/noise_sweep'..."""
  paths = glob.glob(os.path.join(CONFIG_DIR, "*.py"))
  paths += glob.glob(os.path.join(CONFIG_DIR, "experiments", "*.py"))
  names = [
      os.path.relpath(p, CONFIG_DIR)[:-3].replace(os.sep, "/") for p in paths
  ]
  return sorted(n for n in names if not n.endswith("__init__"))


def config_path(name: str) -> str:
  """The packaged config file of `name` ('default', 'experiments/timing')."""
  return os.path.join(CONFIG_DIR, *name.split("/")) + ".py"


def resolve_config(value: str) -> str:
  """--config's value with a packaged config's name replaced by its path.

  Raises:
    ValueError: neither a file nor the name of a packaged config.
  """
  path, sep, variant = value.partition(":")
  if os.path.exists(value) or os.path.exists(path):
    return value
  name = path.replace("\\", "/")
  for prefix in ("./", "softpatch_jax/", "configs/"):
    name = name[len(prefix) :] if name.startswith(prefix) else name
  name = name[:-3] if name.endswith(".py") else name
  if name and os.path.isfile(config_path(name)):
    return config_path(name) + sep + variant
  raise ValueError(
      f"--config={value}: no such file, and no config of that name ships "
      f"with the package (names: {', '.join(config_names())})"
  )


def resolve_argv(argv: Sequence[str]) -> List[str]:
  """argv with --config=NAME (or --config NAME) made a path."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    key, eq, value = arg.partition("=")
    if key in ("--config", "-config") and eq:
      arg = f"{key}={resolve_config(value)}"
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      i += 1
      arg = f"{arg}={resolve_config(argv[i])}"
    out.append(arg)
    i += 1
  return out


def has_flag(argv: Sequence[str], name: str) -> bool:
  """Whether argv sets --name (either spelling, with or without '=')."""
  keys = (f"--{name}", f"-{name}")
  return any(a in keys or a.partition("=")[0] in keys for a in argv)


def _define_config(help_text: str) -> None:
  if "config" not in flags.FLAGS:
    names = ", ".join(config_names())
    config_flags.DEFINE_config_file(
        "config",
        None,
        help_text + _CONFIG_HELP.format(names=names),
        lock_config=True,
    )
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", "out", "Directory for results.")
  define_cache_flag()


def define_main_flags() -> None:
  """--config (required), --workdir, --compilation_cache: evaluate, fit."""
  _define_config("The pipeline config (mode 'evaluate' or 'fit').")
  flags.mark_flags_as_required(["config"])


def define_experiment_flags() -> None:
  """--config, --workdir, --compilation_cache of the experiment runner."""
  _define_config("The experiment config (a study).")


def define_cache_flag() -> None:
  """The command lines' --compilation_cache flag."""
  if "compilation_cache" in flags.FLAGS:
    return
  flags.DEFINE_string(
      "compilation_cache",
      None,
      "Folder of the persistent XLA compilation cache (default: "
      "$SOFTPATCH_JAX_CACHE_DIR or ~/.cache/softpatch_jax/xla); 'off' "
      "compiles everything afresh.",
  )


def define_predict_flags() -> None:
  """The predict command's flags."""
  flags.DEFINE_string(
      "model", None, "model.softpatch file, or the fit workdir that holds it."
  )
  flags.DEFINE_string(
      "input", None, "A directory of images, or comma-separated image files."
  )
  flags.DEFINE_string("output", None, "Output directory.")
  flags.DEFINE_bool(
      "recursive",
      False,
      "Also read images in sub-folders of an input directory.",
  )
  flags.DEFINE_integer(
      "batch_size", None, "Images per batch (default: the fitting batch size)."
  )
  flags.DEFINE_integer("num_workers", 2, "Image decoding threads.")
  flags.DEFINE_bool("heatmaps", True, "Write heatmaps/<name>.png.")
  flags.DEFINE_bool(
      "save_maps",
      False,
      "Also write maps/<name>.npy (raw float32 anomaly maps).",
  )
  flags.DEFINE_bool(
      "save_masks",
      False,
      "Also write masks/<name>.png (binary, map >= pixel threshold).",
  )
  flags.DEFINE_float("threshold", None, "Image threshold override.")
  flags.DEFINE_float("pixel_threshold", None, "Pixel threshold override.")
  flags.DEFINE_float(
      "quantile",
      None,
      "Re-derive both thresholds as this quantile of the stored held-out "
      "training scores.",
  )
  flags.DEFINE_float(
      "memory_budget_mb",
      None,
      "Scan the memory bank in chunks of at most this size (default: the "
      "model's config; 0: no limit).",
  )
  flags.DEFINE_string(
      "backbone_weights",
      None,
      "Where the backbone weights are now, if they moved since fitting (.pth "
      "path); they must be the same weights.",
  )
  flags.DEFINE_bool(
      "strict",
      False,
      "Stop at the first unreadable image instead of recording it as an "
      "error row.",
  )
  define_cache_flag()
  flags.mark_flags_as_required(["model", "input", "output"])


def define_export_flags() -> None:
  """The export command's flags (softpatch_jax.export reads them)."""
  flags.DEFINE_string("model", None, "The fitted model file (or its folder).")
  # A plain string: softpatch_jax.export refuses another value in one line.
  flags.DEFINE_string("format", "onnx", "Export format: onnx or stablehlo.")
  flags.DEFINE_string("out", None, "The file to write.")
  flags.DEFINE_list(
      "platforms",
      list(EXPORT_PLATFORMS),
      "StableHLO only: the platforms to lower for.",
  )
  flags.mark_flags_as_required(["model", "out"])


def help_text(doc: str, helpfull: bool = False) -> str:
  """The command's description and its flags (all of them with helpfull)."""
  if helpfull:
    text = flags.FLAGS.get_help()
  else:
    text = flags.FLAGS.module_help(__name__).strip("\n")
    text = text.split("\n", 1)[1] if text.startswith(__name__) else text
  return f"{doc.strip()}\n\nflags:\n{text}\n\nTry --helpfull for every flag."


def prepare(argv: Sequence[str], define: Callable[[], None], doc: str) -> None:
  """Defines a command's flags, answers --help, resolves --config.

  --help prints `doc` and the flags and exits 0; a --config that names
  nothing is one line on stderr and exit status 1. Otherwise sys.argv
  becomes `argv` with --config resolved (ml_collections reads the config's
  overrides from sys.argv), ready for `app.run(main)`.
  """
  define()
  args = list(argv[1:])
  if any(a in HELP_ARGS + HELPFULL_ARGS for a in args):
    full = any(a in HELPFULL_ARGS for a in args)
    print(help_text(doc, helpfull=full), flush=True)
    sys.exit(0)
  try:
    sys.argv = [argv[0], *resolve_argv(args)]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def verbose_logging() -> None:
  """INFO for the command's own lines (DEBUG with --verbosity=1); jax's
  backend probe stays quiet."""
  v = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
  logging.set_verbosity(max(int(v), 0))
  for name in QUIET_LOGGERS:
    pylogging.getLogger(name).setLevel(pylogging.WARNING)


# --------------------------------------------------------------------------
# Errors: one line on stderr, the traceback only with --verbosity=1.

DEBUG_HINT = "--verbosity=1 shows the traceback"
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
  """Whether the command asks for tracebacks: --verbosity (-v) >= 1."""
  if flags.FLAGS.is_parsed():
    return int(flags.FLAGS.verbosity) >= 1
  return argv_asks_debug(sys.argv if argv is None else argv)


def argv_asks_debug(argv: Sequence[str]) -> bool:
  """Whether unparsed argv sets --verbosity (-v) to 1 or more."""
  args = list(argv)
  for i, arg in enumerate(args):
    key, eq, value = arg.partition("=")
    if key not in ("--verbosity", "-verbosity", "-v", "--v"):
      continue
    value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if value.lstrip("-").isdigit() and int(value) >= 1:
      return True
  return False


def one_line(e: BaseException) -> str:
  """An exception's message on one line (a KeyError's without its quotes)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [" ".join(line.split()) for line in str(text).splitlines()]
  return "; ".join(line for line in lines if line) or type(e).__name__


def config_error(e: BaseException, argv: Sequence[str]) -> str:
  """The one line of a --config.<field> override that names no field."""
  msg = one_line(e)
  m = _DID_YOU_MEAN.search(msg)
  if m is None:
    return f"bad --config override: {msg}"
  wrong = m.group(2)
  flag = next(
      (a for a in argv if a.lstrip("-").startswith("config.") and wrong in a),
      f"--config...{wrong}",
  )
  return (
      f"{flag.partition('=')[0]}: the config has no field {wrong!r}; did "
      f"you mean {m.group(1)!r}?"
  )


def parse_flags(argv: List[str]):
  """absl's flag parsing; a --config override naming no field (a typo) is
  one line and exit status 1, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if debug_requested(argv):
      raise
    print(
        f"error: {config_error(e, argv)} ({DEBUG_HINT})",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def guarded(main: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
  """`main` with any uncaught error made one line and exit status 1."""

  def run_main(argv: List[str]) -> None:
    try:
      main(argv)
    except app.UsageError:
      raise  # absl prints the usage line
    except Exception as e:  # pylint: disable=broad-except
      if debug_requested():
        raise
      print(
          f"error: {one_line(e)} ({type(e).__name__}; {DEBUG_HINT})",
          file=sys.stderr,
          flush=True,
      )
      sys.exit(1)

  return run_main


def run_app(main: Callable[[List[str]], None]) -> None:
  """app.run(main) with one-line errors (`parse_flags`, `guarded`)."""
  app.run(guarded(main), flags_parser=parse_flags)
