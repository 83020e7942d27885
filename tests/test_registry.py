"""The one Registry helper: refuses duplicates, lists names on a miss."""

import pytest

from softpatch_jax import registry


def test_register_get_names():
  r = registry.Registry("widget")
  a = r.register("b", 1)
  r.register("a", 2)
  assert a == 1 and r.get("a") == 2 and r.get("b") == 1
  assert r.names() == ["a", "b"] and list(r) == ["a", "b"]
  assert "a" in r and "c" not in r and len(r) == 2
  assert r.items() == [("a", 2), ("b", 1)]


def test_duplicate_refused_unless_replaced():
  r = registry.Registry("widget")
  r.register("a", 1)
  with pytest.raises(ValueError, match="widget 'a' is already registered"):
    r.register("a", 2)
  assert r.get("a") == 1
  r.register("a", 3, replace=True)
  assert r.get("a") == 3


def test_unknown_name_lists_the_names():
  r = registry.Registry("gadget")
  r.register("x", 0)
  r.register("y", 0)
  with pytest.raises(ValueError, match=r"unknown gadget 'z'; choose from x, y"):
    r.get("z")
  with pytest.raises(ValueError, match="unknown gadget"):
    r.get(["unhashable"])


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_names_refused(bad):
  with pytest.raises(ValueError, match="non-empty string"):
    registry.Registry("widget").register(bad, 0)


def test_unregister():
  r = registry.Registry("widget")
  r.register("a", 1)
  r.unregister("a")
  assert "a" not in r
  with pytest.raises(ValueError, match="unknown widget"):
    r.unregister("a")
