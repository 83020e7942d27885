"""Shared pytest setup."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_kernel_programs(request):
  # The kernel tests compile hundreds of one-off programs (interpret mode,
  # random shapes) that no later module reuses; dropping them keeps the
  # suite's single process from growing by their executables.
  yield
  if request.module.__name__.startswith("test_kernels"):
    jax.clear_caches()
