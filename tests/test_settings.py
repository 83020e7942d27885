"""Typed settings records: field checks that name the setting, and `build`."""

import dataclasses
import math

import numpy as np
import pytest

from softpatch_jax import settings


def test_check_int():
  assert settings.check_int(3, "a.b") == 3
  assert settings.check_int(3.0, "a.b") == 3
  assert settings.check_int(np.int64(5), "a.b", 5, 5) == 5
  for bad in (True, 2.5, "3", None, math.inf, -1):
    with pytest.raises(ValueError, match=r"config\.a\.b must be an integer"):
      settings.check_int(bad, "a.b")


def test_check_float():
  assert settings.check_float(0.5, "x", 0.0, 1.0) == 0.5
  assert settings.check_float(1, "x") == 1.0
  with pytest.raises(ValueError, match=r"config\.x must be a finite number"):
    settings.check_float(math.nan, "x")
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    settings.check_float(0.0, "x", 0.0, 1.0, lo_open=True)
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    settings.check_float(1.0, "x", 0.0, 1.0, hi_open=True)
  for bad in (math.inf, -math.inf, "1", None, False):
    with pytest.raises(ValueError, match="config.x"):
      settings.check_float(bad, "x")


def test_check_choice():
  assert settings.check_choice("a", "k", ("a", "b")) == "a"
  with pytest.raises(ValueError, match=r"config\.k must be one of"):
    settings.check_choice("c", "k", ("a", "b"))


@dataclasses.dataclass(frozen=True)
class _Inner:
  n: int = 1

  def __post_init__(self):
    settings.set_field(
        self, "n", settings.check_int(self.n, "outer.inner.n", 1)
    )


@dataclasses.dataclass(frozen=True)
class _Outer:
  name: str = "a"
  inner: _Inner = dataclasses.field(default_factory=_Inner)
  sizes: tuple = (1, 2)


def test_build_nested_and_defaults():
  r = settings.build(_Outer, {"inner": {"n": 4}}, "outer")
  assert r == _Outer("a", _Inner(4))
  assert settings.build(_Outer, {}, "outer") == _Outer()
  assert settings.as_dict(r) == {
      "name": "a",
      "inner": {"n": 4},
      "sizes": [1, 2],
  }


def test_build_refuses_unknown_fields_and_bad_values():
  with pytest.raises(ValueError, match=r"config\.outer\.nme is not a setting"):
    settings.build(_Outer, {"nme": "b"}, "outer")
  with pytest.raises(ValueError, match=r"config\.outer\.inner\.m is not"):
    settings.build(_Outer, {"inner": {"m": 1}}, "outer")
  with pytest.raises(ValueError, match=r"config\.outer\.inner\.n must be"):
    settings.build(_Outer, {"inner": {"n": 0}}, "outer")
