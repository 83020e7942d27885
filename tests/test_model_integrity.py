"""Model file integrity: checksum, header first, ceilings on stored bounds.

Issue 24, cases 1 (a corrupted file loads without complaint), 7 (a stored
blur_sigma that hangs predict), 8 (stored resize / max_pixels / crop /
input_size without ceilings), 11 (a 2 GiB file of zeros read whole before
it is refused, with a peak-memory bound), 16 (image_size without a
ceiling), and two badly worded errors (batch_size="abc", a NaN
normalisation mean).
"""

import json
import logging
import os
import subprocess
import sys

from flax import serialization
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import model_io
from softpatch_jax import model_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved(tmp_path, m=2000, d=64):
  """A format 4 model file of a random bank of m x d floats."""
  model = _testutil.random_model(m=m, d=d)
  return model, model_io.save_model(str(tmp_path / "model.softpatch"), model)


def bare(path, edit_meta=None, version=model_io.FORMAT_VERSION):
  """A model document without the checksummed header (as formats 1-3 were
  written), its metadata edited."""
  payload = serialization.msgpack_restore(
      model_io.to_bytes(_testutil.random_model())
  )
  meta = json.loads(payload["meta"])
  if edit_meta is not None:
    edit_meta(meta)
  payload["meta"] = json.dumps(meta)
  payload["format_version"] = version
  path.write_bytes(serialization.msgpack_serialize(payload))
  return str(path)


# ------------------------------------------------------------ case 1


def test_saved_file_is_checksummed_and_round_trips(tmp_path):
  model, path = saved(tmp_path)
  raw = open(path, "rb").read()
  assert raw.startswith(model_meta.HEADER_MAGIC)
  assert model_io.FORMAT_VERSION == 4 and 4 in model_io.READABLE_VERSIONS
  back = model_io.load_model(path)
  assert back.format_version == 4
  np.testing.assert_array_equal(back.bank_features, model.bank_features)
  assert model_io.from_bytes(raw, origin=path).thresholds == model.thresholds


def test_zeroed_block_is_refused_as_corrupted(tmp_path):
  _, path = saved(tmp_path)
  raw = bytearray(open(path, "rb").read())
  mid = len(raw) // 2
  raw[mid : mid + 4096] = bytes(4096)
  with open(path, "wb") as f:
    f.write(raw)
  want = f"model file {path} is corrupted (checksum mismatch)"
  with pytest.raises(ValueError) as e:
    model_io.load_model(path)
  assert str(e.value) == want
  with pytest.raises(ValueError) as e:
    model_io.from_bytes(bytes(raw), origin=path)
  assert str(e.value) == want


def test_one_flipped_exponent_bit_is_refused(tmp_path):
  model, path = saved(tmp_path)
  raw = bytearray(open(path, "rb").read())
  # The last float32 of the bank: flip the top exponent bit of its 4 bytes.
  needle = model.bank_features.tobytes()
  at = bytes(raw).find(needle) + len(needle) - 1
  raw[at] ^= 0x40
  with open(path, "wb") as f:
    f.write(raw)
  with pytest.raises(ValueError) as e:
    model_io.load_model(path)
  assert str(e.value) == f"model file {path} is corrupted (checksum mismatch)"


def test_truncated_checksummed_file(tmp_path):
  _, path = saved(tmp_path, m=50, d=8)
  raw = open(path, "rb").read()
  size = len(raw) - model_meta.HEADER_SIZE
  with open(path, "wb") as f:
    f.write(raw[:-10])
  with pytest.raises(ValueError) as e:
    model_io.load_model(path)
  assert str(e.value) == (
      f"model file {path} is truncated or corrupted: its header announces "
      f"{size} body bytes, it holds {size - 10}"
  )
  with open(path, "wb") as f:
    f.write(raw[: model_meta.HEADER_SIZE - 5])
  with pytest.raises(ValueError) as e:
    model_io.load_model(path)
  assert str(e.value) == f"model file {path} is truncated (in its header)"


@pytest.mark.parametrize("version", [2, 3])
def test_old_file_without_checksum_loads_with_a_warning(
    tmp_path, caplog, version
):
  path = bare(tmp_path / "old.softpatch", version=version)
  with caplog.at_level(logging.WARNING):
    model = model_io.load_model(path)
  assert model.format_version == version
  assert [
      r.getMessage() for r in caplog.records if "checksum" in r.message
  ] == [
      f"model file {path} has no checksum (written before format 4): it "
      "loads unverified; save it again to add one"
  ]
  # Saved again, it gets one.
  again = model_io.save_model(str(tmp_path / "new.softpatch"), model)
  assert open(again, "rb").read().startswith(model_meta.HEADER_MAGIC)


# ------------------------------------------------------------ cases 7, 8, 16


def _set(*keys_value):
  *keys, value = keys_value

  def edit(meta):
    rec = meta
    for k in keys[:-1]:
      rec = rec[k]
    rec[keys[-1]] = value

  return edit


