"""The data set registry: dispatch, overrides, errors, synthetic caching."""

import dataclasses
import json
import os

import pytest
from PIL import Image

from softpatch_jax import data
from softpatch_jax.data import btad
from softpatch_jax.data import folder
from softpatch_jax.data import mvtec
from softpatch_jax.data import registry
from softpatch_jax.data import synthetic
from softpatch_jax.data.noise import NoiseOptions
from softpatch_jax.data.types import DataOptions
from softpatch_jax.data.types import SyntheticOptions
from softpatch_jax.registry import Registry

BUILT_IN = ["btad", "elpv", "folder", "mvtec", "synthetic"]


def _data(dataset, **fields):
  """The default `DataOptions` with `dataset` and `fields` set."""
  return DataOptions(dataset=dataset, **fields)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("mv")
  synthetic.make_mvtec_like(
      root,
      categories=("bb", "aa"),
      n_train=3,
      n_test_good=2,
      n_test_defect=1,
      size=32,
      seed=1,
  )
  return str(root)


@pytest.fixture
def private_registry(monkeypatch):
  """Registrations made in a test vanish with it."""
  private = Registry(registry.DATASETS.kind)
  for name, dataset in registry.DATASETS.items():
    private.register(name, dataset)
  monkeypatch.setattr(registry, "DATASETS", private)


def test_built_in_names_and_package_exports():
  assert data.registered_names() == BUILT_IN
  for name in BUILT_IN:
    ds = data.get_dataset(name)
    assert callable(ds.categories) and callable(ds.load)
  assert data.list_categories is registry.list_categories
  assert data.load_dataset is registry.load_dataset
  assert data.register_dataset is registry.register_dataset


@pytest.mark.parametrize("name", ["nope", "", None, "MVTec"])
def test_unknown_name_lists_the_registered_ones(name):
  msg = (
      f"unknown dataset {name!r}; choose from btad, elpv, folder, mvtec, "
      "synthetic"
  )
  with pytest.raises(ValueError) as e:
    data.get_dataset(name)
  assert str(e.value) == msg
  with pytest.raises(ValueError) as e:
    data.list_categories(_data(name))
  assert str(e.value) == msg
  with pytest.raises(ValueError) as e:  # also when categories are given
    data.list_categories(_data(name, categories="a,b"))
  assert str(e.value) == msg
  with pytest.raises(ValueError) as e:
    data.load_dataset(_data(name), "c", "/unused")
  assert str(e.value) == msg


def test_mvtec_dispatch(mvtec_root):
  c = _data("mvtec", root=mvtec_root)
  assert data.list_categories(c) == ["aa", "bb"]
  assert data.load_dataset(c, "bb", None) == mvtec.load_category(
      mvtec_root, "bb"
  )


def test_btad_dispatch(tmp_path):
  cat = tmp_path / "02"
  for sub in ["train/ok", "test/ok", "test/ko", "ground_truth/ko"]:
    os.makedirs(cat / sub)
  for sub in ["train/ok/0.bmp", "test/ok/1.bmp", "test/ko/2.bmp"]:
    Image.new("RGB", (8, 8)).save(cat / sub)
  Image.new("L", (8, 8)).save(cat / "ground_truth" / "ko" / "2.png")
  c = _data("btad", root=str(tmp_path))
  assert data.list_categories(c) == ["02"]
  assert data.load_dataset(c, "02", None) == btad.load_category(
      str(tmp_path), "02"
  )


def test_folder_dispatch(tmp_path):
  os.makedirs(tmp_path / "train")
  os.makedirs(tmp_path / "test" / "dent")
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "test" / "x.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "test" / "dent" / "d.png")
  c = _data("folder", train_dir=str(tmp_path / "train"))
  assert data.list_categories(c) == ["folder"]
  train, test = data.load_dataset(c, "folder", None)
  assert (train, test) == folder.load_folder(str(tmp_path / "train"))
  assert test == []
  c = dataclasses.replace(c, test_dir=str(tmp_path / "test"))
  assert data.load_dataset(c, "folder", None) == folder.load_folder(
      str(tmp_path / "train"), str(tmp_path / "test")
  )


