"""The mutual-scoring discriminator against brute-force numpy."""

import numpy as np
import pytest

from softpatch_jax import denoise
from softpatch_jax import mutual


def _reference(x):
  """(N, P, N) per-image nearest distances, own image +inf (float64)."""
  n, p, _ = x.shape
  out = np.full((n, p, n), np.inf)
  for i in range(n):
    for j in range(n):
      if i != j:
        diff = x[i][:, None, :].astype(np.float64) - x[j][None]
        out[i, :, j] = np.sqrt((diff**2).sum(-1)).min(-1)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_distances_match_numpy(seed):
  rng = np.random.default_rng(seed)
  n, p, d = rng.integers(2, 8), rng.integers(1, 9), rng.integers(1, 12)
  x = rng.normal(size=(n, p, d)).astype(np.float32)
  x[1, 0] = x[0, 0]  # a duplicate across images: distance 0
  got = np.asarray(mutual.per_image_distances(x))
  ref = _reference(x)
  assert np.array_equal(np.isinf(got), np.isinf(ref))
  finite = np.isfinite(ref)
  np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=2e-3)
  assert got[1, 0, 0] < 2e-3


@pytest.mark.parametrize(
    "n,share,want", [(2, 0.5, 1), (11, 0.5, 5), (7, 0.1, 1)]
)
def test_num_nearest(n, share, want):
  assert mutual.num_nearest(n, share) == want


def test_mutual_scores_average_the_closest_images():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(9, 5, 3)).astype(np.float32)
  k = mutual.num_nearest(9)
  ref = np.sort(_reference(x), -1)[..., :k].mean(-1)
  np.testing.assert_allclose(
      np.asarray(mutual.mutual_scores(x)), ref, rtol=1e-4, atol=1e-3
  )


def test_weights_flag_a_defect_patch():
  rng = np.random.default_rng(5)
  x = rng.normal(scale=0.1, size=(12, 16, 8)).astype(np.float32)
  x[3, 7] += 3.0  # one defect patch, anywhere
  w = np.asarray(denoise.patch_weights(x, "mutual"))
  assert w.shape == (12, 16)
  assert np.unravel_index(np.argmax(w), w.shape) == (3, 7)
  assert abs(np.median(w) - 1.0) < 1e-5  # ordinary patches weigh about 1


def test_needs_two_images():
  with pytest.raises(ValueError, match="at least 2 training images"):
    mutual.num_nearest(1)
