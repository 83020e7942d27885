"""validation: finiteness checks, skipped while tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import validation


def test_check_finite():
  validation.check_finite(np.ones(3), "x")
  with pytest.raises(ValueError, match=r"^x: 2 non-finite values .* of 4; hi"):
    validation.check_finite(np.array([1, np.nan, np.inf, 0]), "x", "hi")


def test_skipped_under_jit():
  @jax.jit
  def f(x):
    validation.check_finite(x, "x")  # a tracer: nothing to count
    assert not validation.is_concrete(x)
    return x

  assert np.isnan(np.asarray(f(jnp.array([np.nan])))).all()
  assert validation.is_concrete(np.zeros(2)) and validation.is_concrete(1.0)
