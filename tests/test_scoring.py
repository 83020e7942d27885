"""scoring.score against plain references: numpy kNN, torch upsampling, scipy
blur; the search strategies (chunked, pruned) against one dense scan; jit
against eager; choose_search's rules."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax.kernels import knn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patch_scores_match_bruteforce(seed):
  rng = np.random.default_rng(seed)
  b, h, w = rng.integers(1, 4), rng.integers(2, 7), rng.integers(2, 7)
  d, m = rng.integers(3, 20), rng.integers(1, 70)
  p = h * w
  feats = rng.normal(size=(b, p, d)).astype(np.float32)
  bank_f = rng.normal(size=(m, d)).astype(np.float32)
  bank_w = rng.uniform(0.5, 2.0, size=(m,)).astype(np.float32)
  for soft in (False, True):
    bank = scoring.make_bank(
        bank_f,
        bank_w,
        soft_weight=soft,
        grid=(h, w),
        image_size=(4 * h, 4 * w),
        blur_sigma=1.0,
    )
    img, maps, scores = scoring.score(bank, jnp.asarray(feats))
    d2 = (
        (
            feats.reshape(-1, 1, d).astype(np.float64)
            - bank_f[None].astype(np.float64)
        )
        ** 2
    ).sum(-1)
    ref_idx = d2.argmin(1)
    ref = d2.min(1) * (bank_w[ref_idx] if soft else 1.0)
    np.testing.assert_allclose(
        np.asarray(scores).ravel(), ref, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(img), np.asarray(scores).max(-1))
    assert maps.shape == (b, 4 * h, 4 * w)


@pytest.mark.parametrize(
    "grid,size,sigma",
    [
        ((28, 28), (224, 224), 4.0),
        ((7, 5), (40, 33), 2.0),
        ((16, 16), (128, 128), 4.0),
        ((3, 3), (9, 9), 4.0),
    ],
)
def test_anomaly_maps_match_torch_and_scipy(grid, size, sigma):
  rng = np.random.default_rng(sum(grid) + sum(size))
  s = rng.uniform(0, 3, size=(2, grid[0] * grid[1])).astype(np.float32)
  up = F.interpolate(
      torch.from_numpy(s.reshape(2, 1, *grid)),
      size=size,
      mode="bilinear",
      align_corners=False,
  ).numpy()[:, 0]
  ref = np.stack([
      scipy.ndimage.gaussian_filter(u.astype(np.float64), sigma=sigma)
      for u in up
  ])
  out = np.asarray(scoring.anomaly_maps(jnp.asarray(s), grid, size, sigma))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bank_validation():
  with pytest.raises(ValueError, match="shape"):
    scoring.make_bank(np.zeros((0, 4)))
  with pytest.raises(ValueError, match="weights"):
    scoring.make_bank(np.zeros((3, 4)), np.ones(2))
  bank = scoring.make_bank(np.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"features must have shape \(B, P, 4\)"):
    scoring.score(bank, jnp.zeros((2, 5, 3)))
  with pytest.raises(ValueError, match="grid"):
    scoring.score(bank, jnp.zeros((2, 5, 4)))
  with pytest.raises(ValueError, match="blur_sigma"):
    scoring.make_bank(np.zeros((3, 4)), blur_sigma=-1.0)


def _random_bank(seed, m, d, soft=True, grid=(4, 4)):
  rng = np.random.default_rng(seed)
  return scoring.make_bank(
      rng.normal(size=(m, d)).astype(np.float32),
      rng.uniform(0.5, 2.0, size=(m,)).astype(np.float32),
      soft_weight=soft,
      grid=grid,
      image_size=(4 * grid[0], 4 * grid[1]),
      blur_sigma=2.0,
  )


@pytest.mark.parametrize("seed,soft", [(0, True), (1, False), (2, True)])
def test_chunked_scoring_equals_unchunked(seed, soft):
  rng = np.random.default_rng(seed)
  m, d = int(rng.integers(40, 300)), int(rng.integers(3, 40))
  bank = _random_bank(seed, m, d, soft)
  # Duplicate rows make exact ties: both paths must pick the lower index.
  feats_np = np.array(bank.features)
  feats_np[m // 2] = feats_np[1]
  bank = bank.replace(features=jnp.asarray(feats_np))
  feats = rng.normal(size=(3, 16, d)).astype(np.float32)
  feats[0, 0] = feats_np[1]
  ref_img, ref_maps, ref_patch = scoring.score(bank, feats)
  for rows in (1, 7, 16, m - 1):
    rows_chunk, tile = scoring.chunk_plan(m, rows)
    assert rows_chunk <= max(rows, 8) and rows_chunk % tile == 0
    chunked = scoring.ChunkedSearch(rows)
    img, maps, patch = scoring.score(bank, feats, chunked)
    # Tiles smaller than the default ones: equal up to float rounding.
    # (A query equal to a bank row is 0 or ~1e-7 away, by cancellation.)
    np.testing.assert_allclose(
        np.asarray(patch), np.asarray(ref_patch), rtol=1e-6, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(img), np.asarray(ref_img), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(maps), np.asarray(ref_maps), rtol=1e-5, atol=1e-5
    )
  assert (
      scoring.chunk_plan(m, m) is None and scoring.chunk_plan(m, None) is None
  )


def test_chunked_scoring_whole_tiles_bit_exact():
  """Chunks of whole default tiles give exactly the one-scan patch scores."""
  rng = np.random.default_rng(5)
  d = 8
  tile = knn.default_blocks(1, 10**6, 1)[1]
  m = 5 * tile // 2  # chunks of two tiles: two chunks, the last one short
  assert knn.default_blocks(1, m, 1)[1] == tile
  bank = _random_bank(5, m, d)
  feats = rng.normal(size=(2, 16, d)).astype(np.float32)
  full = scoring.score(bank, feats)
  rows = scoring.rows_for_budget(d, 2 * tile * d * 4 / 2**20)
  assert scoring.chunk_plan(m, rows) == (2 * tile, tile)
  search = scoring.choose_search(
      bank, scoring.ScoringOptions(memory_budget_mb=2 * tile * d * 4 / 2**20)
  )
  assert search == scoring.ChunkedSearch(rows) and search.name == "chunked"
  chunked = scoring.score(bank, feats, search)
  np.testing.assert_array_equal(np.asarray(full[0]), np.asarray(chunked[0]))
  np.testing.assert_array_equal(np.asarray(full[2]), np.asarray(chunked[2]))
  np.testing.assert_allclose(
      np.asarray(full[1]), np.asarray(chunked[1]), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("rows", [None, 16])
def test_score_is_jittable(rows):
  rng = np.random.default_rng(7)
  bank = _random_bank(7, 50, 6)
  feats = jnp.asarray(rng.normal(size=(2, 16, 6)).astype(np.float32))
  search = scoring.ChunkedSearch(rows) if rows else None
  eager = scoring.score(bank, feats, search)
  jitted = jax.jit(lambda b, f: scoring.score(b, f, search))(bank, feats)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6
    )


def test_rows_for_budget():
  assert scoring.rows_for_budget(1024, None) is None
  assert scoring.rows_for_budget(1024, 0) is None
  assert scoring.rows_for_budget(1024, 4.0) == 1024
  assert scoring.rows_for_budget(1024, 1e-9) == 1


@pytest.mark.parametrize("seed,soft", [(0, True), (1, False)])
def test_pruned_search_equals_dense(seed, soft, monkeypatch):
  """MemoryBank.search: the pruned host search scores like the dense kNN;
  'auto' takes it on CPU from PRUNED_MIN_ROWS rows, never under jit."""
  rng = np.random.default_rng(seed)
  m, d = int(rng.integers(300, 900)), int(rng.integers(20, 60))
  dense = _random_bank(seed, m, d, soft).replace(search="dense")
  feats = rng.normal(size=(3, 16, d)).astype(np.float32)
  feats[0, :4] = np.asarray(dense.features)[:4]  # distance 0: ties to noise
  ref = scoring.score(dense, feats)
  calls = []
  real = scoring.knn_pruned.nearest
  monkeypatch.setattr(
      scoring.knn_pruned,
      "nearest",
      lambda *a, **k: calls.append(1) or real(*a, **k),
  )
  monkeypatch.setattr(scoring, "PRUNED_MIN_ROWS", m)
  monkeypatch.setattr(scoring, "PRUNED_MIN_DIM", d)
  unlimited = scoring.ScoringOptions(memory_budget_mb=0)
  for search, used in (("pruned", True), ("auto", True), ("dense", False)):
    calls.clear()
    bank = dense.replace(search=search)
    strategy = scoring.choose_search(bank, unlimited)
    assert strategy.name == ("pruned" if used else "dense")
    got = scoring.score(bank, feats, strategy)
    assert bool(calls) == used, search
    for a, b in zip(got, ref):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4
      )
  calls.clear()
  auto = dense.replace(search="auto")
  pruned = scoring.SEARCH_STRATEGIES.get("pruned")()
  jax.jit(lambda b, f: scoring.score(b, f, pruned))(auto, jnp.asarray(feats))
  scoring.score(auto, feats)  # the default: the dense scan
  budget = scoring.ScoringOptions(memory_budget_mb=(m // 2) * d * 4 / 2**20)
  assert scoring.choose_search(auto, budget).name == "chunked"
  monkeypatch.setattr(scoring, "PRUNED_MIN_ROWS", m + 1)
  assert scoring.choose_search(auto, unlimited).name == "dense"
  assert not calls
  with pytest.raises(ValueError, match="search must be one of"):
    scoring.make_bank(np.ones((3, 2), np.float32), search="faiss")


def test_search_strategies_registry_and_mesh():
  assert scoring.SEARCH_STRATEGIES.names() == [
      "chunked",
      "dense",
      "pruned",
      "sharded",
  ]
  bank = _random_bank(3, 40, 6)
  feats = np.random.default_rng(3).normal(size=(2, 16, 6)).astype(np.float32)
  ref = scoring.score(bank, feats)
  for name in ("dense", "chunked"):  # by name: no parameters needed
    got = scoring.score(bank, feats, name)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(ref[2]))
  mesh = parallel.make_mesh(1)
  search = scoring.choose_search(bank, scoring.ScoringOptions(), mesh)
  assert search.name == "sharded" and search.mesh is mesh
  np.testing.assert_array_equal(
      np.asarray(scoring.score(bank, feats, search)[2]), np.asarray(ref[2])
  )
  with pytest.raises(ValueError, match="needs a device mesh"):
    scoring.score(bank, feats, "sharded")
  with pytest.raises(ValueError, match="unknown search strategy 'faiss'"):
    scoring.score(bank, feats, "faiss")
