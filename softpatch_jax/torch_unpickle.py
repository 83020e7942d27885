"""The restricted unpickler behind `torch_pickle`: tensor records, whitelist.

Only the globals in `_WHITELIST` can be unpickled, each mapped to a numpy
rebuild function here, so a malicious file cannot run code. Tensors are
recorded as references into their storages and materialised as numpy arrays
once the container (zip or legacy, see `torch_pickle`) has read the storages.

`check_refs` bounds what materialising will allocate before any storage byte
is read: a tensor may not reach past its storage nor (beyond a small slack
for ``expand``-ed tensors) hold more elements than it, and all tensors
together may not take much more memory than their storages.
"""

from __future__ import annotations

import collections
import math
import pickle
import reprlib
from typing import Any, BinaryIO

import numpy as np

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


# Tensor records beyond these limits are refused as corrupt.
_MAX_RANK = 64
_MAX_EXTENT = 1 << 48  # any size, stride or offset
# torch saves expand()-ed tensors as-is (stride 0, more elements than their
# storage); such a tensor may still materialise to at most this many bytes.
EXPAND_SLACK_BYTES = 1 << 20
# All tensors together may materialise to at most OUTPUT_RATIO times the
# bytes of the storages they use plus OUTPUT_SLACK_BYTES (several views may
# share one storage). Counted in storage element sizes: bfloat16 doubles.
OUTPUT_RATIO = 2
OUTPUT_SLACK_BYTES = 64 << 20


class UnsafePickleError(ValueError):
  """The file references a global outside the whitelist."""


class CorruptFile(Exception):
  """Internal: structural problem, re-raised as ValueError with the path."""


