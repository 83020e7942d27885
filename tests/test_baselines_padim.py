"""baselines.padim against a numpy / scipy PaDiM on small random inputs."""

import jax
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import distance

from softpatch_jax.baselines import padim


def _zoom(a, size):
  """(h, w, C) -> (H, W, C): align_corners=False bilinear (scipy's grid mode
  with edge clamping is the same rule)."""
  h, w = a.shape[:2]
  return np.stack(
      [
          ndimage.zoom(
              a[..., c].astype(np.float64),
              (size[0] / h, size[1] / w),
              order=1,
              mode="nearest",
              grid_mode=True,
          )
          for c in range(a.shape[-1])
      ],
      -1,
  )


def _np_embed(maps, channels):
  """Layer maps (N, h_l, w_l, C_l) -> (N, P, d) in float64."""
  ref = maps[0].shape[1:3]
  out = []
  for i in range(maps[0].shape[0]):
    cat = np.concatenate([_zoom(m[i], ref) for m in maps], -1)
    out.append(cat[..., list(channels)].reshape(-1, len(channels)))
  return np.stack(out)


def _np_padim(train, test, grid, image_size, sigma=4.0):
  """PaDiM as the paper's code computes it: np.cov + 0.01 I, np.linalg.inv,
  scipy's Mahalanobis distance, upsampled map, Gaussian blur, max."""
  n, p, d = train.shape
  dist = np.zeros((test.shape[0], p))
  for j in range(p):
    mean = train[:, j].mean(0)
    cov = np.cov(train[:, j], rowvar=False) + 0.01 * np.eye(d)
    inv = np.linalg.inv(cov)
    for b in range(test.shape[0]):
      dist[b, j] = distance.mahalanobis(test[b, j], mean, inv)
  maps = np.stack([
      ndimage.gaussian_filter(
          _zoom(dm.reshape(*grid, 1), image_size)[..., 0], sigma, mode="reflect"
      )
      for dm in dist
  ])
  return dist, maps, maps.reshape(len(maps), -1).max(-1)


def _layers(rng, n, h, chans):
  """Maps at strides 1, 2, 4 of an h x h grid, scaled unevenly."""
  return [
      (rng.normal(size=(n, h // s, h // s, c)) * rng.uniform(0.3, 3, c)).astype(
          np.float32
      )
      for s, c in zip((1, 2, 4), chans)
  ]


@pytest.mark.parametrize(
    "seed,n,h,chans,keep",
    [(0, 12, 8, (3, 4, 5), 7), (1, 9, 4, (2, 3, 6), 11)],
)
def test_matches_numpy_scipy_reference(seed, n, h, chans, keep):
  rng = np.random.default_rng(seed)
  maps = _layers(rng, n + 3, h, chans)
  channels = padim.select_channels(jax.random.PRNGKey(seed), sum(chans), keep)
  x = np.asarray(padim.embed_maps(maps, channels))
  ref_x = _np_embed(maps, channels)
  np.testing.assert_allclose(x, ref_x, rtol=1e-5, atol=1e-5)

  image_size = (4 * h, 3 * h)  # not square: rows and columns stay apart
  model = padim.fit_arrays(
      x[:n], channels=channels, grid=(h, h), image_size=image_size, batch=4
  )
  img, maps_out, dist = (np.asarray(a) for a in padim.score(model, x[n:]))
  ref_dist, ref_maps, ref_img = _np_padim(
      ref_x[:n], ref_x[n:], (h, h), image_size
  )
  np.testing.assert_allclose(dist, ref_dist, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(maps_out, ref_maps, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(img, ref_img, rtol=2e-4, atol=2e-4)


def test_streamed_statistics_equal_the_whole_set():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(23, 6, 4)) * 5 + 100).astype(np.float32)
  weight = (rng.random(23) < 0.7).astype(np.float32)
  weight[:2] = 1.0
  total = None
  for s in range(0, 23, 5):  # uneven batches, some images weighted out
    part = padim.batch_stats(x[s : s + 5], weight[s : s + 5])
    total = part if total is None else padim.merge_stats(total, part)
  kept = x[weight > 0].astype(np.float64)
  assert float(total.n) == len(kept)
  np.testing.assert_allclose(total.mean, kept.mean(0), rtol=1e-5)
  for j in range(6):
    cov = np.cov(kept[:, j], rowvar=False)
    np.testing.assert_allclose(
        np.asarray(total.m2[j]) / (len(kept) - 1), cov, rtol=1e-3, atol=1e-3
    )
  # Removing a fold gives the statistics of the rest.
  fold = padim.batch_stats(x[[1, 4, 7]])
  rest = padim.subtract_stats(padim.batch_stats(x), fold)
  others = np.delete(x, [1, 4, 7], 0).astype(np.float64)
  np.testing.assert_allclose(rest.mean, others.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(rest.m2) / (len(others) - 1),
      np.stack([np.cov(others[:, j], rowvar=False) for j in range(6)]),
      rtol=1e-3,
      atol=2e-3,
  )


def test_chunked_fit_equals_one_chunk_and_inverse_factor():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(30, 10, 40)).astype(np.float32)  # 40: ragged blocks
  stats = padim.batch_stats(x)
  kw = dict(channels=tuple(range(40)), grid=(2, 5), image_size=(8, 20))
  one = padim.fit(stats, **kw)
  chunked = padim.fit(stats, chunk=3, **kw)
  np.testing.assert_allclose(chunked.whitening, one.whitening, atol=1e-6)
  w = np.asarray(one.whitening, np.float64)
  assert np.allclose(np.triu(w, 1), 0)
  for j in range(10):
    cov = np.cov(x[:, j].astype(np.float64), rowvar=False) + 0.01 * np.eye(40)
    np.testing.assert_allclose(
        w[j].T @ w[j], np.linalg.inv(cov), rtol=2e-3, atol=2e-3
    )


def test_select_channels():
  key = jax.random.PRNGKey(0)
  for total, n in [(448, 100), (5, 5)]:
    ch = padim.select_channels(key, total, n)
    assert len(ch) == n and list(ch) == sorted(set(ch))
    assert 0 <= ch[0] and ch[-1] < total
  assert padim.select_channels(key, 448, 100) != padim.select_channels(
      jax.random.PRNGKey(1), 448, 100
  )
  with pytest.raises(ValueError, match="between 1 and 5"):
    padim.select_channels(key, 5, 6)


def test_bad_inputs():
  x = np.zeros((1, 4, 3), np.float32)
  kw = dict(channels=(0, 1, 2), grid=(2, 2), image_size=(8, 8))
  with pytest.raises(ValueError, match="at least 2 training images"):
    padim.fit_arrays(x, **kw)
  with pytest.raises(ValueError, match=r"grid \(3, 3\)"):
    padim.fit_arrays(np.ones((3, 4, 3), np.float32), **dict(kw, grid=(3, 3)))
  with pytest.raises(ValueError, match="channel 9"):
    padim.embed_maps([np.zeros((1, 2, 2, 4), np.float32)], (1, 9))
