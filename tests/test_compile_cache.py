"""compile_cache: the command lines' persistent XLA compilation cache."""

import os
import subprocess
import sys

import jax
import pytest

from softpatch_jax import compile_cache


@pytest.fixture(autouse=True)
def _restore_jax_config():
  keys = (
      "jax_compilation_cache_dir",
      "jax_persistent_cache_min_compile_time_secs",
  )
  saved = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def test_default_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.delenv("SOFTPATCH_JAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == str(tmp_path / "softpatch_jax" / "xla")
  monkeypatch.setenv("SOFTPATCH_JAX_CACHE_DIR", "off")
  assert compile_cache.default_dir() == "off"
  assert compile_cache.enable() is None


def test_enable_sets_the_folder(tmp_path):
  path = compile_cache.enable(str(tmp_path / "c"))
  assert path == str(tmp_path / "c") and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path


@pytest.mark.parametrize("off", ["off", "", "none", "OFF"])
def test_off(off):
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable(off) is None
  assert jax.config.jax_compilation_cache_dir == before


def test_unusable_folder_warns_and_runs_without(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable(str(blocker / "xla")) is None
  assert jax.config.jax_compilation_cache_dir == before


def test_second_process_reads_what_the_first_wrote(tmp_path):
  # A program slow enough to compile (> the 1 s threshold is not needed:
  # the threshold is lowered here) is written once and read back.
  script = (
      "import jax, jax.numpy as jnp\nfrom softpatch_jax import"
      f" compile_cache\ncompile_cache.enable({str(tmp_path)!r})\njax.config.update('jax_persistent_cache_min_compile_time_secs',"
      " 0)\nprint(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8,"
      " 8)))[0, 0]))\n"
  )
  run = lambda: subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
  ).stdout
  first = run()
  entries = os.listdir(tmp_path)
  assert entries, "nothing was written to the cache"
  assert run() == first
  assert sorted(os.listdir(tmp_path)) == sorted(entries)
