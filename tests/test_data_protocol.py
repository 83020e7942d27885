"""The protocol helpers: test subsampling, noise from config, augment flags."""

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order

from softpatch_jax import defaults
from softpatch_jax import data
from softpatch_jax.data import Augment
from softpatch_jax.data import noise

_lists = _testutil.sample_lists


def _noise_config(**noise_fields):
  c = defaults.base_config()
  c.data.dataset = "mvtec"
  for k, v in noise_fields.items():
    c.noise[k] = v
  return c


# ---------------------------------------------------------------- subsample


@pytest.mark.parametrize("max_test", [0, 42, 100])
def test_subsample_keeps_small_sets(max_test):
  _, test = _lists()
  assert data.subsample_test(test, max_test, seed=0) is test


@pytest.mark.parametrize("max_test,seed", [(10, 0), (10, 1), (7, 3), (1, 0)])
def test_subsample_per_label_shares_order_and_seed(max_test, seed):
  _, test = _lists()
  sub = data.subsample_test(test, max_test, seed)
  labels = np.array([s.label for s in sub])
  # Each label gets its rounded share of max_test, at least one image.
  for lab, n in ((0, 12), (1, 30)):
    want = max(1, int(round(max_test * n / len(test))))
    assert (labels == lab).sum() == want
  positions = [test.index(s) for s in sub]
  assert positions == sorted(positions) and len(set(positions)) == len(sub)
  assert data.subsample_test(test, max_test, seed) == sub
  others = {
      tuple(s.path for s in data.subsample_test(test, max_test, k))
      for k in range(5)
  }
  assert max_test == 1 or len(others) > 1


def test_subsample_draw_is_fixed():
  # The draw is part of the protocol: np.random.default_rng([seed, 2]),
  # labels in ascending order, choice without replacement.
  _, test = _lists()
  rng = np.random.default_rng([4, 2])
  good = rng.choice(np.arange(12), size=3, replace=False)
  bad = rng.choice(np.arange(12, 42), size=7, replace=False)
  want = [test[i] for i in sorted(list(good) + list(bad))]
  assert data.subsample_test(test, 10, 4) == want


# ---------------------------------------------------------------- noise


def test_apply_noise_zero_ratio_is_a_no_op():
  train, test = _lists()
  c = _noise_config(ratio=0.0)
  tr, te, info = data.apply_noise(c, "c", train, test)
  assert tr is train and te is test and info is None


@pytest.mark.parametrize(
    "fields",
    [
        dict(ratio=0.1, overlap=True, seed=0),
        dict(ratio=0.2, overlap=False, seed=3, augment=True),
        dict(ratio=0.5, overlap=True, seed=1, resample=True),
    ],
)
def test_apply_noise_is_noise_inject_plus_category(fields):
  train, test = _lists(n_bad=18)
  c = _noise_config(**fields)
  tr, te, info = data.apply_noise(c, "screw", train, test)
  want_tr, want_te, want_info = noise.inject(
      train,
      test,
      ratio=c.noise.ratio,
      overlap=c.noise.overlap,
      seed=c.noise.seed,
      augment=c.noise.augment,
      source=None,
      resample=c.noise.resample,
  )
  assert (tr, te) == (want_tr, want_te)
  assert info == dict(want_info, category="screw")


def test_apply_noise_uncertain_source_needs_elpv():
  train, test = _lists()
  c = _noise_config(ratio=0.1, source="uncertain")
  with pytest.raises(ValueError) as e:
    data.apply_noise(c, "mono", train, test)
  assert str(e.value) == (
      "config.noise.source='uncertain' needs the elpv dataset"
  )


def test_apply_noise_uncertain_pool_from_elpv():
  pytest.importorskip("elpv_dataset")
  c = _noise_config(ratio=0.1, overlap=False, source="uncertain")
  c.data.dataset = "elpv"
  c.data.max_train = 30
  train, test = data.load_dataset(c, "mono", None)
  tr, te, info = data.apply_noise(c, "mono", train, test)
  assert info["n_injected"] == 3 and info["pool_size"] == 173
  assert te == test  # the pool is not the test set
  assert all(s.defect_type.startswith("uncertain") for s in tr[30:])


# ---------------------------------------------------------------- augment


def test_build_augment_follows_config():
  c = defaults.base_config()
  assert data.build_augment(c) == Augment()
  c.noise.augment_rotate = False
  c.noise.augment_blur = True
  aug = data.build_augment(c)
  assert (aug.affine, aug.rotate, aug.noise, aug.blur) == (
      True,
      False,
      False,
      True,
  )
  c.noise.augment_affine = False
  c.noise.augment_noise = True
  assert data.build_augment(c) == Augment(
      affine=False, rotate=False, noise=True, blur=True
  )
