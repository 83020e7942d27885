"""Atomic file writing, and one run at a time per output folder.

Every output goes to a temporary file in the destination folder and is moved
into place with os.replace, which is atomic on POSIX and Windows. An
interrupted run therefore leaves either the old file or the new one, plus at
worst a temp file `.<name>.<pid>.<random>.tmp` that `clean_stale_temps` removes
on the next run. `folder_lock` keeps two runs from writing one folder at once.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time

from absl import logging
import numpy as np

LOCK_FILENAME = ".softpatch.lock"
# A lock file that cannot be parsed is presumed abandoned after this long (a
# live run writes its lock right after creating it).
CORRUPT_LOCK_STALE_S = 10 * 60
# Temp files named without a pid (older versions) are presumed abandoned after
# this long.
OLD_TEMP_STALE_S = 60 * 60
_TEMP_WITH_PID = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")
_TEMP_WITHOUT_PID = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# The destination's name in a temp file's name is cut to this many bytes, so
# that the temp name fits a folder entry (255 bytes) whatever the name.
TEMP_NAME_BYTES = 100


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
  """Opens a temp file beside `path`; renames it onto `path` on success.

  A failing write (unwritable folder, disk full) is one ValueError naming
  `path` and the reason.
  """
  directory = os.path.dirname(os.path.abspath(path)) or "."
  try:
    os.makedirs(directory, exist_ok=True)
    # The writer's pid in the name lets a later run tell an abandoned temp
    # file (its writer is gone) from one being written right now.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{temp_stem(path)}.{os.getpid()}.",
        suffix=".tmp",
        dir=directory,
    )
  except OSError as e:  # unwritable, a file in the folder's place, disk full
    raise ValueError(f"cannot write {path} ({e})") from e
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
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise ValueError(f"cannot write {path} ({e})") from e
    raise


def temp_stem(path: str) -> str:
  """The base name of `path`, cut to TEMP_NAME_BYTES bytes (for temp names)."""
  name = os.path.basename(path)
  while len(os.fsencode(name)) > TEMP_NAME_BYTES:
    name = name[:-1]
  return name


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields a hidden temporary folder beside `path` to fill; on success it
  replaces `path` (removed first if present), on error it is removed, so
  `path` holds the old folder, the complete new one, or nothing."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{temp_stem(path)}.", dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
  """Whether process `pid` runs on this machine (True when unsure)."""
  if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (OverflowError, ValueError):  # not a possible pid
    return False
  except OSError:  # PermissionError: alive, another user's process
    return True
  return True


def clean_stale_temps(folder: str) -> int:
  """Removes temp files of killed writers in `folder` and its sub-folders.

  A temp file `.<name>.<pid>.<random>.tmp` (see atomic_open) is abandoned
  when process <pid> no longer runs. Pids are checked on this machine only,
  so call this while holding the folder's `folder_lock`: a run on another
  machine writing here would hold it. A temp file without a pid
  (`.<name>.<random>.tmp`, older versions) is abandoned once older than
  OLD_TEMP_STALE_S. Sub-folders are looked at one level deep. The count
  removed, if any, is logged.

  Returns:
    How many files were removed.
  """
  folder = os.path.abspath(folder)
  dirs = [folder]
  with contextlib.suppress(OSError):
    dirs += sorted(
        e.path
        for e in os.scandir(folder)
        if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
    )
  now, removed = time.time(), 0
  for d in dirs:
    try:
      entries = list(os.scandir(d))
    except OSError:
      continue
    for e in entries:
      m = _TEMP_WITH_PID.match(e.name)
      try:
        if not e.is_file(follow_symlinks=False):
          continue
        if m:
          stale = not pid_alive(int(m.group(1)))
        elif _TEMP_WITHOUT_PID.match(e.name):
          stale = now - e.stat().st_mtime > OLD_TEMP_STALE_S
        else:
          continue
        if stale:
          os.remove(e.path)
          removed += 1
      except OSError:  # gone meanwhile, or not ours to remove
        continue
  if removed:
    logging.info(
        "removed %d temp file(s) left by killed runs in %s", removed, folder
    )
  return removed


@contextlib.contextmanager
def folder_lock(folder: str, what: str = "folder"):
  """Holds `folder` for one run, so that two runs never mix their files.

  The lock is the file `<folder>/.softpatch.lock`, created atomically
  (O_CREAT | O_EXCL) with JSON {pid, host, started, command}, and removed on
  exit, exceptions included. While it exists another run refuses to start.

  A lock whose run died (killed, machine crash) is stale, and is taken over
  with a warning, when:
    * its host is this machine and its pid no longer runs (should the pid
      have been reused by another process since, delete the file by hand); or
    * it cannot be read or parsed and is older than CORRUPT_LOCK_STALE_S
      (a younger one is refused, with the hint to delete it if no run is
      active).
  A lock from another machine is never presumed stale, as its pid cannot be
  checked from here; the refusal then names the file to delete once that run
  is known to be gone.

  Args:
    folder: an existing folder.
    what: what the folder is to the user ('output folder', 'workdir'), for
      the refusal message.

  Yields:
    The lock file's path.

  Raises:
    ValueError: another run holds the folder.
  """
  folder = os.path.abspath(folder)
  lock = os.path.join(folder, LOCK_FILENAME)
  mine = _acquire(lock, folder, what)
  try:
    yield lock
  finally:
    # Only our own lock: never one that another run has since taken over.
    if _read(lock) == mine:
      with contextlib.suppress(OSError):
        os.remove(lock)


def _read(path):
  """The text of `path`, or None when it is gone or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError):
    return None


