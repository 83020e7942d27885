"""preprocess_for, the saved preprocessing record, n_batches, import cost."""

import json
import subprocess
import sys

from PIL import Image
import pytest

from softpatch_jax import data
from softpatch_jax.data import DataOptions
from softpatch_jax.data import geometry
from softpatch_jax.data import Preprocess
from softpatch_jax.data import Sample

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_preprocess_for_crops_with_the_backbone_statistics():
  opts = DataOptions(resize=64, crop=56, max_pixels=10_000, max_aspect_ratio=3)
  pre = data.preprocess_for(opts, MEAN, STD)
  assert pre == Preprocess(
      resize=64,
      crop=56,
      mean=MEAN,
      std=STD,
      max_pixels=10_000,
      max_aspect_ratio=3.0,
  )
  # resize 0 skips the resize.
  assert data.preprocess_for(DataOptions(resize=0), MEAN, STD).resize is None


def test_preprocess_for_whole_image_mode_follows_the_first_image(tmp_path):
  path = tmp_path / "wide.png"
  Image.new("RGB", (90, 30)).save(path)
  train = [Sample(str(path), 0, "good")]
  pre = data.preprocess_for(DataOptions(resize=24, crop=0), MEAN, STD, train)
  assert pre.crop is None and pre.input_size == (24, 72) and pre.whole_image
  with pytest.raises(ValueError, match="there are none"):
    data.preprocess_for(DataOptions(crop=0), MEAN, STD)


def test_record_round_trip_and_old_records():
  pre = Preprocess(
      resize=None,
      crop=None,
      mean=(0.5,),
      std=(0.25,),
      grayscale_to_rgb=False,
      input_size=(20, 40),
      max_pixels=5000,
      max_aspect_ratio=4.0,
  )
  record = pre.to_record()
  assert record == json.loads(json.dumps(record))  # JSON types
  assert sorted(record) == [
      "crop",
      "grayscale_to_rgb",
      "input_size",
      "max_aspect_ratio",
      "max_pixels",
      "mean",
      "resize",
      "std",
  ]
  assert Preprocess.from_record(record) == pre
  old = {"resize": 256, "crop": 224, "mean": list(MEAN), "std": list(STD)}
  got = Preprocess.from_record(old)
  assert got == Preprocess(mean=MEAN, std=STD)
  assert got.max_pixels == geometry.MAX_PIXELS and got.grayscale_to_rgb


@pytest.mark.parametrize(
    "n,bs,want", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (9, 3, 3)]
)
def test_n_batches(n, bs, want):
  assert data.n_batches(n, bs) == want


def test_the_data_package_does_not_import_jax():
  code = "import sys, softpatch_jax.data; print('jax' in sys.modules)"
  out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"
