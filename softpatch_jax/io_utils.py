"""Atomic file writing: nothing is ever left half-written.

Every output goes to a temporary file in the destination folder and is moved
into place with os.replace, which is atomic on POSIX and Windows. An
interrupted run therefore leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile

import numpy as np


def ensure_writable_dir(path: str) -> str:
  """Creates `path` if needed and checks that files can be written there."""
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {path!r} is not writable: {e}") from None
  return path


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
  """Opens a temp file beside `path`; renames it onto `path` on success."""
  directory = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
  )
  try:
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600 files; give the result the usual umask mode so
    # models and heatmaps stay readable by others on a shared machine.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, obj) -> None:
  write_text(
      path,
      json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n",
  )


def write_csv(path: str, rows, fieldnames) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(row.get(k)) for k in fieldnames})
  write_text(path, buf.getvalue())


def save_image(path: str, image) -> None:
  """Saves a PIL image atomically, format from the extension."""
  buf = io.BytesIO()
  fmt = os.path.splitext(path)[1].lstrip(".").upper() or "PNG"
  image.save(buf, format={"JPG": "JPEG"}.get(fmt, fmt))
  write_bytes(path, buf.getvalue())


def save_npy(path: str, array) -> None:
  buf = io.BytesIO()
  np.save(buf, array)
  write_bytes(path, buf.getvalue())


def _csv_value(v):
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return "n/a" if v != v else f"{v:.6g}"
  return v


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  return str(o)
