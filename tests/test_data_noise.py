"""Noisy-train protocol: counts, overlap, determinism, errors, resampling."""

import os
import random

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order

from softpatch_jax import data
from softpatch_jax.data import DataOptions
from softpatch_jax.data import noise
from softpatch_jax.data import NoiseOptions
from softpatch_jax.data import Sample

_lists = _testutil.sample_lists


def _inject(train, test, ratio, overlap, seed, pool=None, **fields):
  """noise.inject with NoiseOptions(ratio, overlap, seed, **fields)."""
  opts = NoiseOptions(ratio=ratio, overlap=overlap, seed=seed, **fields)
  return noise.inject(train, test, opts, pool)


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_overlap_vs_no_overlap_counts(seed, ratio):
  train, test = _lists(41, 10, 30)
  n = int(ratio * 41)
  tr_o, te_o, info_o = _inject(train, test, ratio, overlap=True, seed=seed)
  tr_n, te_n, info_n = _inject(train, test, ratio, overlap=False, seed=seed)
  assert info_o["n_injected"] == info_n["n_injected"] == n
  assert len(tr_o) == len(tr_n) == 41 + n
  assert te_o == test and len(te_n) == len(test) - n
  inj = tr_o[41:]
  assert all(s.injected and s.label == 1 and s.aug_seed is None for s in inj)
  assert tr_o[:41] == train
  assert sorted(info_o["injected_paths"]) == sorted(s.path for s in inj)
  assert len(set(info_o["injected_paths"])) == n  # without replacement
  assert not set(info_n["injected_paths"]) & {s.path for s in te_n}
  assert (
      info_o["injected_paths"] == info_n["injected_paths"]
  )  # same draw either way
  assert (
      info_o["overlap"]
      and not info_n["overlap"]
      and info_o["seed"] == seed
      and info_o["ratio"] == ratio
  )


def test_deterministic_per_seed_and_seed_dependent():
  train, test = _lists(100, 5, 40)
  a = _inject(train, test, 0.2, True, seed=3)
  b = _inject(train, test, 0.2, True, seed=3)
  assert a == b
  draws = {
      tuple(_inject(train, test, 0.2, True, seed=s)[2]["injected_paths"])
      for s in range(6)
  }
  assert len(draws) > 1


def test_too_few_anomalies_message():
  train, test = _lists(100, 5, 7, cat="screw")
  with pytest.raises(ValueError) as e:
    _inject(train, test, 0.1, overlap=False, seed=0)
  msg = str(e.value)
  assert (
      "needs 10" in msg
      and "only 7" in msg
      and "overlap" in msg
      and "screw" in msg
  )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_range(ratio):
  with pytest.raises(ValueError) as e:
    NoiseOptions(ratio=ratio)
  assert str(e.value) == (
      f"config.noise.ratio must be a finite number in [0, 1), got {ratio!r}"
  )


def test_no_overlap_must_leave_an_anomaly():
  train, test = _lists(50, 5, 5)
  with pytest.raises(ValueError, match="every anomalous"):
    _inject(train, test, 0.1, overlap=False, seed=0)
  _inject(train, test, 0.1, overlap=True, seed=0)  # overlap is fine


def test_augment_and_resample():
  train, test = _lists(60, 3, 4)
  tr, te, info = _inject(train, test, 0.1, overlap=True, seed=1, resample=True)
  inj = tr[60:]
  assert (
      info["n_injected"] == 6 and info["n_resampled"] == 2 and info["resample"]
  )
  assert {s.path for s in inj} == {
      s.path for s in test if s.label == 1
  }  # every anomaly used once
  assert [s.aug_seed is not None for s in inj] == [False] * 4 + [
      True
  ] * 2  # repeats augmented
  tr2, _, _ = _inject(
      train, test, 0.1, overlap=True, seed=1, resample=True, augment=True
  )
  assert all(s.aug_seed is not None for s in tr2[60:])
  assert [s.path for s in tr2] == [
      s.path for s in tr
  ]  # augment flag does not change the draw
  _, _, info3 = _inject(train, test, 0.05, overlap=True, seed=1, augment=True)
  assert info3["augment"] and info3["n_resampled"] == 0


