"""Procedural MVTec-like data: layout, exact masks, defects, determinism."""

import os

import numpy as np
import pytest
from PIL import Image

from softpatch_jax.data import Preprocess
from softpatch_jax.data import mvtec
from softpatch_jax.data import stream_batches
from softpatch_jax.data import synthetic


@pytest.mark.parametrize("seed,size", [(0, 64), (4, 96)])
def test_layout_masks_and_defects(tmp_path, seed, size):
  root = synthetic.make_mvtec_like(
      tmp_path,
      categories=("s1", "s2", "s3"),
      n_train=4,
      n_test_good=2,
      n_test_defect=3,
      size=size,
      seed=seed,
      defect_types=("scratch", "blob", "spot"),
  )
  assert mvtec.list_categories(root) == ["s1", "s2", "s3"]
  for cat in ["s1", "s2", "s3"]:
    train, test = mvtec.load_category(root, cat)
    assert len(train) == 4 and len(test) == 2 + 3 * 3
    normal = np.stack(
        [np.asarray(Image.open(s.path), np.float64) for s in train]
    )
    assert normal.shape == (4, size, size, 3)
    assert np.abs(normal[0] - normal[1]).mean() > 1.0  # normals vary
    for s in test:
      if s.label == 0:
        continue
      m = np.asarray(Image.open(s.mask_path))
      assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
      ys, xs = np.nonzero(m)
      assert (
          ys.min() >= 0.2 * size and ys.max() <= 0.8 * size
      )  # survives a centre crop
      img = np.asarray(Image.open(s.path), np.float64)
      # the defect differs clearly from the texture around it
      diff = np.abs(img[m == 255].mean(0) - img[m == 0].mean(0)).max()
      assert diff > 40, (s.path, diff)
  assert not [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]


def test_deterministic_and_streamable(tmp_path):
  a = synthetic.make_mvtec_like(
      tmp_path / "a", n_train=3, n_test_good=1, n_test_defect=2, size=48, seed=1
  )
  b = synthetic.make_mvtec_like(
      tmp_path / "b", n_train=3, n_test_good=1, n_test_defect=2, size=48, seed=1
  )
  c = synthetic.make_mvtec_like(
      tmp_path / "c", n_train=3, n_test_good=1, n_test_defect=2, size=48, seed=2
  )
  rel = "synth/test/scratch/001.png"
  read = lambda r: (open(os.path.join(r, rel), "rb").read())
  assert read(a) == read(b) and read(a) != read(c)
  _, test = mvtec.load_category(a, "synth")
  batches = list(
      stream_batches(
          test, Preprocess(resize=56, crop=48), batch_size=3, num_workers=2
      )
  )
  masks = np.concatenate([bb.masks for bb in batches])
  labels = np.concatenate([bb.labels for bb in batches])
  assert (masks[labels == 1].sum(axis=(1, 2)) > 0).all() and masks[
      labels == 0
  ].sum() == 0


def test_bad_arguments(tmp_path):
  sizes = dict(n_train=1, n_test_good=1, n_test_defect=1, size=32, seed=0)
  with pytest.raises(ValueError, match="crack"):
    synthetic.make_mvtec_like(tmp_path, defect_types=("crack",), **sizes)
  with pytest.raises(ValueError, match="size"):
    synthetic.make_mvtec_like(tmp_path, **dict(sizes, size=8))
  with pytest.raises(ValueError, match="n_train must be an integer >= 0"):
    synthetic.make_mvtec_like(tmp_path, **dict(sizes, n_train=-1))
