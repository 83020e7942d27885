"""Typed settings records: the checks they share, and building them.

Every stage takes a small frozen dataclass of its settings (e.g.
`denoise.DenoiseOptions`), defined beside the stage with its defaults. A
record checks its own fields when it is built, so a bad value is refused
once, with the setting's config path in the message. `build` makes a record
from a plain mapping (a config group) and refuses unknown fields; the config
is read only at the edge (`softpatch_jax.options`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Mapping


def require(ok: bool, field: str, rule: str, value: Any) -> None:
  """Raises ValueError('config.<field> must be <rule>, got <value>')."""
  if not ok:
    raise ValueError(f"config.{field} must be {rule}, got {value!r}")


def is_number(v) -> bool:
  """A real number that is not a bool."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int(v) -> bool:
  """An integer (a float with an integral value counts) that is not a bool."""
  return is_number(v) and math.isfinite(float(v)) and float(v) == int(v)


def check_int(v, field: str, lo: int = 0, hi: int = 1 << 62) -> int:
  """`v` as an int in [lo, hi]; ValueError naming `field` otherwise."""
  require(is_int(v) and lo <= int(v) <= hi, field, _range(lo, hi), v)
  return int(v)


def check_float(
    v, field: str, lo: float = -math.inf, hi: float = math.inf, **kw
) -> float:
  """`v` as a finite float in [lo, hi] (`lo_open`/`hi_open`: exclusive)."""
  ok = is_number(v) and math.isfinite(float(v))
  if ok:
    x = float(v)
    ok = (x > lo if kw.get("lo_open") else x >= lo) and (
        x < hi if kw.get("hi_open") else x <= hi
    )
  rule = "a finite number" + (
      ""
      if (lo, hi) == (-math.inf, math.inf)
      else f" in {_interval(lo, hi, kw)}"
  )
  require(ok, field, rule, v)
  return float(v)


def check_choice(v, field: str, choices) -> Any:
  """`v` when it is one of `choices`; ValueError listing them otherwise."""
  require(v in tuple(choices), field, f"one of {tuple(choices)}", v)
  return v


def _range(lo, hi) -> str:
  return (
      f"an integer >= {lo}" if hi >= 1 << 62 else f"an integer in [{lo}, {hi}]"
  )


def _interval(lo, hi, kw) -> str:
  left = "(" if kw.get("lo_open") else "["
  right = ")" if kw.get("hi_open") else "]"
  return f"{left}{lo:g}, {hi:g}{right}"


def set_field(record, name: str, value) -> None:
  """Normalises a field of a frozen record inside its `__post_init__`."""
  object.__setattr__(record, name, value)


def build(cls, values: Mapping[str, Any], prefix: str):
  """A `cls` record from a mapping; nested records from nested mappings.

  Args:
    cls: a dataclass whose fields all have defaults.
    values: field -> value (a config group's `to_dict()`); missing fields
      take the record's defaults.
    prefix: the config path of `values` ('denoise'), for error messages.

  Raises:
    ValueError: a key is not a field of `cls` (the known ones are listed),
      or the record refuses a value.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"config.{prefix}.{unknown[0]} is not a setting; config.{prefix} "
        f"has {', '.join(sorted(fields))}"
    )
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    sub = hints[name]
    if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
      value = build(sub, value, f"{prefix}.{name}")
    kwargs[name] = value
  return cls(**kwargs)


def as_dict(record) -> dict:
  """A record as plain JSON types (tuples become lists)."""
  return _plain(dataclasses.asdict(record))


def _plain(v):
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  return v