def test_elpv_dispatch():
  c = _data("elpv")
  assert data.list_categories(c) == ["mono", "poly"]
  pytest.importorskip("elpv_dataset")
  c = dataclasses.replace(
      c, split_seed=3, test_normal_fraction=0.3, max_train=7
  )
  train, test = data.load_dataset(c, "mono", None)
  assert (train, test) == data.elpv.load_category(
      "mono", seed=3, test_normal_fraction=0.3, max_train=7
  )
  c = dataclasses.replace(c, max_train=0)  # 0 = every training cell
  assert data.load_dataset(c, "mono", None) == data.elpv.load_category(
      "mono", seed=3, test_normal_fraction=0.3
  )


# ---------------------------------------------------------------- max_train


def test_max_train_mvtec_keeps_the_first_images(mvtec_root):
  full_train, full_test = mvtec.load_category(mvtec_root, "bb")
  c = _data("mvtec", root=mvtec_root, max_train=2)
  train, test = data.load_dataset(c, "bb", None)
  assert train == full_train[:2] and test == full_test
  assert [os.path.basename(s.path) for s in train] == ["000.png", "001.png"]
  c = dataclasses.replace(c, max_train=3)  # as many as there are
  assert data.load_dataset(c, "bb", None) == (full_train, full_test)
  c = dataclasses.replace(c, max_train=0)
  assert data.load_dataset(c, "bb", None) == (full_train, full_test)


def test_max_train_btad_and_folder(tmp_path):
  cat = tmp_path / "btad" / "01"
  for sub in ["train/ok", "test/ok", "test/ko", "ground_truth/ko"]:
    os.makedirs(cat / sub)
  for name in ["c.bmp", "a.bmp", "b.bmp", "d.bmp"]:
    Image.new("RGB", (8, 8)).save(cat / "train" / "ok" / name)
  Image.new("RGB", (8, 8)).save(cat / "test" / "ko" / "x.bmp")
  Image.new("L", (8, 8)).save(cat / "ground_truth" / "ko" / "x.png")
  c = _data("btad", root=str(tmp_path / "btad"), max_train=3)
  train, _ = data.load_dataset(c, "01", None)
  names = [os.path.basename(s.path) for s in train]
  assert names == ["a.bmp", "b.bmp", "c.bmp"]

  for rel in ["z.png", "sub/b.png", "a.png", "sub/a.png"]:
    os.makedirs(os.path.dirname(tmp_path / "f" / rel), exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / rel)
  c = _data("folder", train_dir=str(tmp_path / "f"), max_train=3)
  train, _ = data.load_dataset(c, "folder", None)
  full, _ = folder.load_folder(str(tmp_path / "f"))
  assert train == full[:3]
  sub = lambda name: os.path.join("sub", name)
  rel = [os.path.relpath(s.path, tmp_path / "f") for s in train]
  assert rel == ["a.png", sub("a.png"), sub("b.png")]


def test_max_train_synthetic(tmp_path):
  c = _synthetic_data(n_train=4)
  c = dataclasses.replace(c, max_train=2)
  train, _ = data.load_dataset(c, "synth", str(tmp_path))
  full, _ = mvtec.load_category(str(tmp_path / "synthetic_data"), "synth")
  assert len(full) == 4 and train == full[:2]


def test_max_train_elpv_keeps_its_seeded_subset():
  pytest.importorskip("elpv_dataset")
  c = _data("elpv", max_train=25, split_seed=1)
  train, _ = data.load_dataset(c, "mono", None)
  want, _ = data.elpv.load_category(
      "mono", seed=1, test_normal_fraction=0.2, max_train=25
  )
  assert train == want and len(train) == 25
  # A seeded subset of the whole training split, not its first 25 cells.
  full, _ = data.elpv.load_category("mono", seed=1, test_normal_fraction=0.2)
  assert train != full[:25] and set(train) <= set(full)


