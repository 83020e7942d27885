"""Consensus nearest neighbours against brute-force numpy references."""

import numpy as np
import pytest

from softpatch_jax import consensus
from softpatch_jax import scoring


def _per_image_reference(bank, queries):
  """(Q, N): min over each image's patches of the squared distance."""
  diff = queries[:, None, None, :] - bank[None, :, :, :]
  return (diff.astype(np.float64) ** 2).sum(-1).min(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_distances_match_numpy(seed):
  rng = np.random.default_rng(seed)
  n, p, d, q = rng.integers(2, 9), rng.integers(1, 12), rng.integers(1, 20), 37
  bank = rng.normal(size=(n, p, d)).astype(np.float32)
  queries = rng.normal(size=(q, d)).astype(np.float32)
  queries[:3] = bank[0, :3]  # exact copies: distance 0 to image 0
  got = np.asarray(consensus.per_image_distances(bank, queries))
  ref = _per_image_reference(bank, queries)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  assert np.all(got[:3, 0] < 1e-4)


def test_blocks_cover_every_query(monkeypatch):
  # Blocks of 5 queries over 23 queries: a padded last block.
  monkeypatch.setattr(consensus, "_BLOCK_ELEMS", 5 * 4 * 3)
  rng = np.random.default_rng(3)
  bank = rng.normal(size=(4, 3, 6)).astype(np.float32)
  queries = rng.normal(size=(23, 6)).astype(np.float32)
  got = np.asarray(consensus.per_image_distances(bank, queries))
  np.testing.assert_allclose(
      got, _per_image_reference(bank, queries), rtol=1e-4, atol=1e-3
  )


def test_kth_smallest_with_ties():
  x = np.array([[3.0, 1.0, 1.0, 2.0], [5.0, 5.0, 5.0, 0.0]], np.float32)
  for k in (1, 2, 3, 4):
    np.testing.assert_array_equal(
        np.asarray(consensus.kth_smallest(x, k)), np.sort(x, -1)[:, k - 1]
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_patch_scores_are_the_kth_nearest_image(k):
  rng = np.random.default_rng(k)
  train = rng.normal(size=(6, 4, 5)).astype(np.float32)
  test = rng.normal(size=(3, 4, 5)).astype(np.float32)
  model = consensus.fit(train, consensus.ConsensusOptions(k), (2, 2), (8, 8))
  got = np.asarray(consensus.patch_scores(model, test))
  ref = _per_image_reference(train, test.reshape(-1, 5))
  ref = np.sort(ref, -1)[:, k - 1].reshape(3, 4)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_k1_is_patchcore_on_the_full_bank():
  rng = np.random.default_rng(7)
  train = rng.normal(size=(5, 9, 8)).astype(np.float32)
  test = rng.normal(size=(4, 9, 8)).astype(np.float32)
  model = consensus.fit(train, consensus.ConsensusOptions(1), (3, 3), (12, 12))
  img, maps = consensus.score(model, test)
  bank = scoring.make_bank(
      train.reshape(-1, 8), soft_weight=False, grid=(3, 3), image_size=(12, 12)
  )
  ref_img, ref_maps, _ = scoring.score(bank, test)
  np.testing.assert_allclose(np.asarray(img), np.asarray(ref_img), rtol=1e-4)
  np.testing.assert_allclose(
      np.asarray(maps), np.asarray(ref_maps), rtol=1e-4, atol=1e-4
  )


def test_a_memorised_defect_still_scores_high():
  # Ten normal images near one pattern; one training image carries a defect
  # patch, and the test image is that same image (the overlap protocol).
  rng = np.random.default_rng(0)
  normal = rng.normal(scale=0.05, size=(10, 4, 6)).astype(np.float32)
  defective = normal[0].copy()
  defective[2] += 5.0
  train = np.concatenate([normal, defective[None]])
  test = np.stack([defective, normal[1] + 0.01])
  pc = consensus.fit(train, consensus.ConsensusOptions(1), (2, 2), (4, 4))
  cs = consensus.fit(train, consensus.ConsensusOptions(3), (2, 2), (4, 4))
  pc_img = np.asarray(consensus.score(pc, test)[0])
  cs_img = np.asarray(consensus.score(cs, test)[0])
  assert pc_img[0] < 1e-2  # PatchCore finds the defect in its bank
  assert cs_img[0] > 16.0 > 100 * cs_img[1]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="consensus.k"):
    consensus.ConsensusOptions(0)
  train = np.zeros((3, 4, 2), np.float32)
  with pytest.raises(ValueError, match="k=3 needs more than 3 training"):
    consensus.fit(train, consensus.ConsensusOptions(3), (2, 2), (4, 4))
  with pytest.raises(ValueError, match="does not hold 4 patches"):
    consensus.fit(train, consensus.ConsensusOptions(1), (3, 3), (4, 4))
  train[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="training features"):
    consensus.fit(train, consensus.ConsensusOptions(1), (2, 2), (4, 4))
