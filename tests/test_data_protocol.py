"""The protocol helpers: test subsampling, noise from config, augment flags."""

import dataclasses
import os
import pickle
import zipfile

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order

from softpatch_jax import data
from softpatch_jax.data import Augment
from softpatch_jax.data import DataOptions
from softpatch_jax.data import noise
from softpatch_jax.data import NoiseOptions

_lists = _testutil.sample_lists
MVTEC = DataOptions(dataset="mvtec")


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
  tr, te, info = data.apply_noise(
      NoiseOptions(ratio=0.0), MVTEC, "c", train, test
  )
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
  opts = NoiseOptions(**fields)
  tr, te, info = data.apply_noise(opts, MVTEC, "screw", train, test)
  want_tr, want_te, want_info = noise.inject(train, test, opts)
  assert (tr, te) == (want_tr, want_te)
  assert info == dict(want_info, category="screw", inject_list="")
  assert info["draw"] == "reference"


def test_apply_noise_uncertain_source_needs_elpv():
  train, test = _lists()
  opts = NoiseOptions(ratio=0.1, source="uncertain")
  with pytest.raises(ValueError) as e:
    data.apply_noise(opts, MVTEC, "mono", train, test)
  assert str(e.value) == (
      "config.noise.source='uncertain' needs the elpv dataset"
  )


def test_apply_noise_uncertain_pool_from_elpv():
  pytest.importorskip("elpv_dataset")
  opts = NoiseOptions(ratio=0.1, overlap=False, source="uncertain")
  elpv = DataOptions(dataset="elpv", max_train=30)
  train, test = data.load_dataset(elpv, "mono", None)
  tr, te, info = data.apply_noise(opts, elpv, "mono", train, test)
  assert info["n_injected"] == 3 and info["pool_size"] == 173
  assert te == test  # the pool is not the test set
  assert all(s.defect_type.startswith("uncertain") for s in tr[30:])


def test_apply_noise_draw_from_config():
  train, test = _lists(n_bad=18)
  for draw in ("stratified", "numpy"):
    opts = NoiseOptions(ratio=0.2, draw=draw)
    _, _, info = data.apply_noise(opts, MVTEC, "c", train, test)
    want = noise.inject(train, test, opts)[2]
    assert info["draw"] == draw
    assert info["injected_paths"] == want["injected_paths"]
  with pytest.raises(ValueError, match="config.noise.draw must be one of"):
    NoiseOptions(ratio=0.0, draw="nope")


# ---------------------------------------------------------------- inject_list

_DEFECTS = {"a_crack": 4, "b_hole": 3, "good": 5, "z_dent": 3}


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
  root = tmp_path_factory.mktemp("lists")
  for cat in ("bottle", "cable"):
    _testutil.write_mvtec_layout(root, cat, _DEFECTS)
  return str(root)


def _list_config(root, inject_list, max_test=0, **noise_fields):
  """(noise, data) options of an inject_list run on the mvtec layout."""
  opts = NoiseOptions(inject_list=inject_list, **noise_fields)
  return opts, DataOptions(dataset="mvtec", root=root, max_test=max_test)


def _run(c, cat="bottle"):
  opts, data_opts = c
  train, test = data.load_dataset(data_opts, cat, None)
  tr, te, info = data.apply_noise(opts, data_opts, cat, train, test)
  return train, test, tr, te, info


def _tail(paths, n=2):
  return ["/".join(p.replace(os.sep, "/").split("/")[-n:]) for p in paths]


def test_inject_list_comma_list_keeps_order_and_prefixes(two_categories):
  setting = (
      "z_dent/001.png, bottle/a_crack/003.png,bottle/test/b_hole/000.png,"
      " cable/a_crack/000.png"  # another category's: skipped here
  )
  c = _list_config(two_categories, setting, ratio=0.1, overlap=True)
  train, test, tr, te, info = _run(c)
  want = ["z_dent/001.png", "a_crack/003.png", "b_hole/000.png"]
  assert _tail(s.path for s in tr[len(train) :]) == want
  assert _tail(info["injected_paths"]) == want
  assert info["draw"] == "list" and info["inject_list"] == setting
  assert info["n_injected"] == 3 and te == test
  assert all(s.injected and s.label == 1 for s in tr[len(train) :])
  assert _tail(info["injected_paths"], 3)[1] == "test/a_crack/003.png"
  # In cable the unprefixed entry and its own apply; bottle's are skipped.
  _, _, tr, _, info = _run(c, "cable")
  assert _tail(info["injected_paths"], 4) == [
      "cable/test/z_dent/001.png",
      "cable/test/a_crack/000.png",
  ]


def test_inject_list_without_overlap_leaves_test(two_categories):
  c = _list_config(
      two_categories,
      "b_hole/002.png,a_crack/000.png",
      ratio=0.2,
      overlap=False,
  )
  _, test, _, te, info = _run(c)
  gone = {"b_hole/002.png", "a_crack/000.png"}
  assert _tail(s.path for s in te) == [
      p for p in _tail(s.path for s in test) if p not in gone
  ]
  assert _tail(info["injected_paths"]) == ["b_hole/002.png", "a_crack/000.png"]


