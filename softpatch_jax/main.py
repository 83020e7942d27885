r"""Runs SoftPatch / PatchCore as configured and writes results to --workdir.

  python -m softpatch_jax.main --config configs/default.py --workdir out/
  python -m softpatch_jax.main --config configs/mvtec.py \
      --config.data.root=/data/mvtec --workdir out/mvtec
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from softpatch_jax import backbones
from softpatch_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "out", "Directory for results.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, backbones.WeightsUnavailableError) as e:
    # Bad input (a file, a value, a shape): one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
