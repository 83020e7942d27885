"""Checks shared by every stage: finiteness, and whether an array is concrete.

Pure stages are jittable, so a check that needs values (a count of NaNs)
runs only on concrete arrays and is skipped while tracing.
"""

from __future__ import annotations

import jax
import numpy as np

from softpatch_jax import feature_store


def is_concrete(x) -> bool:
  """True for numpy arrays, Python numbers and committed jax arrays."""
  return not isinstance(x, jax.core.Tracer)


_CHUNK = 1 << 22  # elements per finiteness check


def check_finite(x, what: str, hint: str = "") -> None:
  """Raises ValueError when a concrete array holds NaN or inf.

  Args:
    x: the array (a tracer is not checked).
    what: names the array in the message ("features of mono: test").
    hint: what is probably broken, appended to the message.
  """
  if not is_concrete(x):
    return
  a = np.asarray(x)
  # In chunks: one boolean mask of a large feature array would be a quarter
  # of its size again at the peak of a fit.
  rows = a.reshape(-1) if a.flags.c_contiguous else a.ravel()
  bad = 0
  for s in range(0, rows.size, _CHUNK):
    part = rows[s : s + _CHUNK]
    bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    feature_store.release(x)  # a file-mapped array: its pages go back
  if bad:
    raise ValueError(
        f"{what}: {bad} non-finite values (NaN/inf) out of {a.size}"
        + (f"; {hint}" if hint else "")
    )
