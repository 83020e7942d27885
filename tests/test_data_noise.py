"""Noisy-train protocol: counts, overlap, determinism, errors, resampling."""

import pytest

import _testutil  # pylint: disable=g-bad-import-order

from softpatch_jax.data import Sample
from softpatch_jax.data import noise

_lists = _testutil.sample_lists


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_overlap_vs_no_overlap_counts(seed, ratio):
  train, test = _lists(41, 10, 30)
  n = int(ratio * 41)
  tr_o, te_o, info_o = noise.inject(train, test, ratio, overlap=True, seed=seed)
  tr_n, te_n, info_n = noise.inject(
      train, test, ratio, overlap=False, seed=seed
  )
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
  a = noise.inject(train, test, 0.2, True, seed=3)
  b = noise.inject(train, test, 0.2, True, seed=3)
  assert a == b
  draws = {
      tuple(noise.inject(train, test, 0.2, True, seed=s)[2]["injected_paths"])
      for s in range(6)
  }
  assert len(draws) > 1


def test_too_few_anomalies_message():
  train, test = _lists(100, 5, 7, cat="screw")
  with pytest.raises(ValueError) as e:
    noise.inject(train, test, 0.1, overlap=False, seed=0)
  msg = str(e.value)
  assert (
      "needs 10" in msg
      and "only 7" in msg
      and "overlap" in msg
      and "screw" in msg
  )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_range(ratio):
  train, test = _lists(10, 2, 5)
  with pytest.raises(ValueError, match="ratio"):
    noise.inject(train, test, ratio, True, 0)


def test_no_overlap_must_leave_an_anomaly():
  train, test = _lists(50, 5, 5)
  with pytest.raises(ValueError, match="every anomalous"):
    noise.inject(train, test, 0.1, overlap=False, seed=0)
  noise.inject(train, test, 0.1, overlap=True, seed=0)  # overlap is fine


def test_augment_and_resample():
  train, test = _lists(60, 3, 4)
  tr, te, info = noise.inject(
      train, test, 0.1, overlap=True, seed=1, resample=True
  )
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
  tr2, _, _ = noise.inject(
      train, test, 0.1, overlap=True, seed=1, resample=True, augment=True
  )
  assert all(s.aug_seed is not None for s in tr2[60:])
  assert [s.path for s in tr2] == [
      s.path for s in tr
  ]  # augment flag does not change the draw
  _, _, info3 = noise.inject(
      train, test, 0.05, overlap=True, seed=1, augment=True
  )
  assert info3["augment"] and info3["n_resampled"] == 0


def test_source_pool():
  train, test = _lists(30, 4, 3)
  pool = [
      Sample(f"/d/uncertain/{i}.png", 1, "uncertain_0.33") for i in range(10)
  ]
  tr, te, info = noise.inject(
      train, test, 0.2, overlap=False, seed=0, source=pool
  )
  assert info["pool_size"] == 10 and len(tr) == 36 and te == test
  assert all(p.startswith("/d/uncertain/") for p in info["injected_paths"])
  with pytest.raises(ValueError, match="source"):
    noise.inject(train, test, 0.5, overlap=False, seed=0, source=pool)
