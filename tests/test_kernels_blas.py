"""kernels._blas: OpenBLAS pinned to one thread inside a block, then back."""

import numpy as np
import pytest

from softpatch_jax.kernels import _blas


def test_one_thread_sets_and_restores():
  before = _blas.threads()
  if before is None:
    pytest.skip("numpy's BLAS exports no OpenBLAS thread setter here")
  with _blas.one_thread():
    assert _blas.threads() == 1
    with _blas.one_thread():  # nested: still one, then the outer value
      assert _blas.threads() == 1
    assert _blas.threads() == 1
    a = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(a @ a.T, np.einsum("ij,kj->ik", a, a))
  assert _blas.threads() == before
  with pytest.raises(RuntimeError, match="boom"):
    with _blas.one_thread():
      raise RuntimeError("boom")
  assert _blas.threads() == before


def test_without_openblas_it_does_nothing(monkeypatch):
  monkeypatch.setattr(_blas, "_openblas", lambda: None)
  assert _blas.threads() is None
  with _blas.one_thread():
    pass