def test_max_train_is_applied_before_noise(mvtec_root):
  c = _data("mvtec", root=mvtec_root, max_train=2)
  noise = NoiseOptions(ratio=0.5, overlap=True, seed=0)
  train, test = data.load_dataset(c, "aa", None)
  tr, _, info = data.apply_noise(noise, c, "aa", train, test)
  assert len(train) == 2 and info["n_injected"] == 1 and len(tr) == 3


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True, [2]])
def test_max_train_bad_values(bad):
  with pytest.raises(ValueError) as e:
    _data("mvtec", max_train=bad)
  assert str(e.value) == (
      f"config.data.max_train must be an integer >= 0, got {bad!r}"
  )


@pytest.mark.parametrize(
    "given,expected",
    [
        ("bb", ["bb"]),
        (" zz , aa,,", ["zz", "aa"]),
        (["q", "p"], ["q", "p"]),
        (("x",), ["x"]),
        ("", ["aa", "bb"]),
        (" , ", ["aa", "bb"]),
        (None, ["aa", "bb"]),
    ],
)
def test_categories_override(mvtec_root, given, expected):
  c = _data("mvtec", root=mvtec_root)
  c = dataclasses.replace(c, categories=given)
  assert data.list_categories(c) == expected
  # The override wins for every data set, even where discovery would fail.
  c = _data("mvtec", root="/does/not/exist", categories=given)
  if given and str(given).strip(" ,"):
    assert data.list_categories(c) == expected
  else:
    with pytest.raises(ValueError, match="/does/not/exist"):
      data.list_categories(c)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("elpv", ["mono", "poly"]),
        ("folder", ["folder"]),
        ("synthetic", ["synth"]),
    ],
)
def test_fixed_category_lists(name, expected):
  assert data.list_categories(_data(name)) == expected
  assert data.list_categories(_data(name), workdir="/unused") == expected


def test_register_custom_dataset(private_registry, mvtec_root):
  calls = []

  @data.register_dataset("toy")
  class Toy:

    @staticmethod
    def categories(data_options, workdir):
      calls.append(("categories", workdir))
      return ["one", "two"]

    @staticmethod
    def load(data_options, category, workdir):
      calls.append(("load", category, workdir))
      return [category], []

  assert data.get_dataset("toy") is Toy
  assert "toy" in data.registered_names()
  c = _data("toy")
  assert data.list_categories(c, workdir="/w") == ["one", "two"]
  assert data.load_dataset(c, "two", "/w") == (["two"], [])
  assert calls == [("categories", "/w"), ("load", "two", "/w")]
  with pytest.raises(ValueError, match="dataset 'toy' is already registered"):
    data.register_dataset("toy")(Toy)

  # replace=True swaps the entry; an instance works as well as a class.
  class Alias:

    def categories(self, data_options, workdir):
      return mvtec.list_categories(data_options.root)

    def load(self, data_options, category, workdir):
      return mvtec.load_category(data_options.root, category)

  data.register_dataset("toy", replace=True)(Alias())
  c = dataclasses.replace(c, root=mvtec_root)
  assert data.list_categories(c) == ["aa", "bb"]
  assert str(_unknown_message()).endswith("mvtec, synthetic, toy")
  with pytest.raises(TypeError, match="load"):
    data.register_dataset("broken")(type("B", (), {"categories": len}))
  assert "broken" not in data.registered_names()


def _unknown_message():
  with pytest.raises(ValueError) as e:
    data.get_dataset("absent")
  return e.value


def test_registry_is_restored_after_private_registration():
  assert data.registered_names() == BUILT_IN


# ---------------------------------------------------------------- synthetic


def _synthetic_data(**params):
  s = dict(n_train=3, n_test_good=1, n_test_defect=1, size=32, seed=0)
  s.update(params)
  return _data("synthetic", synthetic=SyntheticOptions(**s))


