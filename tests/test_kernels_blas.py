"""kernels.blas: OpenBLAS pinned to one thread inside a block, then back."""

import numpy as np
import pytest

from softpatch_jax.kernels import blas


def test_one_thread_sets_and_restores():
  before = blas.threads()
  if before is None:
    pytest.skip("numpy's BLAS exports no OpenBLAS thread setter here")
  with blas.one_thread():
    assert blas.threads() == 1
    with blas.one_thread():  # nested: still one, then the outer value
      assert blas.threads() == 1
    assert blas.threads() == 1
    a = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(a @ a.T, np.einsum("ij,kj->ik", a, a))
  assert blas.threads() == before
  with pytest.raises(RuntimeError, match="boom"):
    with blas.one_thread():
      raise RuntimeError("boom")
  assert blas.threads() == before


def test_without_openblas_it_does_nothing(monkeypatch):
  monkeypatch.setattr(blas, "_openblas", lambda: None)
  assert blas.threads() is None
  with blas.one_thread():
    pass
