"""Hostile image files are decoded honestly and within bounded memory.

Issue 24's decoding cases: a PNG with fewer rows than its header declares
(2), a multi-page TIFF (3), EXIF orientation (5), a 16-bit 10,000 x 10,000
PNG (9), a 14,000 x 5,600 PNG fed to a whole-image model (10), and a .pth
whose persistent id is nested 100k deep (17). Large PNGs are written
row by row (zlib streaming), so the test process never holds them; the
peak-memory bounds are measured in a fresh interpreter (VmHWM).
"""

import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
import pytest

from softpatch_jax import data
from softpatch_jax import torch_pickle
from softpatch_jax.data import decode


def _chunk(kind: bytes, body: bytes) -> bytes:
  crc = zlib.crc32(kind + body) & 0xFFFFFFFF
  return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def write_png(path, size, depth=8, colour=0, rows=None):
  """A grey (colour 0) or RGB (2) PNG of zeros with valid CRCs and IEND.

  rows: how many rows the image data holds (default all; fewer makes the
  file short of its header).
  """
  w, h = size
  row = b"\x00" * (1 + (w * depth * (3 if colour == 2 else 1) + 7) // 8)
  ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
  comp = zlib.compressobj(9)
  idat = []
  for _ in range(h if rows is None else rows):
    idat.append(comp.compress(row))
  idat.append(comp.flush())
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
    f.write(_chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b""))
  return str(path)


# ------------------------------------------------- case 2: short PNG data


def test_truncated_loading_stays_off():
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_fewer_rows_than_its_header_is_truncated(tmp_path):
  path = write_png(tmp_path / "short.png", (64, 64), rows=40)
  with Image.open(path) as img:
    img.load()  # Pillow alone fills the 24 missing rows with black
  with pytest.raises(ValueError) as e:
    data.open_image(path)
  assert str(e.value) == (
      f"image file {path} is truncated: its PNG data holds 40 of the 64 "
      "rows its header declares"
  )
  pre = data.Preprocess(resize=64, crop=64)
  with pytest.raises(ValueError, match="is truncated: its PNG data holds 40"):
    pre.load_sample(data.Sample(path, 0, "good"))
  mask = write_png(tmp_path / "short_mask.png", (64, 64), rows=63)
  with pytest.raises(ValueError) as e:
    data.open_mask(mask)
  assert str(e.value) == (
      f"mask file {mask} is truncated: its PNG data holds 63 of the 64 "
      "rows its header declares"
  )


def test_short_interlaced_png_is_truncated(tmp_path):
  # Adam7 data of a 16 x 16 grey image is 286 bytes; cut at the end of pass
  # 6 (150 bytes) Pillow decodes it silently, cut mid-pass it complains.
  ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 1)
  for cut, message in (
      (
          150,
          (
              "is truncated: its interlaced PNG data holds 150 of the 286 bytes"
              " its header declares"
          ),
      ),
      (149, "OSError: image file is truncated"),
  ):
    path = tmp_path / f"inter{cut}.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * cut))
        + _chunk(b"IEND", b"")
    )
    with pytest.raises(ValueError) as e:
      data.open_image(path)
    assert message in str(e.value) and str(path) in str(e.value)
  full = tmp_path / "inter_full.png"
  full.write_bytes(
      b"\x89PNG\r\n\x1a\n"
      + _chunk(b"IHDR", ihdr)
      + _chunk(b"IDAT", zlib.compress(b"\x00" * 286))
      + _chunk(b"IEND", b"")
  )
  assert data.open_image(full).size == (16, 16)


def test_complete_pngs_still_decode(tmp_path):
  for depth, colour in ((8, 0), (8, 2), (16, 0), (1, 0)):
    path = write_png(
        tmp_path / f"ok{depth}_{colour}.png", (33, 7), depth, colour
    )
    img = data.open_image(path)
    assert img.size == (33, 7)
    assert not np.asarray(img).any()
  rgb = (np.arange(35 * 9 * 3) % 251).astype(np.uint8).reshape(9, 35, 3)
  Image.fromarray(rgb).save(tmp_path / "pil.png")
  np.testing.assert_array_equal(
      np.asarray(data.open_image(tmp_path / "pil.png")), rgb
  )


# ---------------------------------------------- case 3: multi-page files


def test_multi_page_tiff_is_refused_naming_the_page_count(tmp_path):
  path = tmp_path / "pages.tif"
  good, bad = Image.new("L", (32, 32), 10), Image.new("L", (32, 32), 200)
  good.save(path, save_all=True, append_images=[bad, bad])
  with pytest.raises(ValueError) as e:
    data.open_image(path)
  assert str(e.value) == (
      f"image file {path} has 3 pages (frames): only single-page images are "
      "read; save each page as its own file"
  )
  pre = data.Preprocess(resize=32, crop=32)
  with pytest.raises(ValueError, match="has 3 pages"):
    pre.load_sample(data.Sample(str(path), 0, "good"))
  good.save(tmp_path / "one.tif")
  assert np.asarray(data.open_image(tmp_path / "one.tif")).max() == 10


