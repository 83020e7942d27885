"""stream_batches: order, partial batch, read-ahead, errors, augmentation."""

import threading
import time

import numpy as np
import pytest
from PIL import Image

from softpatch_jax.data import Augment
from softpatch_jax.data import Preprocess
from softpatch_jax.data import Sample
from softpatch_jax.data import open_image
from softpatch_jax.data import stream_batches

PRE = Preprocess(resize=12, crop=10, mean=(0, 0, 0), std=(1, 1, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny")
  samples = []
  for i in range(23):
    p = d / f"{i:03d}.png"
    Image.new("L", (16, 14), i * 10).save(p)
    samples.append(Sample(str(p), i % 2, "good" if i % 2 == 0 else "x", None))
  return samples


@pytest.mark.parametrize(
    "batch_size,workers", [(5, 3), (1, 2), (23, 4), (30, 1), (4, 0)]
)
def test_order_and_partial_batch(tiny, batch_size, workers):
  batches = list(
      stream_batches(tiny, PRE, batch_size=batch_size, num_workers=workers)
  )
  sizes = [len(b.indices) for b in batches]
  assert (
      sum(sizes) == 23
      and all(s == batch_size for s in sizes[:-1])
      and 0 < sizes[-1] <= batch_size
  )
  idx = np.concatenate([b.indices for b in batches])
  np.testing.assert_array_equal(idx, np.arange(23))
  means = np.concatenate([b.images.mean(axis=(1, 2, 3)) for b in batches])
  np.testing.assert_allclose(means, np.arange(23) * 10 / 255.0, atol=1e-6)
  labels = np.concatenate([b.labels for b in batches])
  np.testing.assert_array_equal(labels, np.arange(23) % 2)
  b = batches[0]
  assert b.images.dtype == np.float32 and b.images.shape[1:] == (10, 10, 3)
  assert (
      b.masks.shape == (len(b.indices), 10, 10) and b.masks.dtype == np.float32
  )
  assert b.labels.dtype == np.int32 and b.indices.dtype == np.int64


def test_without_masks_and_empty_input(tiny):
  b = next(iter(stream_batches(tiny, PRE, 4, 4, with_masks=False)))
  assert b.masks is None
  assert list(stream_batches([], PRE, 32, 4)) == []


class _Counting(Preprocess):
  """Counts decodes (thread-safe) and pretends each one is slow."""

  counter = {"n": 0}
  lock = threading.Lock()

  def load_sample(self, sample, with_mask=True, augment=None):
    time.sleep(0.002)
    with self.lock:
      self.counter["n"] += 1
    return np.zeros((2, 2, 3), np.float32), (
        np.zeros((2, 2), np.float32) if with_mask else None
    )


@pytest.mark.parametrize(
    "batch_size,prefetch,workers", [(4, 2, 4), (8, 0, 3), (3, 1, 2)]
)
def test_bounded_in_flight(batch_size, prefetch, workers):
  pre = _Counting(resize=None, crop=None)
  pre.counter["n"] = 0
  samples = [Sample(f"/none/{i}.png", 0, "good") for i in range(150)]
  cap = batch_size * (prefetch + 1)
  yielded, worst = 0, 0
  for b in stream_batches(
      samples,
      pre,
      batch_size=batch_size,
      num_workers=workers,
      prefetch=prefetch,
  ):
    yielded += len(b.indices)
    worst = max(worst, pre.counter["n"] - yielded)
    time.sleep(0.001)
  assert yielded == 150 and pre.counter["n"] == 150
  assert worst <= cap


def test_lazy_source_and_early_stop_release_threads():
  pulled = {"n": 0}

  def gen():
    for i in range(10_000):
      pulled["n"] += 1
      yield Sample(f"/none/{i}.png", 0, "good")

  pre = _Counting(resize=None, crop=None)
  it = stream_batches(gen(), pre, batch_size=5, num_workers=3, prefetch=2)
  for k, _ in enumerate(it):
    if k == 1:
      break
  it.close()
  assert (
      pulled["n"] <= 2 * 5 + 5 * 3
  )  # the two yielded batches plus one full window
  assert not [
      t for t in threading.enumerate() if t.name.startswith("softpatch-data")
  ]


def test_bad_file_surfaces_as_value_error(tiny, tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not an image")
  samples = list(tiny[:6]) + [Sample(str(bad), 0, "good")]
  with pytest.raises(ValueError, match="broken.png"):
    list(stream_batches(samples, PRE, batch_size=4, num_workers=2))


def test_argument_checks(tiny):
  for kw in [dict(batch_size=0), dict(num_workers=-1), dict(prefetch=-1)]:
    with pytest.raises(ValueError, match=list(kw)[0]):
      stream_batches(tiny, PRE, **dict(dict(batch_size=4, num_workers=1), **kw))


# ---------------------------------------------------------------- augmentation
def _textured(size=40, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  arr = (120 + 60 * np.sin(xx / 3.0) + 40 * np.cos(yy / 5.0)).astype(np.uint8)
  return Image.fromarray(
      np.stack(
          [arr, arr[::-1], rng.integers(0, 256, arr.shape, dtype=np.uint8)], -1
      )
  )


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_augment_is_deterministic_per_seed(seed):
  aug = Augment(noise=True, blur=True)
  img = _textured()
  mask = Image.fromarray(np.pad(np.full((10, 12), 255, np.uint8), 15)[:40, :40])
  a1, m1 = aug.apply(img, mask, seed)
  a2, m2 = aug.apply(img, mask, seed)
  b, _ = aug.apply(img, mask, seed + 1)
  assert np.array_equal(np.asarray(a1), np.asarray(a2)) and np.array_equal(
      np.asarray(m1), np.asarray(m2)
  )
  assert not np.array_equal(np.asarray(a1), np.asarray(b))
  assert (
      set(np.unique(np.asarray(m1))) <= {0, 255}
      and a1.size == img.size
      and a1.mode == img.mode
  )


def test_augment_flags_and_geometry():
  img = _textured()
  none = Augment(affine=False, rotate=False, noise=False, blur=False)
  assert np.array_equal(
      np.asarray(none.apply(img, None, 5)[0]), np.asarray(img)
  )
  # toggling one flag does not change the other draws
  p1, p2 = Augment(noise=True).params(9), Augment(blur=True).params(9)
  assert p1 == p2
  p = Augment().params(9)
  assert (
      abs(p["tx"]) <= 0.03 and abs(p["ty"]) <= 0.03 and abs(p["angle"]) <= 3.0
  )
  # a pure translation moves image and mask together
  sq = np.zeros((40, 40), np.uint8)
  sq[15:25, 12:22] = 255
  aug = Augment(rotate=False, max_translate=0.1)
  out, m = aug.apply(Image.fromarray(sq), Image.fromarray(sq), 3)
  assert np.array_equal(np.asarray(out) > 127, np.asarray(m) == 255)
  assert not np.array_equal(np.asarray(m), sq)


def test_stream_augments_only_samples_with_aug_seed(tiny, tmp_path):
  p = tmp_path / "t.png"
  _textured(48).save(p)
  plain = Sample(str(p), 1, "x", None)
  aug = Sample(str(p), 1, "x", None, injected=True, aug_seed=11)
  aug2 = Sample(str(p), 1, "x", None, injected=True, aug_seed=12)
  pre = Preprocess(resize=48, crop=40)
  b = next(
      iter(
          stream_batches(
              [plain, aug, aug, aug2], pre, batch_size=4, num_workers=2
          )
      )
  )
  assert np.array_equal(b.images[1], b.images[2])
  assert not np.allclose(b.images[0], b.images[1]) and not np.allclose(
      b.images[1], b.images[3]
  )
  c = next(
      iter(
          stream_batches(
              [aug],
              pre,
              batch_size=1,
              num_workers=4,
              augment=Augment(affine=False, rotate=False),
          )
      )
  )
  np.testing.assert_array_equal(c.images[0], b.images[0])


# ---------------------------------------------------------------- collect
def _predict_inputs(d):
  """Files of several sizes and modes, as the predict CLI would list them."""
  rng = np.random.default_rng(0)
  paths = []
  for i, (mode, size) in enumerate([
      ("RGB", (40, 30)),
      ("L", (33, 47)),
      ("RGBA", (64, 64)),
      ("RGB", (31, 31)),
      ("I;16", (50, 36)),
      ("P", (45, 45)),
      ("RGB", (29, 80)),
  ]):
    w, h = size
    if mode == "I;16":
      img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
      img = Image.fromarray(
          rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      ).convert("P")
    else:
      ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
      arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
      img = Image.fromarray(arr[..., 0] if ch == 1 else arr, mode=mode)
    p = d / f"{i:02d}_{mode.replace(';', '')}.png"
    img.save(p)
    paths.append(str(p))
  return paths


@pytest.mark.parametrize("batch_size,workers", [(3, 2), (1, 0), (7, 4), (4, 1)])
def test_collect_matches_predicts_decoder_bit_for_bit(
    tmp_path, batch_size, workers
):
  paths = _predict_inputs(tmp_path)
  pre = Preprocess(resize=32, crop=28)
  samples = [Sample(p, -1, "unknown") for p in paths]
  batches = list(
      stream_batches(
          samples,
          pre,
          batch_size=batch_size,
          num_workers=workers,
          with_masks=False,
          errors="collect",
      )
  )
  assert len(batches) == -(-len(paths) // batch_size)
  assert all(b.errors == () and b.masks is None for b in batches)
  idx = np.concatenate([b.indices for b in batches])
  np.testing.assert_array_equal(idx, np.arange(len(paths)))
  assert all((b.labels == -1).all() for b in batches)
  images = np.concatenate([b.images for b in batches])
  assert images.dtype == np.float32
  for i, p in enumerate(paths):
    want = pre.image_array(open_image(p))  # what predict decoded on its own
    assert want.dtype == images.dtype and want.shape == images[i].shape
    assert images[i].tobytes() == want.tobytes(), p


@pytest.mark.parametrize("workers", [0, 2])
def test_collect_reports_corrupt_files_and_keeps_the_rest(
    tiny, tmp_path, workers
):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not an image")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  missing = tmp_path / "missing.png"
  good = list(tiny[:5])
  # batch 0: g0 g1 broken g2 | batch 1: empty missing broken g3 | batch 2: g4
  samples = (
      [good[0], good[1], Sample(str(broken), 0, "good"), good[2]]
      + [Sample(str(p), 1, "x") for p in (empty, missing, broken)]
      + [good[3], good[4]]
  )
  batches = list(
      stream_batches(
          samples, PRE, batch_size=4, num_workers=workers, errors="collect"
      )
  )
  assert len(batches) == 3

  b0, b1, b2 = batches
  np.testing.assert_array_equal(b0.indices, [0, 1, 3])
  np.testing.assert_array_equal(
      b0.labels, [good[0].label, good[1].label, good[2].label]
  )
  assert b0.images.shape == (3, 10, 10, 3) and b0.masks.shape == (3, 10, 10)
  assert [i for i, _ in b0.errors] == [2] and "broken.png" in b0.errors[0][1]
  want = np.stack([PRE.load_sample(s)[0] for s in good[:3]])
  np.testing.assert_array_equal(b0.images, want)

  np.testing.assert_array_equal(b1.indices, [7])
  assert [i for i, _ in b1.errors] == [4, 5, 6]
  for (_, msg), name in zip(
      b1.errors, ["empty.png", "missing.png", "broken.png"]
  ):
    assert name in msg and isinstance(msg, str)
  np.testing.assert_array_equal(b1.images, PRE.load_sample(good[3])[0][None])

  np.testing.assert_array_equal(b2.indices, [8])
  assert b2.errors == ()


def test_collect_batch_with_no_decodable_image(tmp_path):
  bad = []
  for i in range(3):
    p = tmp_path / f"bad{i}.png"
    p.write_bytes(b"\x89PNG garbage")
    bad.append(Sample(str(p), 0, "good"))
  for with_masks in (True, False):
    (b,) = stream_batches(
        bad,
        PRE,
        batch_size=3,
        num_workers=2,
        with_masks=with_masks,
        errors="collect",
    )
    assert b.images is None and b.masks is None
    assert b.labels.shape == (0,) and b.labels.dtype == np.int32
    assert b.indices.shape == (0,) and b.indices.dtype == np.int64
    assert [i for i, _ in b.errors] == [0, 1, 2]
    assert all(f"bad{i}.png" in m for i, (_, m) in enumerate(b.errors))


def test_collect_also_catches_mask_errors(tmp_path):
  Image.new("RGB", (20, 20)).save(tmp_path / "img.png")
  Image.new("L", (20, 21)).save(tmp_path / "img_mask.png")
  s = Sample(str(tmp_path / "img.png"), 1, "x", str(tmp_path / "img_mask.png"))
  (b,) = stream_batches([s], PRE, 2, 4, errors="collect")
  assert b.images is None and "img_mask.png" in b.errors[0][1]
  (b,) = stream_batches([s], PRE, 2, 4, with_masks=False, errors="collect")
  assert b.errors == () and b.images.shape == (1, 10, 10, 3)


class _Exploding(Preprocess):

  def load_sample(self, sample, with_mask=True, augment=None):
    raise RuntimeError(f"not a decoding error: {sample.path}")


def test_collect_lets_other_exceptions_through():
  samples = [Sample(f"/none/{i}.png", 0, "good") for i in range(3)]
  with pytest.raises(RuntimeError, match="not a decoding error"):
    list(
        stream_batches(
            samples, _Exploding(), batch_size=2, num_workers=2, errors="collect"
        )
    )


def test_errors_argument(tiny):
  with pytest.raises(ValueError, match="errors must be one of raise, collect"):
    stream_batches(tiny, PRE, 32, 4, errors="ignore")
  # The default keeps raising, and batches carry no errors.
  assert all(b.errors == () for b in stream_batches(tiny, PRE, 5, 4))
