"""One BLAS thread for host loops of many small products (numpy's OpenBLAS).

The pruned greedy k-center (kcenter_pruned.py) runs thousands of ~1 MB
matrix products. On this project's 2-core test machine OpenBLAS's hand-off
between its threads costs more than the second core gives back (the
benchmark's coreset: 34 s on one thread, 45 s on two), and when another
process holds a core the waiting thread stalls it up to four times over.
`one_thread` pins numpy's OpenBLAS to one thread for the duration where the
library exports its thread setter, and does nothing elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

# (get, set) symbol pairs: numpy's bundled OpenBLAS, then plain builds.
_SYMBOLS = [
    (f"{p}get_num_threads{s}", f"{p}set_num_threads{s}")
    for p, s in (("scipy_openblas_", "64_"), ("scipy_openblas_", "")) + (
        ("openblas_", ""),
        ("openblas_", "64_"),
    )
]


@functools.lru_cache(maxsize=None)
def _openblas():
  """(get, set) thread-count functions of a loaded OpenBLAS, or None.

  Called after numpy is imported, so its OpenBLAS is among the mappings.
  """
  try:
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
      paths = sorted(
          {l.split()[-1] for l in f if "openblas" in l.lower() and "/" in l}
      )
  except OSError:
    return None
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for get_name, set_name in _SYMBOLS:
      get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
      if get is not None and put is not None:
        get.restype, put.restype, put.argtypes = (
            ctypes.c_int,
            None,
            [ctypes.c_int],
        )
        return get, put
  return None


def threads():
  """numpy's OpenBLAS thread count, or None where it cannot be read."""
  found = _openblas()
  return None if found is None else int(found[0]())


@contextlib.contextmanager
def one_thread():
  """OpenBLAS on one thread inside the block (restored after)."""
  found = _openblas()
  if found is None:
    yield
    return
  get, put = found
  before = int(get())
  put(1)
  try:
    yield
  finally:
    put(before)