def _whole_image(size):
  def edit(meta):
    meta["preprocess"].update(crop=None, input_size=size)

  return edit


_BAD = "bad model metadata: "


@pytest.mark.parametrize(
    "edit,message",
    [
        (  # case 7
            _set("scoring", "blur_sigma", 1e6),
            (
                "scoring.blur_sigma must be a finite number >= 0 and < 10000,"
                " got 1000000.0"
            ),
        ),
        (  # case 8
            _set("preprocess", "resize", 65536),
            (
                "preprocess.resize must be a positive integer <= 8192 or null, "
                "got 65536"
            ),
        ),
        (
            _set("preprocess", "crop", 10000),
            (
                "preprocess.crop must be a positive integer <= 8192 or null, "
                "got 10000"
            ),
        ),
        (
            _set("preprocess", "max_pixels", 2**40),
            (
                "preprocess.max_pixels must be a positive integer <= 67108864, "
                "got 1099511627776"
            ),
        ),
        (
            _whole_image([65536, 65536]),
            (
                "preprocess: input_size 65536x65536 has 4294967296 pixels, "
                "beyond max_pixels=4194304"
            ),
        ),
        (  # case 16
            _set("image_size", [65536, 65536]),
            "image_size must be at most 67108864 pixels, got [65536, 65536]",
        ),
        (
            _set("grid", [64, 64]),
            "grid must be no larger than image_size, got [64, 64]",
        ),
        (
            lambda m: m.update(batch_size=1024, image_size=[8192, 8192]),
            (
                "batch_size x image_size must be at most 268435456 pixels, got "
                "1024 x [8192, 8192]"
            ),
        ),
        (  # badly worded errors
            _set("batch_size", "abc"),
            "batch_size must be a positive integer <= 1024, got 'abc'",
        ),
        (
            _set("batch_size", 10**9),
            "batch_size must be a positive integer <= 1024, got 1000000000",
        ),
        (
            _set("preprocess", "mean", [float("nan")] * 3),
            (
                "preprocess.mean must be 1 or 3 finite numbers, got [nan, nan,"
                " nan]"
            ),
        ),
        (
            _set("preprocess", "std", [0.5, float("inf"), 0.5]),
            "preprocess.std must be 1 or 3 finite numbers, got [0.5, inf, 0.5]",
        ),
        (
            _set("scoring", "memory_budget_mb", 1e300),
            (
                "scoring.memory_budget_mb must be a finite number >= 0 and <="
                " 1e+09 (MiB), got 1e+300"
            ),
        ),
    ],
)
def test_stored_bounds_have_ceilings(tmp_path, edit, message):
  path = bare(tmp_path / "m.softpatch", edit)
  with pytest.raises(ValueError) as e:
    model_io.load_model(path)
  assert str(e.value) == f"{path}: {_BAD}{message}"


def test_save_refuses_what_load_would_refuse(tmp_path):
  model = _testutil.random_model()
  model.preprocess = dict(model.preprocess, max_pixels=2**40)
  path = str(tmp_path / "m.softpatch")
  with pytest.raises(ValueError, match="preprocess.max_pixels must be"):
    model_io.save_model(path, model)
  assert not os.path.exists(path)


# ------------------------------------------------------------ case 11

_PEAK = r"""
import sys
from softpatch_jax import model_io


def peak_kb():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))


before = peak_kb()
try:
  model_io.load_model(sys.argv[1])
  print("loaded")
except ValueError as e:
  print("error:", e)
print("grew_kb", peak_kb() - before)
"""


def load_peak(path):
  """(message, peak-RSS growth in MiB) of loading `path` in a subprocess."""
  res = subprocess.run(
      [sys.executable, "-c", _PEAK, str(path)],
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
      timeout=300,
  )
  lines = res.stdout.strip().splitlines()
  return lines[-2], int(lines[-1].split()[1]) / 1024


def sparse(path, size, head=b""):
  with open(path, "wb") as f:
    f.write(head)
    f.truncate(size)
  return str(path)


def test_two_gib_of_zeros_refused_at_baseline_memory(tmp_path):
  path = sparse(tmp_path / "zeros.softpatch", 2 << 30)
  msg, grew = load_peak(path)
  assert msg == (
      f"error: {path} is not a SoftPatch model file "
      "(no 'softpatch-jax model' header)"
  )
  assert grew < 64, f"peak RSS grew by {grew:.0f} MiB"


def test_two_gib_body_with_a_bad_checksum_refused_at_baseline(tmp_path):
  # A valid header announcing the right length: the body is hashed in
  # chunks before anything is parsed.
  size = 2 << 30
  head = model_meta.HEADER_MAGIC + (size - model_meta.HEADER_SIZE).to_bytes(
      8, "little"
  )
  path = sparse(tmp_path / "big.softpatch", size, head)
  msg, grew = load_peak(path)
  assert msg == f"error: model file {path} is corrupted (checksum mismatch)"
  assert grew < 64, f"peak RSS grew by {grew:.0f} MiB"
