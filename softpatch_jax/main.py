r"""Command line: parses flags and runs the config's mode.

  python -m softpatch_jax.main --config configs/default.py --workdir out/
  python -m softpatch_jax.main --config configs/fit_folder.py \
      --config.data.train_dir=DIR --workdir out/model

config.mode 'evaluate' (default) runs `evaluate.run_options`; 'fit' runs
`fit.fit_model`, on the config's typed records (`options.from_config`). --config.distributed=True joins a multi-host job first
(README, "Scaling out").
"""

import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from softpatch_jax import backbones
from softpatch_jax import compile_cache
from softpatch_jax import evaluate
from softpatch_jax import fit
from softpatch_jax import options

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "out", "Directory for results.")
_CACHE = compile_cache.define_flag()
flags.mark_flags_as_required(["config"])

MODES = {"evaluate": evaluate.run_options, "fit": fit.fit_model}


def run_mode(config, workdir: str):
  """Runs config.mode ('evaluate' or 'fit') into `workdir`.

  With config.distributed, every process of a multi-host job first joins
  one global device list (`jax.distributed.initialize`, before any device
  is used); all processes compute the same results, and process 0 writes
  them (the others into a scratch folder that is then removed).
  """
  opts = options.from_config(config)  # every field checked, before any work
  if opts.distributed:
    jax.distributed.initialize()
  # Only a multi-host job asks for the process index: asking starts the
  # backends, whose probe lines would precede a one-line error.
  if opts.distributed and jax.process_index() > 0:
    with tempfile.TemporaryDirectory() as scratch:
      return MODES[opts.mode](opts, scratch)
  return MODES[opts.mode](opts, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  compile_cache.enable(_CACHE.value)
  try:
    run_mode(_CONFIG.value, _WORKDIR.value)
  except (ValueError, backbones.WeightsUnavailableError) as e:
    # Bad input (a file, a value, a shape): one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
