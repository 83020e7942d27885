"""Decoding, mode conversion, geometry and the dataset-folder loaders."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from softpatch_jax.data import Preprocess
from softpatch_jax.data import Sample
from softpatch_jax.data import btad
from softpatch_jax.data import folder
from softpatch_jax.data import mvtec
from softpatch_jax.data import open_image
from softpatch_jax.data import open_mask
from softpatch_jax.data import synthetic
from softpatch_jax.data.geometry import center_crop
from softpatch_jax.data.geometry import resized_size

RAW = Preprocess(resize=None, crop=None, mean=(0, 0, 0), std=(1, 1, 1))


def _raw(path):
  x, _ = RAW.load_sample(Sample(str(path), 0, "good"), with_mask=False)
  return x


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "w,h", [(300, 400), (400, 300), (256, 256), (301, 257), (97, 130)]
)
def test_geometry_matches_resize_short_side_then_centre_crop(w, h):
  rng = np.random.default_rng(w * h)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  pre = Preprocess(resize=64, crop=56)
  short, long_ = min(w, h), max(w, h)
  nw, nh = (
      (64, int(64 * long_ / short)) if w <= h else (int(64 * long_ / short), 64)
  )
  assert resized_size((w, h), 64) == (nw, nh)
  top, left = int(round((nh - 56) / 2.0)), int(round((nw - 56) / 2.0))
  ref = np.asarray(
      img.resize((nw, nh), Image.BILINEAR).crop(
          (left, top, left + 56, top + 56)
      )
  )
  np.testing.assert_array_equal(np.asarray(pre.geometry(img)), ref)


def test_centre_crop_pads_small_images_like_torchvision():
  img = Image.fromarray(np.full((5, 7), 200, np.uint8))
  out = np.asarray(center_crop(img, 10))
  # pad left (10-7)//2 = 1, right 2; top (10-5)//2 = 2, bottom 3
  assert out.shape == (10, 10)
  assert out[2:7, 1:8].min() == 200 and out.sum() == 200 * 35


def test_normalisation_and_layout(tmp_path):
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  Image.fromarray(arr).save(tmp_path / "a.png")
  pre = Preprocess(resize=None, crop=None)
  x, _ = pre.load_sample(
      Sample(str(tmp_path / "a.png"), 0, "good"), with_mask=False
  )
  mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)
  assert x.dtype == np.float32 and x.shape == (20, 30, 3)
  np.testing.assert_allclose(
      x, (arr / np.float32(255) - mean) / std, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(pre.denormalize(x), arr / 255.0, atol=1e-6)


# ---------------------------------------------------------------- modes
def test_grayscale_becomes_three_equal_channels(tmp_path):
  arr = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
  Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
  x = _raw(tmp_path / "g.png")
  assert x.shape == (12, 10, 3)
  for c in range(3):
    np.testing.assert_allclose(x[..., c], arr / np.float32(255), atol=1e-7)
  one = Preprocess(
      resize=None,
      crop=None,
      mean=(0, 0, 0),
      std=(1, 1, 1),
      grayscale_to_rgb=False,
  )
  y, _ = one.load_sample(
      Sample(str(tmp_path / "g.png"), 0, "good"), with_mask=False
  )
  assert y.shape == (12, 10, 1)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_scaled_by_bit_depth_not_clipped(tmp_path, ext):
  vals = np.array([0, 255, 256, 4096, 32768, 25700, 65535], dtype=np.uint16)
  arr = np.tile(vals, (4, 1))
  p = tmp_path / f"d16.{ext}"
  Image.fromarray(arr).save(p)
  assert Image.open(p).mode.startswith("I;16")
  x = _raw(p)[0, :, 0]
  expect = np.round(vals.astype(np.float64) * 255 / 65535) / 255
  np.testing.assert_allclose(x, expect, atol=1e-6)
  assert x[3] < 0.1  # 4096/65535 ~ 0.0625, never clipped to 1.0


def test_32bit_int_tiff_uses_bits_per_sample(tmp_path):
  vals = np.array([0, 2**16, 2**31 - 1], dtype=np.int32)
  Image.fromarray(np.tile(vals, (3, 1))).save(tmp_path / "i32.tif")
  assert Image.open(tmp_path / "i32.tif").mode == "I"
  x = _raw(tmp_path / "i32.tif")[0, :, 0]
  expect = np.round(vals.astype(np.float64) * 255 / (2**32 - 1)) / 255
  np.testing.assert_allclose(x, expect, atol=1e-6)


def test_rgba_drops_alpha(tmp_path):
  rng = np.random.default_rng(1)
  arr = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
  Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
  np.testing.assert_allclose(
      _raw(tmp_path / "a.png"), arr[..., :3] / np.float32(255), atol=1e-7
  )


def test_palette_and_bilevel(tmp_path):
  pal_img = Image.new("P", (6, 4))
  palette = [0, 0, 0, 255, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 9)
  pal_img.putpalette(palette)
  idx = np.array([[0, 1, 2, 1, 0, 2]] * 4, np.uint8)
  pal_img.putdata(idx.ravel().tolist())
  pal_img.save(tmp_path / "p.png")
  assert Image.open(tmp_path / "p.png").mode == "P"
  lut = np.array(palette[:9], np.float32).reshape(3, 3) / 255
  np.testing.assert_allclose(_raw(tmp_path / "p.png"), lut[idx], atol=1e-7)

  bw = Image.fromarray(np.array([[0, 255, 255]], np.uint8)).convert("1")
  bw.save(tmp_path / "b.png")
  np.testing.assert_allclose(_raw(tmp_path / "b.png")[0, :, 0], [0, 1, 1])


# ---------------------------------------------------------------- bad files
def test_zero_byte_corrupt_truncated_and_missing_name_the_file(tmp_path):
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "junk.png").write_bytes(os.urandom(300))
  Image.fromarray(
      np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  ).save(tmp_path / "full.png")
  data = (tmp_path / "full.png").read_bytes()
  (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
  for name in ["empty.png", "junk.png", "trunc.png", "missing.png"]:
    with pytest.raises(ValueError, match=name):
      open_image(str(tmp_path / name))
  with pytest.raises(ValueError, match="trunc.png"):
    open_mask(str(tmp_path / "trunc.png"))


# ---------------------------------------------------------------- masks
def test_mask_size_mismatch_names_both_files(tmp_path):
  Image.new("RGB", (20, 20)).save(tmp_path / "img.png")
  Image.new("L", (20, 21)).save(tmp_path / "img_mask.png")
  s = Sample(str(tmp_path / "img.png"), 1, "x", str(tmp_path / "img_mask.png"))
  with pytest.raises(ValueError) as e:
    Preprocess(resize=16, crop=16).load_sample(s)
  assert (
      "img.png" in str(e.value)
      and "img_mask.png" in str(e.value)
      and "20x21" in str(e.value)
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_is_resized_value_equal_255(tmp_path, seed):
  rng = np.random.default_rng(seed)
  h, w = rng.integers(12, 30, size=2)
  m = np.zeros((h, w), np.uint8)
  y0, x0 = h // 2 - 3 + rng.integers(-1, 2), w // 2 - 3 + rng.integers(-1, 2)
  m[y0 : y0 + 6, x0 : x0 + 7] = 255  # near the centre so the crop keeps it
  Image.new("RGB", (int(w), int(h))).save(tmp_path / "i.png")
  Image.fromarray(m).save(tmp_path / "m.png")
  pre = Preprocess(resize=40, crop=32)
  _, got = pre.load_sample(
      Sample(str(tmp_path / "i.png"), 1, "x", str(tmp_path / "m.png"))
  )
  # hand computation: PIL bilinear resize of the mask, centre crop, keep
  # == 255 only
  nw, nh = resized_size((int(w), int(h)), 40)
  r = np.asarray(Image.fromarray(m).resize((nw, nh), Image.BILINEAR))
  top, left = int(round((nh - 32) / 2.0)), int(round((nw - 32) / 2.0))
  r = r[top : top + 32, left : left + 32]
  np.testing.assert_array_equal(got, (r == 255).astype(np.float32))
  assert (
      (r > 0) & (r < 255)
  ).any()  # edge values exist and are counted as normal
  assert 0 < got.sum() < (r > 127).sum()


def test_mask_modes(tmp_path):
  m = np.zeros((8, 8), np.uint8)
  m[2:5, 3:6] = 1
  Image.fromarray(m).save(tmp_path / "m01.png")  # 0/1 mask
  Image.fromarray(np.stack([m * 200, m * 0, m * 0], -1)).save(
      tmp_path / "mrgb.png"
  )  # colour
  Image.fromarray(m.astype(np.uint16) * 65535).save(
      tmp_path / "m16.png"
  )  # 16-bit
  for f in ["m01.png", "mrgb.png", "m16.png"]:
    out = np.asarray(open_mask(str(tmp_path / f)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, m * 255, err_msg=f)


def test_sample_without_mask_gets_zeros(tmp_path):
  Image.new("RGB", (30, 30), (9, 9, 9)).save(tmp_path / "i.png")
  x, m = Preprocess(resize=20, crop=16).load_sample(
      Sample(str(tmp_path / "i.png"), 0, "good")
  )
  assert x.shape == (16, 16, 3) and m.shape == (16, 16) and m.sum() == 0


# ---------------------------------------------------------------- MVTec layout
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("mv")
  synthetic.make_mvtec_like(
      root,
      categories=("aa", "bb"),
      n_train=5,
      n_test_good=3,
      n_test_defect=2,
      size=48,
      seed=3,
  )
  return str(root)


def test_mvtec_loader(synth_root):
  assert mvtec.list_categories(synth_root) == ["aa", "bb"]
  train, test = mvtec.load_category(synth_root, "aa")
  assert len(train) == 5 and all(
      s.label == 0 and s.mask_path is None for s in train
  )
  assert [s.path for s in train] == sorted(s.path for s in train)
  assert len(test) == 3 + 2 * 2
  for s in test:
    assert s.category == "aa"
    if s.defect_type == "good":
      assert s.label == 0 and s.mask_path is None
    else:
      assert s.label == 1 and s.mask_path.endswith(
          os.path.join(
              "ground_truth",
              s.defect_type,
              os.path.basename(s.path)[:-4] + "_mask.png",
          )
      )
  assert mvtec.load_category(synth_root, "aa") == (train, test)  # deterministic


def _tiny_mvtec(root, with_mask=True):
  for sub in ["train/good", "test/good", "test/crack", "ground_truth/crack"]:
    os.makedirs(os.path.join(root, "c", sub), exist_ok=True)
  for sub in ["train/good/000.png", "test/good/000.png", "test/crack/000.png"]:
    Image.new("RGB", (8, 8)).save(os.path.join(root, "c", sub))
  if with_mask:
    Image.new("L", (8, 8)).save(
        os.path.join(root, "c", "ground_truth/crack/000_mask.png")
    )


def test_mvtec_errors_and_warnings(tmp_path, caplog):
  with pytest.raises(ValueError, match="train"):
    os.makedirs(tmp_path / "a" / "c" / "test")
    mvtec.load_category(str(tmp_path / "a"), "c")
  _tiny_mvtec(str(tmp_path / "b"), with_mask=False)
  with pytest.raises(ValueError, match=r"ground_truth.crack.000_mask\.png"):
    mvtec.load_category(str(tmp_path / "b"), "c")
  _tiny_mvtec(str(tmp_path / "d"))
  (tmp_path / "d" / "c" / "train" / "good" / "notes.txt").write_text("x")
  (tmp_path / "d" / "c" / "train" / "good" / "Thumbs.db").write_text("x")
  with caplog.at_level(logging.WARNING):
    train, test = mvtec.load_category(str(tmp_path / "d"), "c")
  assert len(train) == 1 and len(test) == 2
  assert "notes.txt" in caplog.text and "Thumbs.db" in caplog.text
  os.remove(tmp_path / "d" / "c" / "train" / "good" / "000.png")
  with pytest.raises(ValueError, match="no training image"):
    mvtec.load_category(str(tmp_path / "d"), "c")
  with pytest.raises(ValueError, match="nope"):
    mvtec.load_category(str(tmp_path / "d"), "nope")


# ---------------------------------------------------------------- BTAD + folder
def test_btad_loader(tmp_path):
  c = tmp_path / "01"
  for sub in ["train/ok", "test/ok", "test/ko", "ground_truth/ko"]:
    os.makedirs(c / sub)
  for i in range(3):
    Image.new("RGB", (8, 8)).save(c / "train" / "ok" / f"{i:04d}.bmp")
  Image.new("RGB", (8, 8)).save(c / "test" / "ok" / "0000.bmp")
  Image.new("RGB", (8, 8)).save(c / "test" / "ko" / "0001.bmp")
  Image.new("RGB", (8, 8)).save(c / "test" / "ko" / "0002.bmp")
  Image.new("L", (8, 8)).save(c / "ground_truth" / "ko" / "0001.png")
  Image.new("L", (8, 8)).save(c / "ground_truth" / "ko" / "0002.bmp")
  assert btad.list_categories(str(tmp_path)) == ["01"]
  train, test = btad.load_category(str(tmp_path), "01")
  assert len(train) == 3 and [s.label for s in test] == [1, 1, 0]
  assert test[0].mask_path.endswith("0001.png") and test[1].mask_path.endswith(
      "0002.bmp"
  )
  os.remove(c / "ground_truth" / "ko" / "0002.bmp")
  with pytest.raises(ValueError, match="0002"):
    btad.load_category(str(tmp_path), "01")


def test_folder_loader(tmp_path):
  os.makedirs(tmp_path / "train" / "sub")
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "sub" / "b.jpg")
  train, none = folder.load_folder(str(tmp_path / "train"))
  assert len(train) == 2 and none == [] and all(s.label == 0 for s in train)

  os.makedirs(tmp_path / "flat")
  Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
  _, test = folder.load_folder(str(tmp_path / "train"), str(tmp_path / "flat"))
  assert [s.label for s in test] == [-1]

  for sub in ["test/OK", "test/dent", "test/hole", "ground_truth/dent"]:
    os.makedirs(tmp_path / sub)
  Image.new("RGB", (8, 8)).save(tmp_path / "test" / "OK" / "n.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "test" / "dent" / "d.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "test" / "hole" / "h.png")
  Image.new("L", (8, 8)).save(tmp_path / "ground_truth" / "dent" / "d_mask.png")
  _, test = folder.load_folder(str(tmp_path / "train"), str(tmp_path / "test"))
  got = {s.defect_type: (s.label, s.mask_path is not None) for s in test}
  assert got == {"OK": (0, False), "dent": (1, True), "hole": (1, False)}
  with pytest.raises(ValueError, match="missing_dir"):
    folder.load_folder(str(tmp_path / "missing_dir"))

  # a validation folder holding its own ground_truth/: masks found, masks
  # never images
  os.makedirs(tmp_path / "test" / "ground_truth" / "hole")
  Image.new("L", (8, 8)).save(
      tmp_path / "test" / "ground_truth" / "hole" / "h_mask.png"
  )
  train, test = folder.load_folder(
      str(tmp_path / "test"), str(tmp_path / "test")
  )
  assert len(train) == 3 and not any(
      "ground_truth" in s.path for s in train + test
  )
  got = {s.defect_type: (s.label, s.mask_path is not None) for s in test}
  assert got == {"OK": (0, False), "dent": (1, True), "hole": (1, True)}


def test_la_and_float_modes(tmp_path):
  arr = np.array([[0, 64, 255]], np.uint8)
  Image.fromarray(np.stack([arr, arr * 0], -1), mode="LA").save(
      tmp_path / "la.png"
  )
  np.testing.assert_allclose(
      _raw(tmp_path / "la.png")[0, :, 1], arr[0] / np.float32(255), atol=1e-7
  )
  Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(
      tmp_path / "f.tif"
  )
  np.testing.assert_allclose(
      _raw(tmp_path / "f.tif")[0, :, 0], [0, 128 / 255, 1], atol=1e-6
  )