def test_synthetic_dispatch_generates_into_workdir(tmp_path):
  c = _synthetic_data()
  train, test = data.load_dataset(c, "synth", str(tmp_path))
  root = tmp_path / "synthetic_data"
  assert (train, test) == mvtec.load_category(str(root), "synth")
  assert len(train) == 3 and len(test) == 1 + 2  # scratch + blob
  with open(root / "params.json", encoding="utf-8") as f:
    assert json.load(f) == dict(
        categories=["synth"],
        n_train=3,
        n_test_good=1,
        n_test_defect=1,
        size=32,
        seed=0,
    )
  # Overridden categories are generated, and recorded.
  c = dataclasses.replace(c, categories="s1,s2")
  assert len(data.load_dataset(c, "s2", str(tmp_path))[0]) == 3
  assert mvtec.list_categories(str(root)) == ["s1", "s2"]
  with open(root / "params.json", encoding="utf-8") as f:
    assert json.load(f)["categories"] == ["s1", "s2"]


def _generate(workdir, **overrides):
  params = dict(
      categories=["synth"],
      n_train=2,
      n_test_good=1,
      n_test_defect=1,
      size=32,
      seed=0,
  )
  params.update(overrides)
  categories = params.pop("categories")
  spec = SyntheticOptions(**params)
  return synthetic.ensure_generated(str(workdir), categories, spec)


def test_ensure_generated_reuses_same_parameters(tmp_path):
  root = _generate(tmp_path)
  assert root == os.path.join(str(tmp_path), "synthetic_data")
  marker = os.path.join(root, "marker")
  with open(marker, "w", encoding="utf-8") as f:
    f.write("kept while the parameters stay the same")
  assert _generate(tmp_path) == root
  assert os.path.exists(marker)
  assert sorted(os.listdir(tmp_path)) == ["synthetic_data"]  # no temp left


@pytest.mark.parametrize(
    "change",
    [
        dict(n_train=3),
        dict(n_test_good=2),
        dict(n_test_defect=2),
        dict(size=40),
        dict(seed=1),
        dict(categories=["synth", "other"]),
    ],
)
def test_ensure_generated_regenerates_on_other_parameters(tmp_path, change):
  root = _generate(tmp_path)
  marker = os.path.join(root, "marker")
  open(marker, "w", encoding="utf-8").close()
  assert _generate(tmp_path, **change) == root
  assert not os.path.exists(marker)  # a fresh folder replaced the old one
  with open(os.path.join(root, "params.json"), encoding="utf-8") as f:
    recorded = json.load(f)
  for k, v in change.items():
    assert recorded[k] == v
  train, test = mvtec.load_category(root, "synth")
  assert len(train) == change.get("n_train", 2)
  assert len(test) == change.get("n_test_good", 1) + 2 * change.get(
      "n_test_defect", 1
  )
  assert sorted(os.listdir(tmp_path)) == ["synthetic_data"]


def test_ensure_generated_redoes_an_unrecorded_or_corrupt_generation(tmp_path):
  root = _generate(tmp_path)
  marker = os.path.join(root, "marker")
  open(marker, "w", encoding="utf-8").close()
  os.remove(os.path.join(root, "params.json"))  # as after an interruption
  _generate(tmp_path)
  assert not os.path.exists(marker)
  open(marker, "w", encoding="utf-8").close()
  with open(os.path.join(root, "params.json"), "w", encoding="utf-8") as f:
    f.write("{not json")
  _generate(tmp_path)
  assert not os.path.exists(marker)
  assert os.path.exists(os.path.join(root, "params.json"))


def test_ensure_generated_is_deterministic(tmp_path):
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  a = _generate(tmp_path / "a", seed=5)
  b = _generate(tmp_path / "b", seed=5)
  rel = os.path.join("synth", "test", "blob", "000.png")
  with open(os.path.join(a, rel), "rb") as f:
    first = f.read()
  with open(os.path.join(b, rel), "rb") as f:
    assert f.read() == first
