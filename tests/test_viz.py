"""viz: the colour map, heatmap overlays, mask outlines and tiled figures."""

import os

import numpy as np
from PIL import Image
import pytest

from softpatch_jax import data
from softpatch_jax import defaults
from softpatch_jax import evaluate
from softpatch_jax import predict_files
from softpatch_jax import viz


def test_colour_table():
  assert viz.LUT.shape == (256, 3) and viz.LUT.dtype == np.uint8
  np.testing.assert_array_equal(viz.LUT[0], [0, 0, 4])
  np.testing.assert_array_equal(viz.LUT[-1], [252, 255, 164])
  # Dark to bright: the brightness rises along the table.
  lum = viz.LUT.astype(float) @ [0.299, 0.587, 0.114]
  assert np.all(np.diff(lum) > -1e-9)


def test_colorize_clips_to_the_range():
  amap = np.array([[-5.0, 0.0, 1.0], [2.0, 4.0, 99.0]])
  rgb = viz.colorize(amap, 0.0, 4.0)
  assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 0], viz.LUT[0])  # below: the lowest
  np.testing.assert_array_equal(rgb[0, 1], viz.LUT[0])
  np.testing.assert_array_equal(rgb[1, 1], viz.LUT[255])
  np.testing.assert_array_equal(rgb[1, 2], viz.LUT[255])  # above: the top
  np.testing.assert_array_equal(rgb[1, 0], viz.LUT[127])
  # A flat map (vmin == vmax) does not divide by zero.
  flat = viz.colorize(np.ones((2, 2)), 1.0, 1.0)
  np.testing.assert_array_equal(flat, np.broadcast_to(viz.LUT[0], (2, 2, 3)))


def test_to_uint8_image_undoes_the_normalisation():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3))
  norm = (pixels / 255.0 - np.array(mean)) / np.array(std)
  back = viz.to_uint8_image(norm.astype(np.float32), mean, std)
  assert back.dtype == np.uint8 and back.shape == (5, 4, 3)
  np.testing.assert_array_equal(back, pixels)
  clipped = viz.to_uint8_image(np.array([[[-1.0, 0.5, 2.0]]]))
  np.testing.assert_array_equal(clipped, [[[0, 128, 255]]])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_overlay_shapes_and_blend(alpha):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  amap = rng.uniform(0, 2, (6, 7))
  over = viz.overlay(image, amap, 0.0, 2.0, alpha=alpha)
  assert over.shape == (6, 7, 3) and over.dtype == np.uint8
  heat = viz.colorize(amap, 0.0, 2.0)
  expect = np.round((1 - alpha) * image + alpha * heat.astype(float))
  np.testing.assert_array_equal(over, expect.astype(np.uint8))


def test_mask_outline_draws_the_boundary_only():
  image = np.zeros((7, 7, 3), np.uint8)
  mask = np.zeros((7, 7), bool)
  mask[2:5, 2:5] = True
  out = viz.mask_outline(image, mask)
  green = (out == [0, 255, 0]).all(-1)
  assert green[2, 2] and green[2, 4] and green[4, 3]  # the edge
  assert not green[3, 3]  # the inside
  assert not green[~mask].any()  # nothing outside the mask
  assert not image.any()  # the input is not modified


def test_tile_rows_layout():
  tile = np.full((10, 12, 3), 200, np.uint8)
  canvas = viz.tile_rows(
      [[tile, tile, tile], [tile]], row_titles=["a", "b"], col_titles="xyz"
  )
  pad, th = 4, 14
  assert canvas.size == (3 * (12 + pad) + pad, th + 2 * (10 + pad + th) + pad)
  assert canvas.mode == "RGB"
  with pytest.raises(ValueError, match="at least one tile"):
    viz.tile_rows([])


def test_mask_outline_does_not_wrap_around_the_border():
  mask = np.zeros((6, 6), bool)
  mask[:, :2] = True  # touches the left border, not the right one
  edge = viz.boundary(mask)
  assert edge[:, 1].all()  # the crossing at column 1 | 2
  assert not edge[:, 0].any()  # no outline along the image border
  assert not edge[:, 2:].any()


def _legend_bar(strip, width):
  x0, y0, x1, y1 = viz.colorbar_box(width)
  return strip[y0:y1, x0:x1]


