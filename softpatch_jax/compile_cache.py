"""A persistent XLA compilation cache for the command lines.

On a GPU, XLA autotunes every new matmul and convolution shape while it
compiles, so a fit's first run spends most of its time compiling (README,
"Kernel paths per backend"). The cache keeps compiled programs on disk, and
a second run with the same shapes loads them. The command lines turn it on
by default in a user cache folder; `--compilation_cache=off` turns it off
(the flag is defined in `cli_flags`, which imports no jax).
"""

from __future__ import annotations

import os
from typing import Optional

from absl import logging
import jax

OFF = ("", "off", "none", "0", "false")


def default_dir() -> str:
  """$SOFTPATCH_JAX_CACHE_DIR, else <XDG cache>/softpatch_jax/xla."""
  env = os.environ.get("SOFTPATCH_JAX_CACHE_DIR")
  if env is not None:
    return env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache"
  )
  return os.path.join(base, "softpatch_jax", "xla")


def enable(path: Optional[str] = None) -> Optional[str]:
  """Points jax's persistent compilation cache at `path` (None: default).

  Returns the folder in use, or None when the cache is off. A folder that
  cannot be created only costs the speed-up: one warning, no error.
  """
  path = default_dir() if path is None else path
  if path.strip().lower() in OFF:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    logging.warning(
        "compilation cache off: cannot use %s (%s); set "
        "--compilation_cache=DIR or SOFTPATCH_JAX_CACHE_DIR",
        path,
        e,
    )
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # Programs that compile in under a second are cheaper to rebuild than to
  # read back; the big ones (backbone, projection, kernels) are kept.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path
