"""viz: the colour map, heatmap overlays, mask outlines and tiled figures."""

import numpy as np
import pytest

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