@pytest.mark.parametrize("width", [96, 271, 700])
def test_colour_bar_shows_the_colour_table(width):
  scale = viz.ColorScale(0.0, 2.0, threshold=1.0)
  strip = viz.legend(width, scale, caption=["a caption line"])
  assert strip.dtype == np.uint8 and strip.shape[1] == width
  bar = _legend_bar(strip, width).astype(int)
  length = bar.shape[1]
  assert length == min(width - 2 * viz.BAR_MARGIN, viz.BAR_MAX_LEN)
  # Every row of the bar is the same colour column.
  assert (bar == bar[:1]).all(axis=-1)[:, :5].all()
  t = viz.bar_column(scale, width, 1.0) - viz.colorbar_box(width)[0]
  for frac in (0.0, 0.25, 0.4, 0.75, 1.0):  # value = 2 * frac
    j = int(round(frac * (length - 1)))
    if abs(j - t) <= 1:
      continue
    # One step of the table at most (float rounding of the position).
    expect = viz.LUT[int(round(frac * 255))].astype(int)
    assert np.abs(bar[bar.shape[0] // 2, j] - expect).max() <= 4, (frac, j)
  # The threshold is marked on the bar in the contour colour.
  np.testing.assert_array_equal(bar[2, t], viz.CONTOUR_COLOR)


def test_with_legend_stacks_the_bar_below():
  image = np.full((40, 120, 3), 7, np.uint8)
  scale = viz.ColorScale(0.0, 4.0)
  out = np.asarray(viz.with_legend(image, scale))
  strip = viz.legend(120, scale)
  assert out.shape == (40 + strip.shape[0], 120, 3)
  np.testing.assert_array_equal(out[:40], image)  # the image is untouched
  np.testing.assert_array_equal(out[40:], strip)
  assert scale.tick_values() == (0.0, 4.0)


def test_heat_tile_shared_scale_and_contour():
  scale = viz.ColorScale(0.0, 2.0, threshold=1.0)
  black = np.zeros((8, 8, 3), np.uint8)
  amap = np.zeros((8, 8))
  amap[:, 4:] = 1.5  # crosses the threshold between columns 3 and 4
  a = viz.heat_tile(black, amap, scale)
  b = viz.heat_tile(black, amap * 0 + 1.5, scale)  # another panel
  c = viz.heat_tile(black, amap * 0 + 0.5, scale)
  green = (a == viz.CONTOUR_COLOR).all(-1)
  assert green[:, 4].all() and not green[:, :4].any()
  assert not green[:, 5:].any()
  # The same value gets the same colour in every panel on the scale.
  np.testing.assert_array_equal(a[:, 6], b[:, 6])
  expect = np.round(0.5 * viz.colorize(np.array([1.5]), 0.0, 2.0)[0])
  np.testing.assert_array_equal(a[3, 6], expect)
  # A panel entirely below the threshold has no contour.
  assert not (c == viz.CONTOUR_COLOR).all(-1).any()
  np.testing.assert_array_equal(a[:, 0], c[:, 0] * 0 + a[0, 0])


def test_normalise_against_the_normal_images():
  rng = np.random.default_rng(0)
  maps = rng.uniform(0, 1, (6, 10, 10)) * 1000.0
  maps[4:] += 5000.0  # the defective ones
  normal = np.array([1, 1, 1, 1, 0, 0], bool)
  lo, hi = viz.reference_scale(maps, normal)
  np.testing.assert_allclose((lo, hi), np.percentile(maps[:4], [50.0, 99.0]))
  norm = viz.normalise_map(maps[:4], (lo, hi))
  assert np.mean(norm >= 1.0) == pytest.approx(0.01, abs=0.005)
  assert (viz.normalise_map(maps[4:], (lo, hi)) > 2.0).all()
  # The same relative map on scores 100x larger looks the same.
  big = viz.reference_scale(maps * 100.0, normal)
  np.testing.assert_allclose(viz.normalise_map(maps[0] * 100.0, big), norm[0])


def test_pick_rows_normal_then_defective():
  labels = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 1])
  prefer = np.zeros(10, bool)
  prefer[9] = True
  rows = viz.pick_rows(labels, 4, prefer)
  assert rows == [0, 8, 1, 3, 4, 9]  # 2 spread normals, 4 defects
  assert viz.pick_rows(np.ones(3), 2) == [0, 1]  # no normal: defects only


def _tiny_config(size=64):
  c = defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = size
  c.data.crop = size
  c.data.batch_size = 16
  c.data.num_workers = 2
  c.data.synthetic.n_train = 12
  c.data.synthetic.n_test_good = 6
  c.data.synthetic.n_test_defect = 5
  c.data.synthetic.size = size
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.2
  c.noise.overlap = True
  c.methods = "softpatch_lof,patchcore"
  c.output.num_heatmaps = 4
  return c


