"""Hostile torch weight files are refused before they can exhaust memory.

Each file is written by hand (pickle opcodes, zipfile, struct), so torch is
not needed. Every refusal is checked twice: in process with pytest.raises,
and in a fresh interpreter whose peak RSS must stay near that of one that
only imports the reader.
"""

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from softpatch_jax import torch_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each hostile file would take at least 256 MiB if it were loaded.
MAX_EXTRA_MB = 100

# Imports torch_pickle (which imports neither jax nor torch), loads argv[2]
# (unless '-') with expected shapes argv[3] (JSON), then prints the peak RSS
# in MiB and the error message. The peak is VmHWM, which belongs to this
# process image; ru_maxrss also counts the parent's RSS when it was forked.
_RUNNER = """
import importlib, json, os, resource, sys
def peak_mb():
  try:
    with open("/proc/self/status") as f:
      hwm = [l for l in f if l.startswith("VmHWM:")][0]
    return int(hwm.split()[1]) // 1024
  except (OSError, IndexError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
root, path, expected = sys.argv[1:4]
sys.path.insert(0, root)
tp = importlib.import_module("softpatch_jax.torch_pickle")
assert "jax" not in sys.modules, "the reader must not import jax"
msg = "loaded"
if path != "-":
  try:
    tp.load_state_dict(path, expected_shapes=json.loads(expected))
  except ValueError as e:
    msg = str(e)
print(peak_mb())
print(msg)
"""