def test_source_pool():
  train, test = _lists(30, 4, 3)
  pool = [
      Sample(f"/d/uncertain/{i}.png", 1, "uncertain_0.33") for i in range(10)
  ]
  tr, te, info = _inject(train, test, 0.2, overlap=False, seed=0, pool=pool)
  assert info["pool_size"] == 10 and len(tr) == 36 and te == test
  assert all(p.startswith("/d/uncertain/") for p in info["injected_paths"])
  with pytest.raises(ValueError, match="candidate images in the pool"):
    _inject(train, test, 0.5, overlap=False, seed=0, pool=pool)


# ---------------------------------------------------------------- draws


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("n_train,n_bad", [(40, 30), (10, 4), (100, 50)])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_reference_draw_is_python_random_sample(seed, n_train, n_bad, ratio):
  train, test = _lists(n_train, 6, n_bad)
  pool = [s.path for s in test if s.label == 1]
  k = int(ratio * n_train)
  if k > len(pool):
    pytest.skip("pool too small")
  want = random.Random(seed).sample(pool, k)  # in draw order, not sorted
  tr, _, info = _inject(train, test, ratio, True, seed)
  assert info["injected_paths"] == want == [s.path for s in tr[n_train:]]
  assert info["draw"] == "reference"
  # The default draw is the reference one.
  assert _inject(train, test, ratio, True, seed, draw="reference") == (
      _inject(train, test, ratio, True, seed)
  )


def _expected_official(cat_dir, seed, k):
  """The official protocol on disk, written out independently of the loader:
  test list = sorted defect-type folders (good among them), files sorted
  within each; sample k positions of its anomalous items with Python's
  random; the names in draw order, and the test list without them."""
  test_dir = os.path.join(cat_dir, "test")
  listing = [
      (d, f)
      for d in sorted(os.listdir(test_dir))
      for f in sorted(os.listdir(os.path.join(test_dir, d)))
  ]
  positions = [i for i, (d, _) in enumerate(listing) if d != "good"]
  drawn = random.Random(seed).sample(positions, k)
  names = [f"{listing[i][0]}/{listing[i][1]}" for i in drawn]
  rest = [f"{d}/{f}" for i, (d, f) in enumerate(listing) if i not in drawn]
  return names, rest


def _rel(samples):
  return [
      "/".join(s.path.replace(os.sep, "/").split("/")[-2:]) for s in samples
  ]


@pytest.fixture(scope="module")
def layout_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("layout")
  # 'good' sorts between the defect types, so anomalous positions have a gap.
  _testutil.write_mvtec_layout(
      root, "cat", {"a_crack": 4, "b_hole": 3, "good": 5, "z_dent": 3}
  )
  return str(root)


def _layout_config(root, **noise_fields):
  """(noise, data) options of the mvtec layout at `root`."""
  return NoiseOptions(**noise_fields), DataOptions(dataset="mvtec", root=root)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
