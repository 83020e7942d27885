"""Procedural MVTec-like data: layout, exact masks, defects, determinism."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from softpatch_jax.data import Preprocess
from softpatch_jax.data import mvtec
from softpatch_jax.data import stream_batches
from softpatch_jax.data import synthetic
from softpatch_jax.data.types import SyntheticOptions

# Sum and sum of squares of uint8 images of the original generator (before
# `difficulty`) for make_mvtec_like(size=48, seed=3) over s1, s2, s3.
PINNED = {
    "s1/test/blob/000.png": (743267, 89199767),
    "s2/test/scratch/001.png": (773228, 89617224),
    "s3/test/spot/000.png": (872207, 125484531),
    "s3/train/good/001.png": (864737, 119562853),
}


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


# ------------------------------------------------------------- difficulty


def _hashes(root):
  out = {}
  for d, _, fs in os.walk(root):
    for f in fs:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = hash(fh.read())
  return out


def test_difficulty_zero_is_the_original_generator(tmp_path):
  sizes = dict(n_train=2, n_test_good=1, n_test_defect=2, size=48, seed=3)
  cats, kinds = ("s1", "s2", "s3"), synthetic.DEFECT_TYPES
  old = synthetic.make_mvtec_like(
      tmp_path / "a", categories=cats, defect_types=kinds, **sizes
  )
  spec = SyntheticOptions(difficulty=0.0, **sizes)
  new = synthetic.generate(tmp_path / "b", cats, spec, kinds)
  assert _hashes(old) == _hashes(new)
  for rel, want in PINNED.items():
    img = np.asarray(Image.open(os.path.join(new, rel)), np.int64)
    assert (int(img.sum()), int((img * img).sum())) == want, rel


def _defect_contrast(root, kind):
  """Mean over the `kind` test images of the defect-vs-rest colour gap."""
  gaps = []
  _, test = mvtec.load_category(root, "synth")
  for s in test:
    if s.label == 0 or f"/{kind}/" not in s.path.replace(os.sep, "/"):
      continue
    m = np.asarray(Image.open(s.mask_path)) == 255
    img = np.asarray(Image.open(s.path), np.float64)
    gaps.append(np.abs(img[m].mean(0) - img[~m].mean(0)).max())
  return float(np.mean(gaps)), len(gaps)


def _make(root, difficulty, kinds=("scratch", "blob", "spot")):
  spec = SyntheticOptions(
      n_train=3,
      n_test_good=1,
      n_test_defect=4,
      size=96,
      seed=0,
      difficulty=difficulty,
  )
  return synthetic.generate(root, ("synth",), spec, kinds)


@pytest.mark.parametrize("kind", synthetic.DEFECT_TYPES)
def test_difficulty_lowers_the_defect_contrast(tmp_path, kind):
  easy, n = _defect_contrast(_make(tmp_path / "easy", 0.0, (kind,)), kind)
  hard, _ = _defect_contrast(_make(tmp_path / "hard", 0.8, (kind,)), kind)
  assert n == 4
  assert hard < 0.45 * easy, (easy, hard)


def test_hard_masks_still_match_the_defects(tmp_path):
  """Each defect changes its masked pixels only, and the masks shrink."""
  easy, hard = _make(tmp_path / "e", 0.0), _make(tmp_path / "h", 1.0)
  areas = {}
  for name, root in (("easy", easy), ("hard", hard)):
    _, test = mvtec.load_category(root, "synth")
    masks = [np.asarray(Image.open(s.mask_path)) for s in test if s.label]
    assert all(set(np.unique(m)) == {0, 255} for m in masks)
    areas[name] = np.mean([(m == 255).mean() for m in masks])
  assert areas["hard"] < 0.7 * areas["easy"], areas
  _, test = mvtec.load_category(hard, "synth")
  for s in test:
    if not s.label:
      continue
    m = np.asarray(Image.open(s.mask_path)) == 255
    ys, xs = np.nonzero(m)
    assert min(ys.min(), xs.min()) >= 0.2 * 96
    assert max(ys.max(), xs.max()) <= 0.8 * 96
    img = np.asarray(Image.open(s.path), np.float64)
    # faint but there: the masked pixels differ from the texture around them
    assert np.abs(img[m].mean(0) - img[~m].mean(0)).max() > 1.0


def test_hard_normals_vary_more(tmp_path):
  def spread(root):
    train, _ = mvtec.load_category(root, "synth")
    imgs = [np.asarray(Image.open(s.path), np.float64) for s in train]
    return np.std([im.mean() for im in imgs]) + np.mean(
        [np.abs(imgs[0] - im).mean() for im in imgs[1:]]
    )

  assert spread(_make(tmp_path / "h", 1.0)) > spread(_make(tmp_path / "e", 0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "hard"])
def test_difficulty_validation(bad):
  with pytest.raises(ValueError, match="data.synthetic.difficulty"):
    SyntheticOptions(difficulty=bad)


def test_difficulty_is_recorded_only_when_set(tmp_path):
  spec = SyntheticOptions(n_train=1, n_test_good=1, n_test_defect=1, size=32)
  root = synthetic.ensure_generated(str(tmp_path), ["synth"], spec)
  with open(os.path.join(root, "params.json"), encoding="utf-8") as f:
    assert "difficulty" not in json.load(f)
  hard = dataclasses.replace(spec, difficulty=0.5)
  synthetic.ensure_generated(str(tmp_path), ["synth"], hard)
  with open(os.path.join(root, "params.json"), encoding="utf-8") as f:
    assert json.load(f)["difficulty"] == 0.5
