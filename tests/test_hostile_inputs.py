"""Hostile or careless inputs: one clear error, never a silent wrong answer.

Covers so far: non-finite thresholds, negative bank weights, unknown methods,
negative blur, mistyped model metadata, a string format version, and a
predict run where no input can be read.
"""

import json
import os
import subprocess
import sys

from flax import serialization
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import fit
from softpatch_jax import model_io
from softpatch_jax import predict


def random_model():
  # A backbone that needs no weights file: the predict CLI can rebuild it.
  return _testutil.random_model(
      m=20,
      d=8,
      backbone={
          "name": "efficientnet_lite0",
          "layers": ["stage3", "stage5"],
          "weights": "random",
          "seed": 0,
          "weights_id": "random:0",
      },
  )


def tampered(path, edit_meta=None, edit_payload=None):
  """Writes random_model() to `path` with its payload or metadata edited."""
  payload = serialization.msgpack_restore(model_io.to_bytes(random_model()))
  if edit_meta is not None:
    meta = json.loads(payload["meta"])
    edit_meta(meta)
    payload["meta"] = json.dumps(meta)
  if edit_payload is not None:
    edit_payload(payload)
  path.write_bytes(serialization.msgpack_serialize(payload))
  return str(path)


def _set(key, value):
  def edit(meta):
    if value is KeyError:
      del meta[key]
    else:
      meta[key] = value

  return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda m: m["thresholds"].update(image=float("nan")),
            "thresholds.image must be a finite number or null, got nan",
        ),
        (
            lambda m: m["thresholds"].update(pixel=[1.0]),
            r"thresholds.pixel must be a finite number or null, got \[1.0\]",
        ),
        (_set("method", "rm -rf /"), "method must be one of .*got 'rm -rf /'"),
        (_set("method", KeyError), "'method' is missing"),
        (_set("blur_sigma", -1.0), "blur_sigma must be a finite number >= 0"),
        (_set("grid", [4, "4"]), "grid must be two positive integers"),
        (_set("grid", [4, 4, 1]), "grid must be two positive integers"),
        (_set("soft_weight", "yes"), "soft_weight must be true or false"),
        (
            _set("backbone", ["efficientnet_lite0"]),
            "backbone must be a mapping",
        ),
        (
            lambda m: m["backbone"].pop("weights_id"),
            "backbone lacks weights_id",
        ),
    ],
)
def test_bad_metadata_is_one_clear_error(tmp_path, edit, message):
  path = tampered(tmp_path / "m.softpatch", edit_meta=edit)
  with pytest.raises(ValueError, match="bad model metadata: " + message):
    model_io.load_model(path)


def test_metadata_not_a_mapping(tmp_path):
  path = tampered(
      tmp_path / "m.softpatch",
      edit_payload=lambda p: p.update(meta=json.dumps([1, 2])),
  )
  with pytest.raises(ValueError, match="missing fields"):
    model_io.load_model(path)


def test_string_format_version(tmp_path):
  path = tampered(
      tmp_path / "m.softpatch",
      edit_payload=lambda p: p.update(format_version="1"),
  )
  with pytest.raises(
      ValueError,
      match=r"format_version must be an integer, " r"got '1' \(a str\)",
  ):
    model_io.load_model(path)


def test_negative_bank_weights_refused(tmp_path):
  model = random_model()
  model.bank_weights[3] = -2.0
  with pytest.raises(ValueError, match="weights must be >= 0, 1 are negative"):
    model_io.save_model(str(tmp_path / "m.softpatch"), model)

  def negate(payload):
    payload["arrays"]["bank_weights"] = -payload["arrays"]["bank_weights"]

  path = tampered(tmp_path / "n.softpatch", edit_payload=negate)
  with pytest.raises(ValueError, match="weights must be >= 0, 20 are"):
    model_io.load_model(path)
  assert not os.path.exists(tmp_path / "m.softpatch")


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"threshold": float("nan")}, "--threshold must be a finite number"),
        ({"threshold": float("inf")}, "--threshold must be a finite number"),
        (
            {"pixel_threshold": float("nan")},
            "--pixel_threshold must be a finite",
        ),
        ({"quantile": 1.5}, r"--quantile must be in \(0, 1\]"),
    ],
)
def test_predict_refuses_non_finite_overrides(tmp_path, kw, message):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=message):
    predict.predict(
        random_model(), str(tmp_path), str(out), progress=False, **kw
    )
  assert not out.exists()  # checked before anything is written


def test_negative_blur_sigma_in_fit_config(tmp_path):
  c = _testutil.fit_config(tmp_path, **{"scoring.blur_sigma": -1.0})
  with pytest.raises(ValueError, match="blur_sigma must be a number >= 0"):
    fit.validate_config(c)


def test_predict_exits_nonzero_when_nothing_is_readable(tmp_path):
  model = model_io.save_model(str(tmp_path / "m.softpatch"), random_model())
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "a.png").write_bytes(b"not a png")
  (inputs / "b.png").write_bytes(b"")
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "softpatch_jax.predict",
          "--model",
          model,
          "--input",
          str(inputs),
          "--output",
          str(tmp_path / "out"),
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert res.returncode == 1, res.stderr[-2000:]
  assert "error: none of the 2 input image(s) could be read" in res.stderr
  rows = predict.read_predictions(tmp_path / "out" / "predictions.csv")
  assert [r["decision"] for r in rows] == ["error", "error"]
