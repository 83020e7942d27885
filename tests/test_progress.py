"""progress.Progress: disabled, plain-log and terminal output."""

import io

from softpatch_jax.progress import Progress


class Tty(io.StringIO):

  def isatty(self):
    return True


def test_disabled_writes_nothing_but_counts():
  out = io.StringIO()
  bar = Progress(range(7), desc="x", stream=out, enabled=False)
  assert list(bar) == list(range(7))
  assert bar.n == 7 and bar.total == 7
  assert out.getvalue() == ""


def test_plain_log_prints_quarters():
  out = io.StringIO()
  items = list(Progress(range(8), desc="fit", unit="batches", stream=out))
  assert items == list(range(8))
  lines = out.getvalue().splitlines()
  assert [l.split("] ")[1].split(" ")[0] for l in lines] == [
      "2/8",
      "4/8",
      "6/8",
      "8/8",
  ]
  assert lines[0].startswith("fit [#####---------------] 2/8 batches ")
  assert lines[-1].startswith("fit [####################] 8/8 batches ")
  assert all("elapsed, ETA" in l for l in lines)


def test_plain_log_without_total_prints_nothing():
  out = io.StringIO()
  bar = Progress((i for i in range(5)), stream=out)
  assert bar.total is None
  assert list(bar) == list(range(5))
  assert out.getvalue() == ""


def test_terminal_redraws_in_place_and_ends_the_line():
  out = Tty()
  assert list(Progress(range(3), desc="p", stream=out)) == [0, 1, 2]
  text = out.getvalue()
  assert text.endswith("\n") and "\r" in text
  assert "p [####################] 3/3 it" in text  # the last draw is forced


def test_terminal_without_total_shows_count_and_rate():
  out = Tty()
  assert list(Progress((i for i in range(2)), desc="q", stream=out)) == [0, 1]
  first = out.getvalue().split("\r")[0]
  assert first.startswith("q 1 it ") and first.endswith("/s)")