@pytest.mark.parametrize("ratio,overlap", [(0.3, False), (0.5, True)])
def test_reference_draw_on_disk_matches_official_protocol(
    layout_root, seed, ratio, overlap
):
  opts, data_opts = _layout_config(
      layout_root, ratio=ratio, overlap=overlap, seed=seed
  )
  train, test = data.load_dataset(data_opts, "cat", None)
  tr, te, info = data.apply_noise(opts, data_opts, "cat", train, test)
  k = int(ratio * 10)
  names, rest = _expected_official(os.path.join(layout_root, "cat"), seed, k)
  assert _rel(tr[10:]) == names
  assert info["injected_paths"] == [s.path for s in tr[10:]]
  assert info["draw"] == "reference" and info["inject_list"] == ""
  assert _rel(te) == (_rel(test) if overlap else rest)


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("n", [3, 7, 10, 14])
def test_stratified_draw_is_even_across_types(seed, n):
  types = {"a": 6, "b": 5, "c": 7}
  test = [
      Sample(f"/d/test/{t}/{i:03d}.png", 1, t)
      for t, m in types.items()
      for i in range(m)
  ]
  train = [Sample(f"/d/train/{i:03d}.png", 0, "good") for i in range(20)]
  _, _, info = _inject(train, test, n / 20, True, seed, draw="stratified")
  paths = info["injected_paths"]
  assert len(paths) == len(set(paths)) == n and info["draw"] == "stratified"
  counts = [sum(f"/{t}/" in p for p in paths) for t in types]
  assert max(counts) - min(counts) <= 1, counts
  again = _inject(train, test, n / 20, True, seed, draw="stratified")
  assert again[2]["injected_paths"] == paths  # deterministic
  others = {
      tuple(
          _inject(train, test, n / 20, True, s, draw="stratified")[2][
              "injected_paths"
          ]
      )
      for s in range(5)
  }
  assert len(others) > 1


def _old_numpy_draw(train, test, ratio, seed, resample=False, augment=False):
  """The draw of earlier versions, written out."""
  pool = [s for s in test if s.label == 1]
  n = int(ratio * len(train))
  rng = np.random.default_rng(seed)
  if n <= len(pool):
    picks = (
        np.sort(rng.choice(len(pool), size=n, replace=False))
        if n
        else np.zeros(0, int)
    )
    repeat = [False] * n
  else:
    extra = rng.choice(len(pool), size=n - len(pool), replace=True)
    picks = np.concatenate([np.arange(len(pool)), np.sort(extra)])
    repeat = [i >= len(pool) for i in range(n)]
  aug = rng.integers(0, 2**31 - 1, size=n)
  return [
      (pool[int(k)].path, int(aug[i]) if (augment or repeat[i]) else None)
      for i, k in enumerate(picks)
  ]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize(
    "ratio,resample,augment",
    [(0.0, False, False), (0.2, False, True), (0.1, True, False)],
)
def test_numpy_draw_is_unchanged(seed, ratio, resample, augment):
  train, test = _lists(60, 3, 12 if not resample else 4)
  tr, _, info = _inject(
      train,
      test,
      ratio,
      True,
      seed,
      augment=augment,
      resample=resample,
      draw="numpy",
  )
  got = [(s.path, s.aug_seed) for s in tr[60:]]
  assert got == _old_numpy_draw(train, test, ratio, seed, resample, augment)
  assert info["draw"] == "numpy"


@pytest.mark.parametrize("draw", noise.DRAWS)
def test_resample_and_source_pool_work_for_every_draw(draw):
  train, test = _lists(60, 3, 4)
  tr, _, info = _inject(
      train, test, 0.1, overlap=True, seed=1, resample=True, draw=draw
  )
  inj = tr[60:]
  assert info["n_injected"] == 6 and info["n_resampled"] == 2
  assert {s.path for s in inj[:4]} == {s.path for s in test if s.label == 1}
  assert [s.aug_seed is not None for s in inj] == [False] * 4 + [True] * 2
  pool = [
      Sample(f"/d/uncertain/{i}.png", 1, f"uncertain_{i % 2}")
      for i in range(10)
  ]
  tr, te, info = _inject(
      train[:30], test, 0.2, overlap=False, seed=0, pool=pool, draw=draw
  )
  assert info["pool_size"] == 10 and len(tr) == 36 and te == test
  assert len(set(info["injected_paths"])) == 6
  assert all(p.startswith("/d/uncertain/") for p in info["injected_paths"])


def test_unknown_draw_lists_the_names():
  with pytest.raises(ValueError) as e:
    NoiseOptions(draw="sorted")
  assert str(e.value) == (
      "config.noise.draw must be one of ('reference', 'stratified', "
      "'numpy'), got 'sorted'"
  )
