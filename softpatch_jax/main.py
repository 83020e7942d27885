r"""Command line: parses flags and runs the config's mode.

  python -m softpatch_jax.main --config=default --workdir out/default
  python -m softpatch_jax.main --config=fit_folder \
      --config.data.train_dir=DIR --workdir out/model

(the same as `softpatch evaluate` and `softpatch fit`, `cli`). --config is
a path or the name of a config shipped in softpatch_jax/configs/
(`cli_flags`). config.mode 'evaluate' (default) runs
`evaluate.run_options`; 'fit' runs `fit.fit_model`, on the config's typed
records (`options.from_config`). --config.distributed=True joins a
multi-host job first (README, "Scaling out").
"""

import sys
import tempfile

from absl import app
from absl import flags
import jax

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import compile_cache
from softpatch_jax import evaluate
from softpatch_jax import fit
from softpatch_jax import options

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
  f = flags.FLAGS  # defined by cli_flags.define_main_flags
  cli_flags.verbose_logging()
  compile_cache.enable(f.compilation_cache)
  try:
    run_mode(f.config, f.workdir)
  except (ValueError, backbones.WeightsUnavailableError) as e:
    # Bad input (a file, a value, a shape): one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  # The flags are defined here, not at import: `softpatch evaluate` defines
  # the same ones before it imports this module.
  cli_flags.prepare(sys.argv, cli_flags.define_main_flags, __doc__)
  cli_flags.run_app(main)