def test_animated_gif_is_refused(tmp_path):
  path = tmp_path / "anim.gif"
  frames = [Image.new("L", (8, 8), v) for v in (0, 255)]
  frames[0].save(path, save_all=True, append_images=frames[1:])
  with pytest.raises(ValueError, match=r"anim.gif has 2 pages \(frames\)"):
    data.open_image(path)


# ----------------------------------------------- case 5: EXIF orientation


def _upright():
  x = np.arange(24 * 40 * 3, dtype=np.int64).reshape(24, 40, 3)
  return ((x * 7) % 256).astype(np.uint8)  # 40 wide, 24 high


@pytest.mark.parametrize("tag", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(tmp_path, tag):
  # Stored so that applying the tag displays the upright picture.
  upright = Image.fromarray(_upright())
  inverse = {6: 8, 8: 6}.get(tag, tag)  # 90-degree turns invert each other
  stored = upright.transpose(data.geometry.EXIF_TRANSPOSE[inverse])
  exif = Image.Exif()
  exif[0x0112] = tag
  path = tmp_path / f"tag{tag}.png"
  stored.save(path, exif=exif)
  with Image.open(path) as raw:
    expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
  np.testing.assert_array_equal(expected, _upright())
  np.testing.assert_array_equal(np.asarray(data.open_image(path)), _upright())
  assert data.geometry.whole_image_size(path, None) == (24, 40)


def test_fit_and_predict_see_a_rotated_jpeg_as_displayed(tmp_path):
  # A JPEG stored rotated with tag 6 and the same picture stored upright:
  # load_sample (which fit and predict both use) gives the same network input
  # up to JPEG rounding, and exactly what ImageOps.exif_transpose shows.
  upright = Image.fromarray(_upright())
  exif = Image.Exif()
  exif[0x0112] = 6
  tagged = tmp_path / "tagged.jpg"
  upright.transpose(Image.Transpose.ROTATE_90).save(
      tagged, quality=100, exif=exif
  )
  plain = tmp_path / "plain.jpg"
  upright.save(plain, quality=100)
  with Image.open(tagged) as raw:
    shown = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
  np.testing.assert_array_equal(np.asarray(data.open_image(tagged)), shown)
  pre = data.Preprocess(resize=None, crop=None, input_size=(24, 40))
  x_tagged, _ = pre.load_sample(data.Sample(str(tagged), 0, "good"))
  x_plain, _ = pre.load_sample(data.Sample(str(plain), 0, "good"))
  assert x_tagged.shape == x_plain.shape == (24, 40, 3)
  assert np.abs(x_tagged - x_plain).max() < 0.15  # JPEG noise, not a turn
  turned = np.asarray(Image.open(tagged).convert("RGB"))
  assert turned.shape[:2] == (40, 24)  # as stored: the other way round


def test_mask_orientation_and_size_checked_from_the_header(tmp_path):
  image = tmp_path / "img.png"
  Image.new("RGB", (40, 24)).save(image)
  exif = Image.Exif()
  exif[0x0112] = 6
  mask = tmp_path / "mask.png"
  Image.new("L", (24, 40), 255).save(mask, exif=exif)  # displayed 40 x 24
  pre = data.Preprocess(resize=None, crop=None, input_size=(24, 40))
  _, m = pre.load_sample(data.Sample(str(image), 1, "bad", str(mask)))
  assert m.shape == (24, 40) and m.all()
  wrong = tmp_path / "wrong.png"
  Image.new("L", (40, 24), 255).save(wrong, exif=exif)  # displayed 24 x 40
  with pytest.raises(ValueError) as e:
    pre.load_sample(data.Sample(str(image), 1, "bad", str(wrong)))
  assert str(e.value) == (
      f"mask {wrong} has size 24x40 but image {image} has size 40x24 "
      "(width x height)"
  )


# ------------------------------------------- case 9: 16-bit, header first


def _old_scale(v, full):
  """The float64 rule 16-bit images were scaled by before (exact pin)."""
  out = np.round(np.clip(v.astype(np.float64), 0.0, None) * (255.0 / full))
  return np.clip(out, 0, 255).astype(np.uint8)


def test_integer_scaling_matches_the_float_rule_exactly():
  every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  img = Image.fromarray(every)
  assert img.mode == "I;16"
  np.testing.assert_array_equal(
      np.asarray(decode.to_8bit(img)), _old_scale(every, 65535.0)
  )
  wide = np.array(
      [[-5, 0, 1, 2**31 - 1], [2**20, 2**24 + 3, 123456789, 7]], np.int32
  )
  np.testing.assert_array_equal(
      np.asarray(decode.to_8bit(Image.fromarray(wide, mode="I"))),
      _old_scale(wide, 2.0**32 - 1),
  )


def test_float_images_scale_as_before():
  f = np.array([[0.0, 0.5, np.nan], [1.0, 0.25, 0.75]], np.float32)
  np.testing.assert_array_equal(
      np.asarray(decode.to_8bit(Image.fromarray(f, mode="F"))),
      _old_scale(np.nan_to_num(f), 1.0),
  )
  g = np.array([[0.0, 300.0], [1000.0, 70000.0]], np.float32)
  np.testing.assert_array_equal(
      np.asarray(decode.to_8bit(Image.fromarray(g, mode="F"))),
      _old_scale(g, 70000.0),
  )


_PEAK_RSS = r"""
import sys
from softpatch_jax import data


def peak_kb():
  # The high-water mark of this process (ru_maxrss may carry the parent's).
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))


pre = data.Preprocess(**eval(sys.argv[2]))
before = peak_kb()
try:
  pre.load_sample(data.Sample(sys.argv[1], 0, "good"))
  print("loaded")
except ValueError as e:
  print("error:", e)
print("grew_kb", peak_kb() - before)
"""


def peak_growth(path, pre_kwargs):
  """(first stdout line, peak-RSS growth in MB) of load_sample(path)."""
  res = subprocess.run(
      [sys.executable, "-W", "ignore", "-c", _PEAK_RSS, str(path), pre_kwargs],
      capture_output=True,
      text=True,
      check=True,
  )
  lines = res.stdout.strip().splitlines()
  print(path, lines)
  return lines[0], int(lines[-1].split()[1]) / 1024


def test_huge_16_bit_png_refused_from_its_header(tmp_path):
  # 10,000 x 10,000 16-bit: about 200 KB on disk; decoded and scaled in
  # float64 it cost 2,576 MB of peak RSS before (2,653 MB in all).
  path = write_png(tmp_path / "huge16.png", (10000, 10000), depth=16)
  assert (tmp_path / "huge16.png").stat().st_size < 300_000
  line, grew_mb = peak_growth(path, "dict(resize=256, crop=224)")
  assert line == (
      f"error: image {path} (10000x10000 pixels, width x height) has "
      "100000000 pixels, beyond the limit 67108864 on an original image "
      "(the larger of 67108864 and config.data.max_pixels)"
  )
  assert grew_mb < 50, grew_mb


def test_16_bit_png_decodes_straight_to_8_bit(tmp_path):
  # 8,000 x 8,000 16-bit, under the limit: 128 MB as decoded by Pillow, plus
  # the 64 MB 8-bit result. The float64 scaling cost 1,648 MB before.
  path = write_png(tmp_path / "big16.png", (8000, 8000), depth=16)
  line, grew_mb = peak_growth(path, "dict(resize=256, crop=224)")
  assert line == "loaded"
  assert grew_mb < 450, grew_mb


def test_raised_max_pixels_raises_the_original_limit(tmp_path):
  path = write_png(tmp_path / "wide.png", (9000, 8000))
  pre = data.Preprocess(resize=64, crop=64)
  with pytest.raises(ValueError, match="72000000 pixels, beyond the limit"):
    pre.load_sample(data.Sample(path, 0, "good"))
  pre = data.Preprocess(resize=64, crop=64, max_pixels=80_000_000)
  x, _ = pre.load_sample(data.Sample(path, 0, "good"))
  assert x.shape == (64, 64, 3)


# ------------------------------------ case 10: whole-image mode originals


def test_whole_image_mode_bounds_the_original(tmp_path):
  # Same aspect as the 500 x 200 model input, 14,000 x 5,600 pixels: 245 KB
  # as RGB. Decoded and resized it cost 598 MB of peak RSS in load_sample
  # alone before (3,936 MB in a predict run, with its full-size heatmap).
  path = write_png(tmp_path / "whole.png", (14000, 5600), colour=2)
  kwargs = "dict(resize=None, crop=None, input_size=(200, 500))"
  line, grew_mb = peak_growth(path, kwargs)
  assert line == (
      f"error: image {path} (14000x5600 pixels, width x height) has "
      "78400000 pixels, beyond the limit 67108864 on an original image "
      "(the larger of 67108864 and config.data.max_pixels)"
  )
  assert grew_mb < 50, grew_mb
  ok = write_png(tmp_path / "ok.png", (1000, 400))
  assert peak_growth(ok, kwargs)[0] == "loaded"


# --------------------------------------- case 17: a 100k-deep persistent id


def _pth(path, body):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
    zf.writestr("archive/byteorder", "little")
  return str(path)


def test_deeply_nested_persistent_id_is_one_clear_error(tmp_path):
  deep = b"(" * 100_000 + b"]" + b"l" * 100_000  # [[[...]]], 100k deep
  path = _pth(tmp_path / "deep_pid.pth", deep + b"Q")
  for load in (torch_pickle.load, torch_pickle.load_state_dict):
    with pytest.raises(ValueError) as e:
      load(path)
    assert str(e.value) == (
        f"{path}: cannot read torch file (CorruptFile: unsupported "
        "persistent id [[[[...]]]])"
    )
  data_path = _pth(tmp_path / "deep_data.pth", deep)
  with pytest.raises(ValueError) as e:
    torch_pickle.load(data_path)
  assert str(e.value) == (
      f"{data_path}: cannot read torch file (its objects are nested too "
      "deeply to follow: RecursionError)"
  )
