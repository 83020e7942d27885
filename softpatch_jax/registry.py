"""One registry for everything that is chosen by name.

Discriminators, subsamplers, methods, search strategies, data sets and
backbones each keep a `Registry`: a name refused twice unless replaced on
purpose, and a lookup error that lists the names there are.
"""

from __future__ import annotations

from typing import Dict, Generic, Iterator, List, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Named objects of one kind (`kind` names them in errors)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, T] = {}

  def register(self, name: str, obj: T, replace: bool = False) -> T:
    """Adds `obj` under `name` and returns it.

    Raises:
      ValueError: `name` is empty or not a string, or already registered
        and `replace` is False.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} name must be a non-empty string")
    if name in self._items and not replace:
      raise ValueError(
          f"{self.kind} {name!r} is already registered; pass replace=True "
          "to replace it"
      )
    self._items[name] = obj
    return obj

  def get(self, name: str) -> T:
    """The object registered as `name`; ValueError listing the names."""
    try:
      return self._items[name]
    except (KeyError, TypeError):
      raise ValueError(
          f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}"
      ) from None

  def names(self) -> List[str]:
    """The registered names, sorted."""
    return sorted(self._items)

  def items(self) -> List[Tuple[str, T]]:
    return sorted(self._items.items())

  def unregister(self, name: str) -> None:
    """Removes `name` (for tests that register temporary entries)."""
    self.get(name)
    del self._items[name]

  def __contains__(self, name) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._items)
