"""Shared pytest setup."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  # One process runs every module; the programs a module compiled (random
  # shapes, interpret-mode kernels, backbones) would otherwise stay cached
  # to the end and the process would grow by them module after module.
  yield
  jax.clear_caches()