def _holder(text):
  """The lock record of a lock file's text, or None when it is corrupt."""
  try:
    rec = json.loads(text)
    if isinstance(rec["pid"], int) and rec["pid"] > 0 and rec["host"]:
      return rec
  except (TypeError, ValueError, KeyError):
    pass
  return None


def _acquire(lock, folder, what) -> str:
  """Creates `lock` (taking over a stale one) and returns its text."""
  text = json.dumps({
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": (
          datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      ),
      "command": shlex.join(sys.argv),
  })
  for _ in range(20):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      _remove_if_stale(lock, folder, what)
      continue
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return text
  raise ValueError(
      f"{folder} is in use by other runs (its lock {lock} keeps changing); "
      f"wait for them to finish, or choose another {what}"
  )


def _remove_if_stale(lock, folder, what) -> None:
  """Removes `lock` when stale; raises ValueError while its run is alive."""
  text = _read(lock)
  try:
    age = time.time() - os.path.getmtime(lock)
  except OSError:
    return  # released meanwhile: try again
  rec = None if text is None else _holder(text)
  if rec is None:
    if age < 1.0:  # just created, its record not written yet
      time.sleep(0.1)
      return
    if age < CORRUPT_LOCK_STALE_S:
      raise ValueError(
          f"{folder} has an unreadable lock file {lock} ({age / 60:.0f} "
          "minute(s) old); if no run is using this folder, delete that file"
      )
    reason = f"unreadable, {age / 60:.0f} minutes old"
  else:
    host, pid = rec["host"], rec["pid"]
    here = host == socket.gethostname()
    if not here or pid_alive(pid):
      hint = "" if here else f" (if that run is gone, delete {lock})"
      raise ValueError(
          f"{folder} is in use by another run (pid {pid} on host {host} "
          f"since {rec.get('started', '?')}); wait for it to finish, or "
          f"choose another {what}{hint}"
      )
    reason = f"pid {pid} no longer runs on this host"
  # Renaming is atomic: of several runs taking over at once, one moves it.
  aside = f"{lock}.{os.getpid()}.stale"
  try:
    os.rename(lock, aside)
  except OSError:
    return  # another run took it over first: look again
  if _read(aside) != text:
    # Another run replaced the stale lock with its own between our read and
    # the rename: give it back, then look again.
    if not os.path.exists(lock):
      with contextlib.suppress(OSError):
        os.rename(aside, lock)
    with contextlib.suppress(OSError):
      os.remove(aside)
    return
  with contextlib.suppress(OSError):
    os.remove(aside)
  logging.warning(
      "taking over the stale lock %s (%s); it said: %s", lock, reason, text
  )


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, obj) -> None:
  write_text(
      path,
      json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n",
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


def jsonable(obj):
  """`obj` as plain JSON types (numpy values, tuples and sets converted)."""
  return json.loads(json.dumps(obj, default=json_default))


def json_default(o):
  """`json.dumps(default=...)` for numpy values, sets and tuples (else str)."""
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  return str(o)
