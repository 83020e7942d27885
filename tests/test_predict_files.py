"""predict_files: inputs, output names, the CSV and each image's files."""

import os

import numpy as np
from PIL import Image
import pytest

from softpatch_jax import data
from softpatch_jax import predict_files


def test_output_names_unique():
  names = predict_files.output_names(
      ["/d/a.png", "/d/a.jpg", "/d/sub/a.png", "/d/b.png"]
  )
  assert len(set(names)) == 4
  assert names[:2] == ["a_png", "a_jpg"]  # same stem: the extension kept
  assert names[2] == "sub__a" and names[3] == "b"
  assert predict_files.output_names(["/x/one.png"]) == ["one"]


def test_output_names_unique_when_flattening_collides():
  # 'sub__a.png' at the top and 'sub/a.png' flatten to the same name.
  paths = ["/d/sub__a.png", "/d/sub/a.png", "/d/sub/a.png"]
  names = predict_files.output_names(paths)
  assert len(set(names)) == 3 and all("/" not in n for n in names)
  rng = np.random.default_rng(0)
  many = [
      f"/r/{'/'.join(rng.choice(list('ab_'), rng.integers(1, 4)))}"
      f"{rng.choice(['.png', '.jpg'])}"
      for _ in range(200)
  ]
  assert len(set(predict_files.output_names(many))) == 200


def test_list_inputs(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  (tmp_path / "sub").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.png")
  (tmp_path / "notes.txt").write_text("x")
  list_inputs = predict_files.list_inputs
  assert list_inputs(str(tmp_path)) == [str(tmp_path / "a.png")]
  assert len(list_inputs(str(tmp_path), recursive=True)) == 2
  assert list_inputs(f"{tmp_path / 'a.png'},{tmp_path / 'sub'}") == [
      str(tmp_path / "a.png"),
      str(tmp_path / "sub" / "b.png"),
  ]
  with pytest.raises(ValueError, match="does not exist"):
    list_inputs(str(tmp_path / "nope.png"))
  with pytest.raises(ValueError, match="no image files among"):
    list_inputs([str(tmp_path / "notes.txt")])
  with pytest.raises(ValueError, match="no input given"):
    list_inputs(" , ")


def test_csv_round_trip_keeps_full_precision(tmp_path):
  score = float(np.float32(1) / np.float32(3))
  rows = [
      {"path": "a.png", "score": score, "decision": "normal", "threshold": 0.5},
      {"path": "b,c.png", "decision": "error", "error": 'bad "file"'},
  ]
  path = tmp_path / predict_files.CSV_FILENAME
  predict_files.write_csv(str(path), rows)
  back = predict_files.read_predictions(str(path))
  assert back[0]["score"] == score and back[0]["threshold"] == 0.5
  assert back[0]["anomalous_pixel_fraction"] is None
  assert back[1]["path"] == "b,c.png" and back[1]["error"] == 'bad "file"'
  assert back[1]["score"] is None and back[1]["heatmap"] == ""
  assert list(back[0]) == predict_files.CSV_FIELDS


def test_color_range():
  assert predict_files.color_range(3.0, 2.0) == (0.0, 4.0)
  assert predict_files.color_range(3.0, None) == (0.0, 6.0)
  assert predict_files.color_range(None, None) is None
  assert predict_files.color_range(0.0, None) is None


def spec(tmp_path, **kw):
  pre = data.Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
  return predict_files.OutputSpec(folder=str(tmp_path), pre=pre, **kw)


def test_write_one_writes_each_requested_file(tmp_path):
  s = spec(
      tmp_path,
      image_threshold=1.0,
      pixel_threshold=0.5,
      color_range=(0.0, 1.0),
      save_maps=True,
      save_masks=True,
  )
  image = np.zeros((8, 8, 3), np.float32)
  amap = np.zeros((8, 8), np.float32)
  amap[2:5, 2:5] = 0.9
  row = predict_files.write_one(s, "sub__x", "/in/sub/x.png", image, 1.5, amap)
  assert row["decision"] == "anomalous" and row["threshold"] == 1.0
  assert row["anomalous_pixel_fraction"] == 9 / 64
  heat = np.asarray(Image.open(tmp_path / row["heatmap"]))
  assert heat.shape == (8, 8, 3) and heat.dtype == np.uint8
  assert (heat[2, 2] == [0, 255, 0]).all()  # the mask outlined in green
  np.testing.assert_array_equal(np.load(tmp_path / row["map"]), amap)
  mask = np.asarray(Image.open(tmp_path / row["mask"]))
  assert set(np.unique(mask)) == {0, 255} and mask.sum() == 9 * 255
  assert row["heatmap"] == os.path.join("heatmaps", "sub__x.png")


def test_write_one_without_thresholds_or_files(tmp_path):
  s = spec(tmp_path, heatmaps=False)
  row = predict_files.write_one(
      s, "x", "x.png", np.zeros((8, 8, 3)), 0.2, np.ones((8, 8))
  )
  assert row["decision"] == "n/a" and "anomalous_pixel_fraction" not in row
  assert os.listdir(tmp_path) == []
  s = spec(tmp_path, image_threshold=0.2, heatmaps=False)
  assert s.decision(0.2) == "anomalous" and s.decision(0.1) == "normal"
  assert predict_files.error_row(s, "y.png", "cannot decode") == {
      "path": "y.png",
      "decision": "error",
      "threshold": 0.2,
      "error": "cannot decode",
  }


def test_original_size_map():
  amap = np.arange(4, dtype=np.float32).reshape(2, 2)
  same = predict_files.original_size_map(amap, (2, 2))
  np.testing.assert_array_equal(same, amap)
  big = predict_files.original_size_map(amap, (4, 6))
  assert big.shape == (4, 6) and big.dtype == np.float32
  assert amap.min() <= big.min() and big.max() <= amap.max()
