"""TFDS builders for MVTec AD / BTAD and `config.data.source='tfds'`.

Both data sets are built from tiny generated manual directories: PNG, BMP,
16-bit and palette images, 0/255 and 0/1 masks, random sizes, two seeds. The
records are checked against plain PIL/numpy readings of those files, and the
tfds source against the file source, sample for sample and pixel for pixel,
noise injection and its augmentation included.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from softpatch_jax.data import DataOptions
from softpatch_jax.data import NoiseOptions
from softpatch_jax.data import preprocess
from softpatch_jax.data import protocol
from softpatch_jax.data import registry
from softpatch_jax.data import tfds_builders
from softpatch_jax.data import tfds_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)
# dataset -> (categories built, normal folder, defect types, nesting folder)
FAKE = {
    "mvtec": (
        ("bottle", "grid"),
        "good",
        ("crack", "broken_small"),
        "mvtec_anomaly_detection",
    ),
    "btad": (("01", "02", "03"), "ok", ("ko",), ""),
}


def _image(rng, kind):
  """(PIL image, file extension) of one generated image of `kind`."""
  h, w = (int(v) for v in rng.integers(20, 44, size=2))
  if kind == "rgb_png":
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)), ".png"
  if kind == "gray_png":
    return Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)), ".png"
  if kind == "gray16_png":
    arr = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    return Image.fromarray(arr), ".png"
  if kind == "rgb_bmp":
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)), ".bmp"
  assert kind == "palette_bmp"
  img = Image.fromarray(rng.integers(0, 16, (h, w), np.uint8), mode="P")
  img.putpalette(rng.integers(0, 256, 48, np.uint8).tolist())
  return img, ".bmp"


def _mask(rng, size, zero_one):
  w, h = size
  m = np.zeros((h, w), np.uint8)
  y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
  m[y : y + 4, x : x + 5] = 1 if zero_one else 255
  return Image.fromarray(m)


def make_manual(base, dataset, seed):
  """A tiny manual download directory of `dataset` under `base`."""
  cats, normal, types, nest = FAKE[dataset]
  rng = np.random.default_rng([seed, len(dataset)])
  root = os.path.join(base, nest) if nest else base
  for ci, cat in enumerate(cats):
    kinds = {
        "bottle": ("rgb_png",),
        "grid": ("gray_png", "gray16_png"),
        "01": ("rgb_bmp",),
        "02": ("rgb_png",),
        "03": ("rgb_bmp", "palette_bmp"),
    }[cat]
    mask_ext = ".bmp" if cat == "03" else ".png"
    suffix = "_mask" if dataset == "mvtec" else ""
    folders = [("train", normal, int(rng.integers(3, 6)))]
    folders += [("test", normal, 2)] + [("test", t, 3) for t in types]
    for split, dtype, n in folders:
      d = os.path.join(root, cat, split, dtype)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        img, ext = _image(rng, kinds[int(rng.integers(len(kinds)))])
        img.save(os.path.join(d, f"{i:03d}{ext}"))
        if dtype == normal:
          continue
        g = os.path.join(root, cat, "ground_truth", dtype)
        os.makedirs(g, exist_ok=True)
        _mask(rng, img.size, zero_one=(i + ci) % 2 == 1).save(
            os.path.join(g, f"{i:03d}{suffix}{mask_ext}")
        )
  return root


@pytest.fixture(scope="module", params=SEEDS)
def built(request, tmp_path_factory):
  """{dataset: (manual dir, data set root, tfds data dir)}, all prepared."""
  out = {}
  for dataset in FAKE:
    base = tmp_path_factory.mktemp(f"{dataset}{request.param}")
    manual = os.path.join(base, "manual")
    root = make_manual(manual, dataset, request.param)
    data_dir = os.path.join(base, "tfds")
    for cat in FAKE[dataset][0]:
      b = tfds_builders.builder(dataset, cat, data_dir)
      assert not tfds_builders.is_prepared(b)
      tfds_builders.prepare(b, manual)
    out[dataset] = (manual, root, data_dir)
  return out


def _expected(root, category, normal):
  """(relative path, label, type, mask file or None) in the loaders' order.

  Plain os.listdir: the training folder, then every test folder in sorted
  order, files sorted within each; masks found by stem.
  """
  cat_dir = os.path.join(root, category)
  listed = lambda d: sorted(os.listdir(os.path.join(cat_dir, d)))
  train = [
      (f"train/{normal}/{f}", 0, normal, None)
      for f in listed(f"train/{normal}")
  ]
  test = []
  for t in listed("test"):
    for f in listed(f"test/{t}"):
      mask = None
      if t != normal:
        stem = os.path.splitext(f)[0]
        gt = os.path.join(cat_dir, "ground_truth", t)
        mask = next(
            os.path.join(gt, g)
            for g in sorted(os.listdir(gt))
            if os.path.splitext(g)[0] in (stem, stem + "_mask")
        )
      test.append((f"test/{t}/{f}", int(t != normal), t, mask))
  return {"train": train, "test": test}


def _pixels(path):
  """The 8-bit pixels of an image file, 3 channels, by PIL and numpy only."""
  img = Image.open(path)
  if img.mode.startswith("I"):
    arr = np.round(np.asarray(img, np.float64) * (255.0 / 65535.0))
    arr = arr.astype(np.uint8)
  else:
    arr = np.asarray(img.convert("RGB") if img.mode == "P" else img)
  return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def _mask_pixels(path, size):
  if path is None:
    return np.zeros(size[::-1], np.uint8)
  m = np.asarray(Image.open(path).convert("L"))
  return np.where(m >= (1 if m.max() <= 1 else 128), 255, 0).astype(np.uint8)


@pytest.mark.parametrize("dataset", list(FAKE))
def test_records_hold_every_image_mask_and_label(built, dataset):
  _, root, data_dir = built[dataset]
  cats, normal, _, _ = FAKE[dataset]
  assert tfds_builders.prepared_categories(dataset, data_dir) == list(cats)
  for cat in cats:
    b = tfds_builders.builder(dataset, cat, data_dir)
    assert b.info.file_format.value == "array_record"
    assert b.info.features["label"].names == ["normal", "anomalous"]
    cat_dir = os.path.join(root, cat)
    for split, want in _expected(root, cat, normal).items():
      records = b.as_data_source(split)
      stored = list(tfds_builders.read_split(b, split))
      assert b.info.splits[split].num_examples == len(want) == len(records)
      for i, (rel, label, dtype, mask) in enumerate(want):
        ex = records[i]  # the records keep the loaders' order
        assert int(ex["index"]) == i == int(stored[i]["index"])
        assert ex["path"].decode() == rel == stored[i]["path"]
        assert int(ex["label"]) == label
        assert ex["defect_type"].decode() == dtype
        mask_rel = os.path.relpath(mask, cat_dir) if mask else ""
        assert ex["mask_path"].decode() == mask_rel
        image = os.path.join(cat_dir, rel)
        np.testing.assert_array_equal(ex["image"], _pixels(image))
        with Image.open(image) as img:
          size, plain = img.size, img.mode in ("L", "RGB")
        np.testing.assert_array_equal(
            ex["mask"][..., 0], _mask_pixels(mask, size)
        )
        # 8-bit gray / RGB PNGs are kept byte for byte, the rest re-encoded.
        with open(image, "rb") as f:
          same = stored[i]["image"] == f.read()
        assert same == (plain and rel.endswith(".png")), rel


NOISE = NoiseOptions(ratio=0.4, overlap=False, augment=True, seed=3)


def _config(dataset, source, **data):
  return DataOptions(dataset=dataset, source=source, **data)


def _key(sample, root):
  """What a Sample says, with its path relative to the data set root."""
  rel = os.path.relpath(sample.path, root).replace(os.sep, "/")
  mask = sample.mask_path is not None
  return rel, sample.label, sample.defect_type, mask, sample.category


@pytest.mark.parametrize("dataset", list(FAKE))
def test_tfds_source_gives_the_file_source_samples(built, dataset, tmp_path):
  manual, root, data_dir = built[dataset]
  files = _config(dataset, "files", root=root)
  via = _config(dataset, "tfds", root=manual, tfds_dir=data_dir)
  workdir = str(tmp_path)
  export = os.path.join(
      workdir, tfds_source.EXPORT_DIR, tfds_builders.LAYOUTS[dataset][0]
  )
  cats = registry.list_categories(via, workdir)
  assert cats == registry.list_categories(files) == list(FAKE[dataset][0])
  pre = preprocess.Preprocess(resize=24, crop=20)
  for cat in cats:
    a = registry.load_dataset(files, cat, None)
    b = registry.load_dataset(via, cat, workdir)
    for xs, ys in zip(a, b):
      assert [_key(s, root) for s in xs] == [_key(s, export) for s in ys]
    # The noise protocol: the same draw, the same augmented copies.
    na = protocol.apply_noise(NOISE, files, cat, *a)
    nb = protocol.apply_noise(NOISE, via, cat, *b)
    assert nb[2]["n_injected"] >= 1
    for xs, ys in zip(na[:2], nb[:2]):
      assert [_key(s, root) + (s.aug_seed,) for s in xs] == [
          _key(s, export) + (s.aug_seed,) for s in ys
      ]
    for sa, sb in zip(na[0] + na[1], nb[0] + nb[1]):
      xa, ma = pre.load_sample(sa)
      xb, mb = pre.load_sample(sb)
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ma, mb)


def test_prepared_records_need_no_manual_dir(built, tmp_path):
  _, root, data_dir = built["btad"]
  via = _config("btad", "tfds", root="", tfds_dir=data_dir, categories="02")
  workdir = str(tmp_path)
  first = registry.load_dataset(via, "02", workdir)
  stray = os.path.join(
      workdir, tfds_source.EXPORT_DIR, "btad", "02", "train", "x.png"
  )
  Image.new("L", (8, 8)).save(stray)
  # Read again from the records only: the copy is replaced as a whole.
  assert registry.load_dataset(via, "02", workdir) == first
  assert not os.path.exists(stray)
  assert [s.path for s in first[0]] == [
      os.path.join(
          workdir, tfds_source.EXPORT_DIR, "btad", "02", "train", "ok", f
      )
      for f in sorted(os.listdir(os.path.join(root, "02", "train", "ok")))
  ]
  assert not [
      d
      for d in os.listdir(os.path.join(workdir, tfds_source.EXPORT_DIR, "btad"))
      if d.startswith(".")
  ]
  # Without a root, the categories are those prepared.
  via = dataclasses.replace(via, categories="")
  assert registry.list_categories(via, workdir) == ["01", "02", "03"]


@pytest.mark.parametrize(
    "rel,name,fmt",
    [
        ("test/ko/0001.bmp", "test/ko/0001.bmp", "BMP"),
        ("train/ok/a.b.PNG", "train/ok/a.b.PNG", None),
        ("test/x/1.tiff", "test/x/1.tiff", "TIFF"),
        ("test/x/1.JPG", "test/x/1.png", None),
        ("test/x/1.jpeg", "test/x/1.png", None),
    ],
)
def test_export_names(rel, name, fmt):
  assert tfds_source._export_name(rel) == (name, fmt)


def test_jpeg_is_copied_as_png_and_name_clashes_are_refused(tmp_path):
  rng = np.random.default_rng(5)
  manual = str(tmp_path / "manual")
  make_manual(manual, "mvtec", 5)
  good = os.path.join(
      manual, "mvtec_anomaly_detection", "bottle", "test", "good"
  )
  Image.fromarray(rng.integers(0, 256, (30, 26, 3), np.uint8)).save(
      os.path.join(good, "900.jpg"), quality=90
  )
  data_dir = str(tmp_path / "tfds")
  c = _config("mvtec", "tfds", root=manual, tfds_dir=data_dir)
  _, test = registry.load_dataset(c, "bottle", str(tmp_path / "w"))
  copy = [s for s in test if os.path.basename(s.path).startswith("900")]
  assert [os.path.basename(s.path) for s in copy] == ["900.png"]
  np.testing.assert_array_equal(
      np.asarray(Image.open(copy[0].path)),
      np.asarray(Image.open(os.path.join(good, "900.jpg"))),
  )
  # 900.png beside 900.jpg: both would be copied to 900.png.
  Image.new("RGB", (20, 20)).save(os.path.join(good, "900.png"))
  c = dataclasses.replace(c, tfds_dir=str(tmp_path / "tfds2"))
  with pytest.raises(ValueError, match=r"both become test/good/900\.png"):
    registry.load_dataset(c, "bottle", str(tmp_path / "w2"))


def test_bad_inputs_are_one_clear_value_error(built, tmp_path, monkeypatch):
  manual, root, data_dir = built["mvtec"]
  w = str(tmp_path)
  with pytest.raises(ValueError, match="config.data.source must be one of"):
    _config("mvtec", "hub")
  with pytest.raises(ValueError, match="not config.data.dataset='folder'"):
    registry.list_categories(_config("folder", "tfds"))
  with pytest.raises(ValueError, match="the categories are bottle, cable"):
    registry.load_dataset(_config("mvtec", "tfds", root=manual), "nope", w)
  fresh = str(tmp_path / "empty_tfds")
  c = _config("mvtec", "tfds", tfds_dir=fresh)
  with pytest.raises(ValueError, match="not prepared.*config.data.root"):
    registry.load_dataset(c, "cable", w)
  with pytest.raises(ValueError, match="no category of mvtec_ad is prepared"):
    registry.list_categories(c, w)
  c = dataclasses.replace(c, root=manual)
  expected = os.path.join(manual, "cable", "train", "good")
  with pytest.raises(ValueError, match=f"expected {expected}"):
    registry.load_dataset(c, "cable", w)
  c = dataclasses.replace(c, tfds_dir=data_dir)
  with pytest.raises(ValueError, match="none was given"):
    registry.load_dataset(c, "bottle", None)
  with pytest.raises(ValueError, match="no mvtec categories"):
    registry.list_categories(_config("mvtec", "tfds", root=str(tmp_path)), w)
  # A mask of another size than its image is refused while building.
  bad = str(tmp_path / "bad")
  bad_root = make_manual(bad, "mvtec", 7)
  mask = os.path.join(bad_root, "grid", "ground_truth", "crack", "001_mask.png")
  Image.new("L", (3, 3)).save(mask)
  c = _config("mvtec", "tfds", root=bad, tfds_dir=str(tmp_path / "t3"))
  with pytest.raises(ValueError, match=f"mask {mask} has size 3x3 but image"):
    registry.load_dataset(c, "grid", w)
  monkeypatch.setattr(tfds_builders, "tfds", None)
  with pytest.raises(ValueError, match=r"pip install 'softpatch-jax\[tfds\]'"):
    registry.load_dataset(_config("btad", "tfds", root=manual), "01", w)


def test_tfds_finds_the_builders_by_name(built):
  _, _, data_dir = built["btad"]
  b = tfds.builder("btad/03", data_dir=data_dir)
  assert isinstance(b, tfds_builders.BUILDERS["btad"])
  ours = tfds_builders.builder("btad", "03", data_dir)
  assert b.info.splits["test"].num_examples == len(ours.as_data_source("test"))
  assert tfds.builder_cls("mvtec_ad") is tfds_builders.BUILDERS["mvtec_ad"]


def test_builders_leave_no_temporary_folders(tmp_path, monkeypatch):
  """TFDS makes a temporary folder per unprepared builder; ours go away."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.makedirs(tempfile.tempdir)
  for cat in ("bottle", "grid"):
    b = tfds_builders.builder("mvtec", cat, str(tmp_path / "none"))
    assert not tfds_builders.is_prepared(b)
  assert not os.listdir(tempfile.tempdir)
  assert tempfile.tempdir == str(tmp_path / "tmp")


_WITHOUT_TFDS = r"""
import sys
import tempfile
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow_datasets":
      raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from softpatch_jax import data
from softpatch_jax.data import tfds_builders
assert tfds_builders.tfds is None and not tfds_builders.BUILDERS
c = data.DataOptions(root=sys.argv[1])
assert data.list_categories(c) == ["bottle", "grid"]
c = data.DataOptions(root=sys.argv[1], source="tfds")
try:
  data.load_dataset(c, "bottle", sys.argv[2])
except ValueError as e:
  print(e)
"""


def test_the_package_imports_without_tensorflow_datasets(tmp_path):
  root = make_manual(str(tmp_path / "manual"), "mvtec", 0)
  out = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TFDS, root, str(tmp_path)],
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
  ).stdout
  assert "needs tensorflow-datasets: pip install 'softpatch-jax[tfds]'" in out
