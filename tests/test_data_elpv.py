"""ELPV from the installed elpv-dataset package: counts, split, errors."""

import importlib.util

import numpy as np
import pytest

from softpatch_jax.data import Preprocess
from softpatch_jax.data import elpv
from softpatch_jax.data import has_pixel_labels
from softpatch_jax.data import noise
from softpatch_jax.data import stream_batches

pytest.importorskip("elpv_dataset")


def test_label_counts():
  rows = elpv.read_labels()
  assert len(rows) == 2624
  count = lambda kind, lv: sum(
      1 for _, p, k in rows if k == kind and abs(p - lv) < 1e-6
  )
  assert (count("mono", 0.0), count("poly", 0.0)) == (588, 920)
  assert (count("mono", 1.0), count("poly", 1.0)) == (313, 402)
  assert count("mono", 1 / 3) + count("mono", 2 / 3) == 173
  assert (
      len(elpv.uncertain_samples("mono")) == 173
      and len(elpv.uncertain_samples("poly")) == 228
  )


@pytest.mark.parametrize(
    "cat,n_normal,n_bad", [("mono", 588, 313), ("poly", 920, 402)]
)
def test_split(cat, n_normal, n_bad):
  train, test = elpv.load_category(cat, seed=0, test_normal_fraction=0.2)
  n_test_normal = round(0.2 * n_normal)
  assert len(train) == n_normal - n_test_normal
  assert (
      sum(s.label == 0 for s in test) == n_test_normal
      and sum(s.label == 1 for s in test) == n_bad
  )
  assert not {s.path for s in train} & {s.path for s in test}
  assert all(s.mask_path is None and s.category == cat for s in train + test)
  assert not has_pixel_labels(test)
  assert elpv.load_category(cat, seed=0, test_normal_fraction=0.2) == (
      train,
      test,
  )
  other, _ = elpv.load_category(cat, seed=1, test_normal_fraction=0.2)
  assert {s.path for s in other} != {s.path for s in train} and len(
      other
  ) == len(train)


def test_max_train_uncertain_and_errors():
  train, _ = elpv.load_category("mono", seed=2, test_normal_fraction=0.2)
  small, test = elpv.load_category(
      "mono", seed=2, test_normal_fraction=0.2, max_train=50
  )
  assert len(small) == 50 and {s.path for s in small} <= {s.path for s in train}
  assert (
      elpv.load_category(
          "mono", seed=2, test_normal_fraction=0.2, max_train=50
      )[0]
      == small
  )
  _, with_u = elpv.load_category(
      "mono", seed=2, test_normal_fraction=0.2, include_uncertain=True
  )
  assert len(with_u) == len(test) + 173
  with pytest.raises(ValueError, match="mono"):
    elpv.load_category("cdte", seed=0, test_normal_fraction=0.2)
  with pytest.raises(ValueError, match="fraction"):
    elpv.load_category("mono", seed=0, test_normal_fraction=1.0)
  # the uncertain cells as the noise pool
  tr, te, info = noise.inject(
      small,
      test,
      noise.NoiseOptions(ratio=0.1, overlap=False, seed=0),
      pool=elpv.uncertain_samples("mono"),
  )
  assert info["n_injected"] == 5 and te == test


def test_missing_package_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util,
      "find_spec",
      lambda name, *a: None if name == "elpv_dataset" else real(name, *a),
  )
  with pytest.raises(ImportError, match="pip install elpv-dataset"):
    elpv.load_category("mono", seed=0, test_normal_fraction=0.2)


def test_cells_stream_as_rgb():
  train, _ = elpv.load_category(
      "poly", seed=0, test_normal_fraction=0.2, max_train=3
  )
  b = next(
      iter(stream_batches(train, Preprocess(), batch_size=3, num_workers=2))
  )
  assert b.images.shape == (3, 224, 224, 3) and np.isfinite(b.images).all()
  assert b.masks.sum() == 0
  # grayscale cell: the three channels agree once the normalisation is undone
  x = Preprocess().denormalize(b.images[0])
  np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-5)