def _peak_mb(path, expected=None):
  out = subprocess.run(
      [sys.executable, "-c", _RUNNER, ROOT, str(path), json.dumps(expected)],
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  peak, msg = out.stdout.split("\n", 1)
  return int(peak), msg.strip()


@pytest.fixture(scope="module")
def baseline_mb():
  peak, msg = _peak_mb("-")
  assert msg == "loaded"
  return peak


def _assert_refused(path, match, baseline, expected=None):
  peak, msg = _peak_mb(path, expected)
  print(f"{os.path.basename(path)}: peak {peak} MiB, baseline {baseline}")
  assert re.search(match, msg), msg
  assert peak - baseline < MAX_EXTRA_MB, (peak, baseline, msg)
  with pytest.raises(ValueError, match=match):
    torch_pickle.load_state_dict(path, expected_shapes=expected)


# ------------------------------------------------------------ file writers


def _global(module, name):
  return f"c{module}\n{name}\n".encode()


def _lit(value):
  """Opcodes pushing a plain value (protocol 2 without PROTO and STOP)."""
  return pickle.dumps(value, protocol=2)[2:-1]


def _state_pickle(tensors, numels):
  """The pickle torch.save writes for an OrderedDict of float32 tensors.

  tensors: {name: (storage key, shape, stride)}; numels: {storage key:
  declared element count}.
  """
  ops = [b"\x80\x02", _global("collections", "OrderedDict"), b")R("]
  for name, (key, shape, stride) in tensors.items():
    pid = b"".join([
        b"(",
        _lit("storage"),
        _global("torch", "FloatStorage"),
        _lit(key),
        _lit("cpu"),
        _lit(numels[key]),
        b"tQ",
    ])
    args = b"".join([
        pid,
        _lit(0),
        _lit(tuple(shape)),
        _lit(tuple(stride)),
        _lit(False),
        _global("collections", "OrderedDict"),
        b")R",
    ])
    ops += [_lit(name), _global("torch._utils", "_rebuild_tensor_v2")]
    ops += [b"(", args, b"tR"]
  ops.append(b"u.")
  return b"".join(ops)


def _write_zip(path, pkl, storages, deflate=False):
  """storages: {key: bytes, or (chunk, repeats) written streaming}."""
  mode = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
  with zipfile.ZipFile(path, "w", compression=mode) as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", "little")
    for key, data in storages.items():
      with zf.open(f"archive/data/{key}", "w") as fh:
        chunk, repeats = (data, 1) if isinstance(data, bytes) else data
        for _ in range(repeats):
          fh.write(chunk)
  return path


def _write_legacy(path, pkl, storages, counts=None):
  """storages: {key: float32 bytes}; counts overrides the element counts."""
  buf = io.BytesIO()
  for head in (
      torch_pickle.LEGACY_MAGIC,
      torch_pickle.LEGACY_PROTOCOL,
      {"little_endian": True},
  ):
    pickle.dump(head, buf, protocol=2)
  buf.write(pkl)
  pickle.dump(list(storages), buf, protocol=2)
  for key, data in storages.items():
    count = len(data) // 4 if counts is None else counts[key]
    buf.write(struct.pack("<q", count) + data)
  path.write_bytes(buf.getvalue())
  return path


_ONE_FLOAT = np.float32(1.5).tobytes()


# ------------------------------------------------------------------ cases


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_stride0_tensor_larger_than_storage(tmp_path, baseline_mb, fmt):
  pkl = _state_pickle({"w": ("0", (16000, 16000), (0, 0))}, {"0": 1})
  path = tmp_path / f"stride0_{fmt}.pth"
  write = _write_zip if fmt == "zip" else _write_legacy
  write(path, pkl, {"0": _ONE_FLOAT})
  _assert_refused(
      path,
      rf"stride0_{fmt}\.pth: .*tensor 'w' of shape \(16000, 16000\) has "
      r"256000000 elements but its storage '0' holds only 1",
      baseline_mb,
  )


@pytest.fixture(scope="module")
def deflated_zip(tmp_path_factory):
  """256 MiB of float32 zeros, deflated to about 260 KB."""
  numel = 8192 * 8192
  pkl = _state_pickle({"w": ("0", (8192, 8192), (8192, 1))}, {"0": numel})
  path = tmp_path_factory.mktemp("bomb") / "deflated.pth"
  return _write_zip(path, pkl, {"0": (bytes(1 << 20), 256)}, deflate=True)


def test_deflated_large_storage(deflated_zip, baseline_mb):
  assert os.path.getsize(deflated_zip) < 1 << 20
  _assert_refused(
      deflated_zip,
      r"deflated\.pth: .*compressed entry archive/data/0 declares 268435456 "
      r"bytes, .* more than the \d+ allowed for a \d+-byte archive",
      baseline_mb,
  )


def test_expected_shapes_refuse_before_reading(deflated_zip, baseline_mb):
  _assert_refused(
      deflated_zip,
      r"deflated\.pth: 1 tensor\(s\) differ from the expected shapes: "
      r"'w' is \(8192, 8192\), expected \(64, 64\)",
      baseline_mb,
      expected={"w": [64, 64], "absent": [3]},
  )
  with pytest.raises(torch_pickle.ShapeMismatchError) as e:
    torch_pickle.load_state_dict(deflated_zip, expected_shapes={"w": (64,)})
  assert e.value.shapes == {"w": (8192, 8192)}


def test_many_views_of_one_storage(tmp_path, baseline_mb):
  numel = 1 << 24  # 64 MiB, deflated; 100 full views would take 6.4 GB
  views = {f"v{i}": ("0", (numel,), (1,)) for i in range(100)}
  path = _write_zip(
      tmp_path / "views.pth",
      _state_pickle(views, {"0": numel}),
      {"0": (bytes(1 << 20), 64)},
      deflate=True,
  )
  _assert_refused(
      path,
      r"views\.pth: .*tensors would take 6710886400 bytes, more than the "
      r"\d+ allowed for 67108864 bytes of storage",
      baseline_mb,
  )


def test_legacy_huge_count_in_file(tmp_path, baseline_mb):
  pkl = _state_pickle({"w": ("0", (1,), (1,))}, {"0": 1})
  path = _write_legacy(
      tmp_path / "count.pth", pkl, {"0": _ONE_FLOAT}, counts={"0": 10**12}
  )
  _assert_refused(
      path,
      r"count\.pth: .*storage '0' declares 1000000000000 elements "
      r"\(4000000000000 bytes\) but only 4 bytes remain in the file",
      baseline_mb,
  )


def test_legacy_huge_declared_storage(tmp_path, baseline_mb):
  numel = 10**9
  pkl = _state_pickle({"w": ("0", (31622, 31622), (31622, 1))}, {"0": numel})
  path = _write_legacy(tmp_path / "declared.pth", pkl, {"0": _ONE_FLOAT})
  _assert_refused(
      path,
      r"declared\.pth: .*storages declare 4000000000 bytes but only 12 "
      r"bytes follow the pickles",
      baseline_mb,
  )
  _assert_refused(
      path,
      r"declared\.pth: 1 tensor\(s\) differ from the expected shapes: "
      r"'w' is \(31622, 31622\), expected \(3, 3\)",
      baseline_mb,
      expected={"w": [3, 3]},
  )


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_small_valid_file_still_loads(tmp_path, fmt):
  data = np.arange(12, dtype=np.float32)
  tensors = {
      "m": ("0", (3, 4), (4, 1)),
      "t": ("0", (4, 3), (1, 4)),  # transposed view of the same storage
      "e": ("1", (5, 3), (0, 1)),  # expand()-ed: more elements than storage
  }
  pkl = _state_pickle(tensors, {"0": 12, "1": 3})
  storages = {"0": data.tobytes(), "1": data[:3].tobytes()}
  path = tmp_path / f"ok_{fmt}.pth"
  (_write_zip if fmt == "zip" else _write_legacy)(path, pkl, storages)
  expected = {"m": (3, 4), "t": (4, 3), "e": (5, 3)}
  got = torch_pickle.load_state_dict(path, expected_shapes=expected)
  assert list(got) == ["m", "t", "e"]
  np.testing.assert_array_equal(got["m"], data.reshape(3, 4))
  np.testing.assert_array_equal(got["t"], data.reshape(3, 4).T)
  np.testing.assert_array_equal(got["e"], np.tile(data[:3], (5, 1)))
  assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())