def test_evaluate_figure_has_normal_rows_and_a_colour_bar(
    tmp_path, monkeypatch
):
  shown = []
  real = evaluate.write_heatmaps
  monkeypatch.setattr(
      evaluate,
      "write_heatmaps",
      lambda *a, **k: shown.extend(real(*a, **k)),
  )
  evaluate.run(_tiny_config(), str(tmp_path))
  # 4 // 2 normal rows first, then 4 defective ones.
  assert shown == [0, 0, 1, 1, 1, 1]
  fig = np.asarray(Image.open(tmp_path / "heatmaps" / "synth.png"))
  # Columns: input | softpatch_lof | patchcore | mask; rows of 64 px tiles.
  pad, th, size = 4, 14, 64
  width = 4 * (size + pad) + pad
  tiles_h = th + len(shown) * (size + pad + th) + pad
  strip = viz.legend(
      width, viz.NORMALISED_SCALE, viz.normalised_caption(6, True)
  )
  assert fig.shape == (tiles_h + strip.shape[0], width, 3)
  np.testing.assert_array_equal(fig[tiles_h:], strip)
  # The contour is drawn on the defective rows' maps somewhere.
  green = (fig[:tiles_h] == viz.CONTOUR_COLOR).all(-1)
  first_defect_y = th + pad + 2 * (size + pad + th) + th
  assert green[first_defect_y:].any()


def _predict_heatmap(tmp_path, name, amap, **kw):
  pre = data.Preprocess(resize=128, crop=128, mean=(0.5,) * 3, std=(0.5,) * 3)
  spec = predict_files.OutputSpec(folder=str(tmp_path), pre=pre, **kw)
  image = np.zeros(amap.shape + (3,), np.float32)
  mask = None if spec.pixel_threshold is None else amap >= spec.pixel_threshold
  rel = predict_files.write_heatmap(spec, name, image, amap, mask)
  return spec, np.asarray(Image.open(tmp_path / rel))


def test_predict_heatmaps_share_one_scale_with_a_colour_bar(tmp_path):
  kw = dict(pixel_threshold=2.0, color_range=(0.0, 4.0))
  low = np.full((128, 128), 1.0)
  high = low.copy()
  high[40:80, 40:80] = 9.0  # a hot spot stretches no one's scale
  spec, a = _predict_heatmap(tmp_path, "a", low, **kw)
  _, b = _predict_heatmap(tmp_path, "b", high, **kw)
  assert a.shape == b.shape and a.shape[:2] != (128, 128)
  np.testing.assert_array_equal(a[:128, :30], b[:128, :30])  # same colour
  # The legend below the map: the bar of the shared scale, threshold marked.
  scale = predict_files.heatmap_scale(spec, low)
  assert (scale.vmin, scale.vmax, scale.threshold) == (0.0, 4.0, 2.0)
  x0, y0, x1, y1 = viz.colorbar_box(128)
  bar = a[128 + y0 : 128 + y1, x0:x1]
  np.testing.assert_array_equal(bar[3, 0], viz.LUT[0])
  np.testing.assert_array_equal(bar[3, -1], viz.LUT[255])
  t = viz.bar_column(scale, 128, 2.0)
  np.testing.assert_array_equal(a[128 + y0 + 3, t], viz.CONTOUR_COLOR)
  # The contour where the map crosses the threshold: the hot spot's edge
  # (and none on the map that stays below it).
  green = (b[:128] == viz.CONTOUR_COLOR).all(-1)
  assert green[40, 40:80].all() and green[40:80, 79].all()
  assert not green[50:70, 50:70].any()
  assert not (a[:128] == viz.CONTOUR_COLOR).all(-1).any()


def test_tiny_predict_heatmaps_keep_their_size(tmp_path):
  amap = np.zeros((8, 8))
  _, heat = _predict_heatmap(tmp_path, "x", amap, color_range=(0.0, 1.0))
  assert heat.shape == (8, 8, 3)  # narrower than LEGEND_MIN_WIDTH: no bar


def test_outline_width_stays_inside_the_mask():
  mask = np.zeros((9, 9), bool)
  mask[1:8, 1:8] = True
  thick = viz.boundary(mask, width=2)
  assert thick[1, 1:8].all() and thick[2, 2:7].all()  # two rings
  assert not thick[3:6, 3:6].any() and not thick[~mask].any()
  assert viz.outline_width((224, 224, 3)) == 2
  assert viz.outline_width((64, 300)) == 1
  assert viz.row_title(1, "crack", "a.png") == "defective (crack): a.png"
  assert viz.row_title(1, "defective", "a.png") == "defective: a.png"
  assert viz.row_title(0, "good", "b.png") == "normal: b.png"


def test_caption_names_the_mask_column_only_when_there_is_one():
  without = " ".join(viz.normalised_caption(55, False))
  assert "55 normal test images" in without and "Mask" not in without
  assert "Mask column" in " ".join(viz.normalised_caption(55, True))