def test_inject_list_text_file_per_category(two_categories, tmp_path):
  for cat, lines in (
      ("bottle", ["# drawn by hand", "", "b_hole/001.png", "a_crack/002.png"]),
      ("cable", ["z_dent/002.png  # a comment", "cable/b_hole/000.png"]),
  ):
    (tmp_path / f"{cat}.txt").write_text("\n".join(lines) + "\n")
  setting = str(tmp_path / "{category}.txt")
  c = _list_config(two_categories, setting, ratio=0.1)
  assert _tail(_run(c)[4]["injected_paths"]) == [
      "b_hole/001.png",
      "a_crack/002.png",
  ]
  info = _run(c, "cable")[4]
  assert _tail(info["injected_paths"], 4) == [
      "cable/test/z_dent/002.png",
      "cable/test/b_hole/000.png",
  ]
  assert info["inject_list"] == setting
  c = _list_config(two_categories, str(tmp_path / "none-{category}.txt"))
  with pytest.raises(ValueError, match="none-bottle.txt"):
    _run(c)


def _official_index_file(path, positions):
  """A file as torch.save(list_of_ints, path) writes it (zip format)."""
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(list(positions), protocol=2))
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
  return path


def test_inject_list_official_index_file(two_categories, tmp_path):
  folder = tmp_path / "noise_index" / "mvtec_noise0.1_fold0"
  os.makedirs(folder)
  # Test list: a_crack 0-3, b_hole 4-6, good 7-11, z_dent 12-14.
  _official_index_file(folder / "bottle-noise0.1.pth", [13, 0, 5])
  _official_index_file(folder / "cable-noise0.1.pth", [14])
  setting = str(folder / "{category}-noise0.1.pth")
  c = _list_config(two_categories, setting, ratio=0.1, overlap=False)
  _, test, tr, te, info = _run(c)
  want = ["z_dent/001.png", "a_crack/000.png", "b_hole/001.png"]
  assert _tail(info["injected_paths"]) == want
  assert [test.index(s) for s in test if _tail([s.path])[0] in want] == [
      0,
      5,
      13,
  ]
  assert len(te) == len(test) - 3
  assert _tail(_run(c, "cable")[4]["injected_paths"]) == ["z_dent/002.png"]
  # Positions refer to the whole test list: a subsampled one is refused.
  c = _list_config(two_categories, setting, 6, ratio=0.1, overlap=False)
  with pytest.raises(ValueError, match="max_test"):
    _run(c)


def test_inject_list_index_file_must_hold_ints(two_categories, tmp_path):
  path = _official_index_file(tmp_path / "bad.pth", ["a_crack/000.png"])
  with pytest.raises(ValueError, match="list of test-list positions"):
    _run(_list_config(two_categories, str(path)))


def test_inject_list_names_every_bad_entry(two_categories, tmp_path):
  setting = (
      "a_crack/000.png,good/001.png,a_crack/009.png,bottle/a_crack/000.png,"
      "001.png,b_hole/002.png"
  )
  with pytest.raises(ValueError) as e:
    _run(_list_config(two_categories, setting))
  msg = str(e.value)
  assert msg.startswith(f"config.noise.inject_list={setting!r}: 4 listed")
  assert "'good/001.png': is a normal test image" in msg
  assert "'a_crack/009.png': matches no test image of category 'bottle'" in msg
  assert "'bottle/a_crack/000.png': repeats entry 'a_crack/000.png'" in msg
  assert "'001.png': matches 4 test images" in msg
  assert "'b_hole/002.png':" not in msg
  path = _official_index_file(tmp_path / "idx.pth", [15, 7, 2, -1])
  with pytest.raises(ValueError) as e:
    _run(_list_config(two_categories, str(path)))
  msg = str(e.value)
  assert "3 listed" in msg and "15: out of range (0..14)" in msg
  assert "-1: out of range" in msg and "7: is a normal test image" in msg


def test_inject_list_overrides_ratio_and_logs_count(two_categories, caplog):
  c = _list_config(two_categories, "a_crack/001.png", ratio=0.0)
  with caplog.at_level("INFO"):
    train, _, tr, _, info = _run(c)
  assert info["n_injected"] == 1 and len(tr) == len(train) + 1
  assert "not int(ratio 0.0 * 10 train images) = 0" in caplog.text
  caplog.clear()
  c = _list_config(two_categories, "a_crack/001.png", ratio=0.1)
  with caplog.at_level("INFO"):
    _run(c)
  assert "inject_list gives" not in caplog.text


# ---------------------------------------------------------------- augment


def test_build_augment_follows_the_options():
  assert data.build_augment(NoiseOptions()) == Augment()
  c = NoiseOptions(augment_rotate=False, augment_blur=True)
  aug = data.build_augment(c)
  assert (aug.affine, aug.rotate, aug.noise, aug.blur) == (
      True,
      False,
      False,
      True,
  )
  c = dataclasses.replace(c, augment_affine=False, augment_noise=True)
  assert data.build_augment(c) == Augment(
      affine=False, rotate=False, noise=True, blur=True
  )