class _StorageType:
  """Stand-in for a torch ``*Storage`` class: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == "bfloat16" else self.dtype.itemsize


class Storage:
  """A typed storage whose bytes may be attached after unpickling (legacy)."""

  def __init__(self, key: str, stype: _StorageType, numel: int):
    self.key = key
    self.stype = stype
    self.numel = int(numel)
    self.data: np.ndarray | None = None  # 1-D, raw dtype (uint16 for bf16)

  @property
  def nbytes(self) -> int:
    return self.numel * self.stype.itemsize


class StorageView:
  """A window [offset, offset+numel) onto a root storage (legacy views)."""

  def __init__(self, root: Storage, offset: int, numel: int):
    self.root = root
    self.offset = int(offset)
    self.numel = int(numel)


class TensorRef:
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
  return TensorRef(storage, storage_offset, size, stride)


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
  return TensorRef(storage, storage_offset, size, stride, dtype)


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


class RestrictedUnpickler(pickle.Unpickler):
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
      raise CorruptFile(f"unexpected persistent id {short_repr(pid)}")
    return self._persistent(pid)


def short_repr(obj) -> str:
  """repr() bounded in depth and length: a hostile pickle can nest a value
  100k levels deep, and the plain repr() would raise RecursionError."""
  r = reprlib.Repr()
  r.maxlevel, r.maxstring, r.maxother = 3, 60, 60
  return r.repr(obj)


def parse_storage_pid(pid) -> tuple[_StorageType, str, int, Any]:
  if (
      not isinstance(pid, tuple)
      or len(pid) < 5
      or pid[0] != "storage"
      or not isinstance(pid[1], _StorageType)
      or not isinstance(pid[2], (str, int))
  ):
    raise CorruptFile(f"unsupported persistent id {short_repr(pid)}")
  view = pid[5] if len(pid) > 5 else None
  numel = int(pid[4])
  if numel < 0:
    raise CorruptFile(
        f"storage {short_repr(pid[2])}: negative element count {numel}"
    )
  return pid[1], str(pid[2]), numel, view


# ---------------------------------------------------------------- checks


def _iter_refs(obj, name: str):
  """Yield (dotted name, TensorRef) for every tensor in nested containers."""
  if isinstance(obj, TensorRef):
    yield name or "<root>", obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from _iter_refs(v, f"{name}.{k}" if name else str(k))
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _iter_refs(v, f"{name}.{i}" if name else str(i))


def _itemsize(dtype) -> int:
  if isinstance(dtype, str) and dtype == "bfloat16":
    return 2
  if isinstance(dtype, np.dtype):
    return dtype.itemsize
  raise CorruptFile(f"unsupported tensor dtype {dtype!r}")


def _check_ref(name: str, ref: TensorRef) -> tuple[Storage, int]:
  """Validate one tensor record; return (root storage, bytes to allocate)."""
  st = ref.storage
  root = st.root if isinstance(st, StorageView) else st
  if not isinstance(root, Storage):
    raise CorruptFile(f"tensor {name!r} refers to no storage")
  if isinstance(st, StorageView) and (
      st.offset < 0 or st.numel < 0 or st.offset + st.numel > root.numel
  ):
    raise CorruptFile(
        f"tensor {name!r}: view [{st.offset}, {st.offset + st.numel}) of "
        f"storage {root.key!r} exceeds its {root.numel} elements"
    )
  size, stride, offset = ref.size, ref.stride, ref.offset
  if len(size) > _MAX_RANK or len(size) != len(stride):
    raise CorruptFile(
        f"tensor {name!r}: bad rank (size {size[:8]}, stride {stride[:8]})"
    )
  if any(not 0 <= v <= _MAX_EXTENT for v in size + stride + (offset,)):
    raise CorruptFile(
        f"tensor {name!r}: size {size} stride {stride} offset {offset} "
        "out of range"
    )
  itemsize = _itemsize(root.stype.dtype if ref.dtype is None else ref.dtype)
  avail = st.numel * root.stype.itemsize // itemsize
  numel = math.prod(size)
  if numel > avail and numel * itemsize > EXPAND_SLACK_BYTES:
    raise CorruptFile(
        f"tensor {name!r} of shape {size} has {numel} elements but its "
        f"storage {root.key!r} holds only {avail}"
    )
  if numel:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= avail:
      raise CorruptFile(
          f"tensor {name!r} of shape {size} stride {stride} offset "
          f"{offset} reaches element {last} of storage {root.key!r}, "
          f"which holds {avail}"
      )
  return root, numel * itemsize


def check_refs(obj) -> None:
  """Refuse tensors that would allocate more than their storages justify.

  Uses the storages' declared element counts only, so it runs before any
  storage is read; the container checks those counts against the file.
  """
  roots: dict[int, int] = {}
  total = 0
  for name, ref in _iter_refs(obj, ""):
    root, nbytes = _check_ref(name, ref)
    roots[id(root)] = root.nbytes
    total += nbytes
  budget = OUTPUT_RATIO * sum(roots.values()) + OUTPUT_SLACK_BYTES
  if total > budget:
    raise CorruptFile(
        f"tensors would take {total} bytes, more than the {budget} allowed "
        f"for {sum(roots.values())} bytes of storage"
    )


# ---------------------------------------------------------------- materialise


def _storage_array(storage) -> tuple[np.ndarray, Any]:
  """Return (1-D raw element array, dtype marker) for a storage or view."""
  if isinstance(storage, StorageView):
    base, marker = _storage_array(storage.root)
    if storage.offset + storage.numel > base.size:
      raise CorruptFile(f"storage view {storage.root.key} out of range")
    return base[storage.offset : storage.offset + storage.numel], marker
  if not isinstance(storage, Storage) or storage.data is None:
    raise CorruptFile("tensor refers to a missing storage")
  return storage.data, storage.stype.dtype


def _materialise(ref: TensorRef) -> np.ndarray:
  raw, marker = _storage_array(ref.storage)
  if ref.dtype is not None and ref.dtype != marker:
    # v3 tensors may reinterpret an untyped (byte) storage.
    target = np.dtype("<u2") if ref.dtype == "bfloat16" else ref.dtype
    usable = raw.view(np.uint8)
    usable = usable[: usable.size - usable.size % target.itemsize]
    raw, marker = usable.view(target), ref.dtype
  if len(ref.size) != len(ref.stride):
    raise CorruptFile(f"size {ref.size} and stride {ref.stride} differ in rank")
  if (
      any(s < 0 for s in ref.size)
      or any(s < 0 for s in ref.stride)
      or ref.offset < 0
  ):
    raise CorruptFile(f"negative size/stride/offset in tensor {ref.size}")
  if 0 in ref.size:
    out = np.zeros(ref.size, raw.dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= raw.size:
      raise CorruptFile(
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


def resolve(obj):
  """Replace every TensorRef in nested containers by its numpy array."""
  if isinstance(obj, TensorRef):
    return _materialise(obj)
  if isinstance(obj, dict):
    return {k: resolve(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(resolve(v) for v in obj)
  return obj
