"""The data sets that `DataOptions.dataset` can name, in one `Registry`.

Each data set is registered under its name with `register_dataset`, in the
manner of the big_vision and scenic registries:

  @register_dataset("mvtec")
  class MVTec:

    @staticmethod
    def categories(data, workdir):
      return mvtec.list_categories(data.root)

    @staticmethod
    def load(data, category, workdir):
      return mvtec.load_category(data.root, category)

`categories(data, workdir)` lists the categories found when `data` (a
`DataOptions`) names none; `load(data, category, workdir)` returns the
(train, test) Sample lists of one category. The module-level
`list_categories` and `load_dataset` dispatch on `data.dataset` through the
registry.

Registered here: mvtec, btad, folder, elpv and synthetic.

`data.source` says where the images come from: 'files' reads the registered
loaders above; 'tfds' reads mvtec and btad from TFDS records instead
(tfds_source.py), with the same samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from softpatch_jax.data import btad
from softpatch_jax.data import elpv
from softpatch_jax.data import folder
from softpatch_jax.data import mvtec
from softpatch_jax.data import synthetic
from softpatch_jax.data import tfds_source
from softpatch_jax.data.types import DataOptions
from softpatch_jax.data.types import Sample
from softpatch_jax.registry import Registry

T = TypeVar("T")

# name -> the registered object (anything with `categories` and `load`).
DATASETS: Registry[Any] = Registry("dataset")


def register_dataset(name: str, *, replace: bool = False) -> Callable[[T], T]:
  """Returns a decorator registering a data set under `name`.

  Args:
    name: the value of `DataOptions.dataset` that selects the data set.
    replace: allow replacing a data set registered under the same name.

  Returns:
    A decorator that registers its argument (a class, an instance or any
    object with callable attributes `categories(data, workdir)` and
    `load(data, category, workdir)`) and returns it unchanged.

  Raises:
    ValueError: at decoration, when `name` is taken and `replace` is False.
    TypeError: at decoration, when `categories` or `load` is missing.
  """

  def decorator(dataset: T) -> T:
    for attr in ("categories", "load"):
      if not callable(getattr(dataset, attr, None)):
        raise TypeError(
            f"dataset {name!r} must have a callable {attr!r}, got {dataset!r}"
        )
    return DATASETS.register(name, dataset, replace=replace)

  return decorator


def registered_names() -> List[str]:
  """The names of the registered data sets, sorted."""
  return DATASETS.names()


def get_dataset(name: str) -> Any:
  """The data set registered under `name` (ValueError listing the names)."""
  return DATASETS.get(name)


def _source(data: DataOptions) -> Any:
  """The data set `data` names, read from `data.source`."""
  if data.source == "tfds":
    return tfds_source.dataset(data.dataset)
  return get_dataset(data.dataset)


def list_categories(
    data: DataOptions, workdir: Optional[str] = None
) -> List[str]:
  """The categories to run: `data.categories`, else those found.

  When `data.categories` is empty the data set's own `categories` decides
  (the folders under `data.root` for mvtec and btad, a fixed list
  otherwise). An unknown `data.dataset` is a ValueError either way, so a run
  fails on it before any work.
  """
  dataset = _source(data)
  if data.category_names:
    return list(data.category_names)
  return list(dataset.categories(data, workdir))


def load_dataset(
    data: DataOptions, category: str, workdir: Optional[str]
) -> Tuple[List[Sample], List[Sample]]:
  """The (train, test) Sample lists of one category of `data`.

  With `data.max_train` = N > 0 only the first N training images are kept,
  in the loader's (sorted) order; elpv draws its own seeded subset of N
  instead (elpv.load_category), which this leaves as it is. Applied here, so
  before any noise injection: the injected count follows the capped set.
  """
  dataset = _source(data)
  train, test = dataset.load(data, category, workdir)
  if data.max_train and len(train) > data.max_train:
    train = list(train)[: data.max_train]
  return train, test


# ---------------------------------------------------------------------------
# Built-in data sets.


@dataclasses.dataclass(frozen=True)
class RootLayout:
  """A layout under `data.root` whose categories are its sub-folders."""

  module: Any  # mvtec or btad: list_categories(root), load_category(root, c)

  def categories(self, data: DataOptions, workdir):
    del workdir  # unused
    return self.module.list_categories(data.root)

  def load(self, data: DataOptions, category, workdir):
    del workdir  # unused
    return self.module.load_category(data.root, category)


register_dataset("mvtec")(RootLayout(mvtec))  # MVTec AD
register_dataset("btad")(RootLayout(btad))  # BTAD (beanTech)


@register_dataset("folder")
class Folder:
  """`data.train_dir` (+ optional `test_dir`): one category."""

  @staticmethod
  def categories(data: DataOptions, workdir):
    del data, workdir  # unused
    return ["folder"]

  @staticmethod
  def load(data: DataOptions, category, workdir):
    del category, workdir  # unused
    return folder.load_folder(data.train_dir, data.test_dir or None)


@register_dataset("elpv")
class ELPV:
  """ELPV solar cells from the elpv-dataset package: mono and poly."""

  @staticmethod
  def categories(data: DataOptions, workdir):
    del data, workdir  # unused
    return list(elpv.CATEGORIES)

  @staticmethod
  def load(data: DataOptions, category, workdir):
    del workdir  # unused
    return elpv.load_category(
        category,
        seed=data.split_seed,
        test_normal_fraction=data.test_normal_fraction,
        max_train=data.max_train or None,
    )


@register_dataset("synthetic")
class Synthetic:
  """Generated MVTec-like textures, cached in <workdir>/synthetic_data."""

  @staticmethod
  def categories(data: DataOptions, workdir):
    del data, workdir  # unused
    return ["synth"]

  @staticmethod
  def load(data: DataOptions, category, workdir):
    categories = list_categories(data, workdir=None)
    root = synthetic.ensure_generated(workdir, categories, data.synthetic)
    return mvtec.load_category(root, category)
