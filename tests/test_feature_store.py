"""feature_store: train features in RAM or in an unlinked temporary file."""

import errno
import mmap

import jax
import numpy as np
import pytest

from softpatch_jax import banks
from softpatch_jax import coreset
from softpatch_jax import feature_store
from softpatch_jax import methods


def _batches(rng, n, row_shape, size):
  x = rng.normal(size=(n, *row_shape)).astype(np.float32)
  return x, [x[i : i + size] for i in range(0, n, size)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_writer_returns_the_rows_written(seed, store, tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(feature_store.tempfile, "tempdir", None)
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 40))
  row_shape = tuple(int(s) for s in rng.integers(1, 9, size=2))
  x, batches = _batches(rng, n, row_shape, int(rng.integers(1, 8)))
  w = feature_store.Writer(n + int(rng.integers(0, 3)), np.float32, store)
  for b in batches:
    w.write(b)
  got = w.finish()
  np.testing.assert_array_equal(got, x)
  assert got.dtype == np.float32 and got.shape == x.shape
  if store == "disk":
    assert isinstance(got, np.memmap) and not got.flags.writeable
    assert not list(tmp_path.iterdir())  # unlinked at once
    feature_store.release(got.reshape(n, -1)[1:])  # a view: same mapping
    np.testing.assert_array_equal(got, x)  # pages come back on access


@pytest.mark.parametrize("seed", [0, 1])
def test_take_gathers_rows_in_their_order(seed, monkeypatch):
  monkeypatch.setattr(feature_store, "_TAKE_ROWS", 5)
  rng = np.random.default_rng(seed)
  x, batches = _batches(rng, 50, (3, 4), 7)
  w = feature_store.Writer(50, np.float32, "disk")
  for b in batches:
    w.write(b)
  flat = np.asarray(w.finish()).reshape(150, 4)  # a view, as build_bank has
  rows = rng.integers(0, 150, size=int(rng.integers(0, 40)))  # repeats too
  got = feature_store.take(flat, rows)
  np.testing.assert_array_equal(got, x.reshape(150, 4)[rows])
  assert not isinstance(got, np.memmap) and got.flags.writeable
  np.testing.assert_array_equal(feature_store.take(x, [3, 1]), x[[3, 1]])


def _rss_mb():
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  pytest.skip("no /proc/self/status")


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no madvise")
def test_release_hands_back_the_resident_pages():
  w = feature_store.Writer(64, np.float32, "disk")
  for _ in range(64):
    w.write(np.ones((1, 256, 1024), np.float32))  # 64 MB in all
  got = w.finish()
  before = _rss_mb()
  assert float(got.sum(dtype=np.float64)) == 64 * 256 * 1024
  touched = _rss_mb()
  feature_store.release(got)
  after = _rss_mb()
  assert touched - before > 48 and touched - after > 48
  feature_store.release(np.ones(3))  # RAM arrays: nothing to do


def test_errors(monkeypatch):
  with pytest.raises(ValueError, match="feature_store must be one of"):
    feature_store.Writer(3, np.float32, "ssd")
  for store in feature_store.STORES:
    w = feature_store.Writer(3, np.float32, store)
    w.write(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 5\) does not fit \(3, 4\)"):
      w.write(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="after 2 rows"):
      w.write(np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="no feature batch"):
    feature_store.Writer(3, np.float32, "disk").finish()

  def no_room(**unused):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(feature_store.tempfile, "mkstemp", no_room)
  with pytest.raises(OSError, match="temporary file.*TMPDIR"):
    feature_store.Writer(3, np.float32, "disk").write(np.zeros((1, 4)))
  monkeypatch.undo()

  w = feature_store.Writer(3, np.float32, "disk")
  w.write(np.zeros((1, 4), np.float32))

  class Full:

    def write(self, _):
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(w, "file", Full())
  with pytest.raises(OSError, match="TMPDIR.*feature_store='memory'"):
    w.write(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("impl", ["dense", "pruned"])
def test_a_bank_from_disk_equals_one_from_memory(impl, monkeypatch):
  # Chunks small enough that the projection reads the mapping in pieces.
  monkeypatch.setattr(banks, "PROJECT_ROWS", 64)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(10, 49, 32)).astype(np.float32)
  w = feature_store.Writer(10, np.float32, "disk")
  for i in range(0, 10, 3):
    w.write(x[i : i + 3])
  disk = w.finish()
  key = jax.random.PRNGKey(0)
  opts = methods.BankOptions(
      coreset=coreset.CoresetOptions(projection_dim=8, impl=impl)
  )
  a, fa = banks.build_bank(x, key, "softpatch_lof", opts)
  b, fb = banks.build_bank(disk, key, "softpatch_lof", opts)
  np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))
  np.testing.assert_array_equal(np.asarray(fa.indices), np.asarray(fb.indices))
  np.testing.assert_array_equal(np.asarray(fa.weights), np.asarray(fb.weights))
