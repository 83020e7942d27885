"""Train features in RAM or in a temporary file (config.data.feature_store).

A fit reads its (N, P, D) train features in row chunks (the finiteness
check and the projection that LOF and the coreset run on) and then gathers
the bank rows, about a tenth of them. With 'disk' they are written batch
by batch to an unlinked temporary file (in TMPDIR) and mapped read-only;
the pages a chunk touched are handed back after it (`release`), so the
features sit in the page cache, which the OS can drop and read again,
instead of in the process's resident memory. The bytes are the same, so
every result is identical to 'memory'.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

STORES = ("memory", "disk")


class Writer:
  """Collects (B, ...) batches in order into one (n, ...) array."""

  def __init__(self, n: int, dtype, store: str = "memory"):
    if store not in STORES:
      raise ValueError(f"feature_store must be one of {STORES}, got {store!r}")
    self.n, self.dtype, self.store = n, np.dtype(dtype), store
    self.filled, self.row_shape = 0, None
    self.array = self.file = None

  def _open(self, row_shape):
    self.row_shape = tuple(row_shape)
    if self.store == "memory":
      self.array = np.empty((self.n, *self.row_shape), self.dtype)
      return
    try:
      fd, path = tempfile.mkstemp(prefix="softpatch_features_")
    except OSError as e:
      raise OSError(
          "cannot create a temporary file for the train features in "
          f"{tempfile.gettempdir()}: {e}. Point TMPDIR at a writable folder, "
          "or set data.feature_store='memory'"
      ) from e
    self.file = os.fdopen(fd, "w+b")
    os.unlink(path)  # gone when the last mapping closes, even after a crash
    self.folder = os.path.dirname(path)

  def write(self, batch) -> None:
    batch = np.ascontiguousarray(batch, self.dtype)
    if self.row_shape is None:
      self._open(batch.shape[1:])
    if batch.shape[1:] != self.row_shape or self.filled + len(batch) > self.n:
      raise ValueError(
          f"feature batch {batch.shape} does not fit ({self.n}, "
          f"{', '.join(map(str, self.row_shape))}) after {self.filled} rows"
      )
    if self.array is not None:
      self.array[self.filled : self.filled + len(batch)] = batch
    else:
      try:
        self.file.write(memoryview(batch.reshape(-1)).cast("B"))
      except OSError as e:
        need = self.n * batch[0].nbytes / 2**20
        raise OSError(
            f"cannot write the train features ({need:.0f} MB) to a temporary "
            f"file in {self.folder}: {e}. Point TMPDIR at a folder with room, "
            "or set data.feature_store='memory'"
        ) from e
    self.filled += len(batch)

  def finish(self) -> np.ndarray:
    """The rows written (a read-only np.memmap for 'disk'); needs one."""
    if self.array is not None:
      return self.array[: self.filled]
    if self.file is None:
      raise ValueError("no feature batch was written")
    self.file.flush()
    shape = (self.filled, *self.row_shape)
    if self.filled == 0 or self.dtype.itemsize * int(np.prod(shape)) == 0:
      self.file.close()
      return np.zeros(shape, self.dtype)
    out = np.memmap(self.file, self.dtype, mode="r", shape=shape)
    self.file.close()  # the mapping keeps its own handle
    return out


def _mapping(a):
  """The mmap behind a (a np.memmap or a view of one), else None."""
  while a is not None and getattr(a, "_mmap", None) is None:
    a = getattr(a, "base", None)
  return None if a is None else a._mmap  # pylint: disable=protected-access


def release(a) -> None:
  """Drops the resident pages of a file-mapped array; no-op for RAM arrays.

  The data stays in the file (and usually the page cache): the next access
  maps it again.
  """
  mapping = _mapping(a)
  if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
    mapping.madvise(mmap.MADV_DONTNEED)


_TAKE_ROWS = 512  # rows per gather chunk of a file-mapped array


def take(a, rows) -> np.ndarray:
  """a[rows] (rows: 1-d ints) into RAM, handing pages back as it goes.

  A page fault on a file mapping can map a large block of cached pages
  around it, so scattered rows would make most of the file resident: the
  rows are read in sorted chunks, each from one stretch of the file.
  """
  if _mapping(a) is None:
    return a[rows]
  rows = np.asarray(rows)
  order = np.argsort(rows, kind="stable")
  out = np.empty((len(rows), *a.shape[1:]), a.dtype)
  for s in range(0, len(rows), _TAKE_ROWS):
    part = order[s : s + _TAKE_ROWS]
    out[part] = a[rows[part]]
    release(a)
  return out
