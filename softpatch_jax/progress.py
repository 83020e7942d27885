"""A minimal progress bar for long loops (no extra dependency).

Writes to stderr, redraws in place on a terminal and prints a few plain lines
otherwise (CI logs), and always ends with the total time.
"""

from __future__ import annotations

import sys
import time


class Progress:
  """Iterates `iterable`, showing `desc`, count/total, rate and ETA."""

  def __init__(
      self, iterable, total=None, desc="", unit="it", stream=None, enabled=True
  ):
    self.iterable = iterable
    self.total = total if total is not None else _len_or_none(iterable)
    self.desc = desc
    self.unit = unit
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.n = 0
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_draw = 0.0
    self._next_plain = 0.25  # fraction of total for the next plain-log line

  def __iter__(self):
    self._start = time.perf_counter()
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n=1):
    self.n += n
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._tty:
      if now - self._last_draw > 0.2 or self.n == self.total:
        self._draw(now, end="\r")
        self._last_draw = now
    elif self.total and self.n / self.total >= self._next_plain:
      self._draw(now, end="\n")
      while self.n / self.total >= self._next_plain:
        self._next_plain += 0.25

  def _draw(self, now, end):
    elapsed = now - self._start
    rate = self.n / elapsed if elapsed > 0 else 0.0
    if self.total:
      frac = min(self.n / self.total, 1.0)
      bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
      eta = (self.total - self.n) / rate if rate > 0 else float("nan")
      msg = (
          f"{self.desc} [{bar}] {self.n}/{self.total} {self.unit} "
          f"{elapsed:.1f}s elapsed, ETA {eta:.1f}s"
      )
    else:
      msg = f"{self.desc} {self.n} {self.unit} {elapsed:.1f}s ({rate:.2f}/s)"
    self.stream.write(msg + end)
    self.stream.flush()

  def close(self):
    if self.enabled and self._tty:
      self.stream.write("\n")
      self.stream.flush()


def _len_or_none(x):
  try:
    return len(x)
  except TypeError:
    return None
