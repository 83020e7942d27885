"""A registry of the data sets that `config.data.dataset` can name.

Each data set is registered under its name with `register_dataset`, in the
manner of the big_vision and scenic registries:

  @register_dataset("mvtec")
  class _MVTec:

    @staticmethod
    def categories(config, workdir):
      return mvtec.list_categories(config.data.root)

    @staticmethod
    def load(config, category, workdir):
      return mvtec.load_category(config.data.root, category)

`categories(config, workdir)` lists the categories found when the config names
none; `load(config, category, workdir)` returns the (train, test) Sample lists
of one category. The module-level `list_categories` and `load_dataset`
dispatch on `config.data.dataset` through the registry.

Registered here: mvtec, btad, folder, elpv and synthetic.

`config.data.source` says where the images come from: 'files' (the default)
reads the registered loaders above; 'tfds' reads mvtec and btad from TFDS
records instead (tfds_source.py), with the same samples.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from softpatch_jax.data import btad
from softpatch_jax.data import elpv
from softpatch_jax.data import folder
from softpatch_jax.data import mvtec
from softpatch_jax.data import synthetic
from softpatch_jax.data import tfds_source
from softpatch_jax.data.types import Sample

_T = TypeVar("_T")

# name -> the registered object (anything with `categories` and `load`).
_REGISTRY: Dict[str, Any] = {}
# Values of config.data.source.
SOURCES = ("files", "tfds")


def register_dataset(name: str, *, replace: bool = False) -> Callable[[_T], _T]:
  """Returns a decorator registering a data set under `name`.

  Args:
    name: the value of `config.data.dataset` that selects the data set.
    replace: allow replacing a data set registered under the same name.

  Returns:
    A decorator that registers its argument (a class, an instance or any
    object with callable attributes `categories(config, workdir)` and
    `load(config, category, workdir)`) and returns it unchanged.

  Raises:
    ValueError: at decoration, when `name` is taken and `replace` is False.
    TypeError: at decoration, when `categories` or `load` is missing.
  """

  def decorator(dataset: _T) -> _T:
    for attr in ("categories", "load"):
      if not callable(getattr(dataset, attr, None)):
        raise TypeError(
            f"dataset {name!r} must have a callable {attr!r}, got {dataset!r}"
        )
    if name in _REGISTRY and not replace:
      raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = dataset
    return dataset

  return decorator


def registered_names() -> List[str]:
  """The names of the registered data sets, in registration order."""
  return list(_REGISTRY)


def get_dataset(name: str) -> Any:
  """The data set registered under `name` (ValueError listing the names)."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown config.data.dataset {name!r}; choose from "
        f"{', '.join(registered_names())}"
    ) from None


def _source(config) -> Any:
  """The data set `config.data` names, read from `config.data.source`."""
  source = config.data.get("source") or "files"
  if source == "files":
    return get_dataset(config.data.dataset)
  if source == "tfds":
    return tfds_source.dataset(config.data.dataset)
  raise ValueError(
      f"unknown config.data.source {source!r}; choose from {', '.join(SOURCES)}"
  )


def list_categories(config, workdir: Optional[str] = None) -> List[str]:
  """The categories to run: `config.data.categories`, else those found.

  `config.data.categories` may be a comma-separated string or a list; when it
  is empty the data set's own `categories` decides (the folders under
  `config.data.root` for mvtec and btad, a fixed list otherwise). An unknown
  `config.data.dataset` is a ValueError either way, so a run fails on it
  before any work.
  """
  dataset = _source(config)
  cats = config.data.get("categories")
  if isinstance(cats, str):
    cats = [c.strip() for c in cats.split(",") if c.strip()]
  if cats:
    return list(cats)
  return list(dataset.categories(config, workdir))


def _check_max_train(config) -> int:
  """`config.data.max_train` checked: an int >= 0 (0, or None, = all)."""
  value = config.data.get("max_train", 0)
  if value is None:
    return 0
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < 0
  ):
    raise ValueError(
        "config.data.max_train must be an int >= 0 (0 = every training "
        f"image), got {value!r}"
    )
  return int(value)


def load_dataset(
    config, category: str, workdir: Optional[str]
) -> Tuple[List[Sample], List[Sample]]:
  """The (train, test) Sample lists of one category of `config.data`.

  With `config.data.max_train` = N > 0 only the first N training images are
  kept, in the loader's (sorted) order; elpv draws its own seeded subset of N
  instead (elpv.load_category), which this leaves as it is. Applied here, so
  before any noise injection: the injected count follows the capped set.
  """
  dataset = _source(config)
  cap = _check_max_train(config)
  train, test = dataset.load(config, category, workdir)
  if cap and len(train) > cap:
    train = list(train)[:cap]
  return train, test


# ---------------------------------------------------------------------------
# Built-in data sets.


@dataclasses.dataclass(frozen=True)
class _RootLayout:
  """A layout under `config.data.root` whose categories are its sub-folders."""

  module: Any  # mvtec or btad: list_categories(root), load_category(root, c)

  def categories(self, config, workdir):
    del workdir  # unused
    return self.module.list_categories(config.data.root)

  def load(self, config, category, workdir):
    del workdir  # unused
    return self.module.load_category(config.data.root, category)


register_dataset("mvtec")(_RootLayout(mvtec))  # MVTec AD
register_dataset("btad")(_RootLayout(btad))  # BTAD (beanTech)


@register_dataset("folder")
class _Folder:
  """`config.data.train_dir` (+ optional `test_dir`): one category."""

  @staticmethod
  def categories(config, workdir):
    del config, workdir  # unused
    return ["folder"]

  @staticmethod
  def load(config, category, workdir):
    del category, workdir  # unused
    return folder.load_folder(
        config.data.train_dir, config.data.get("test_dir") or None
    )


@register_dataset("elpv")
class _ELPV:
  """ELPV solar cells from the elpv-dataset package: mono and poly."""

  @staticmethod
  def categories(config, workdir):
    del config, workdir  # unused
    return ["mono", "poly"]

  @staticmethod
  def load(config, category, workdir):
    del workdir  # unused
    return elpv.load_category(
        category,
        seed=config.data.split_seed,
        test_normal_fraction=config.data.test_normal_fraction,
        max_train=config.data.get("max_train") or None,
    )


@register_dataset("synthetic")
class _Synthetic:
  """Generated MVTec-like textures, cached in <workdir>/synthetic_data."""

  @staticmethod
  def categories(config, workdir):
    del config, workdir  # unused
    return ["synth"]

  @staticmethod
  def load(config, category, workdir):
    s = config.data.synthetic
    root = synthetic.ensure_generated(
        workdir,
        categories=list_categories(config, workdir=None),
        n_train=s.n_train,
        n_test_good=s.n_test_good,
        n_test_defect=s.n_test_defect,
        size=s.size,
        seed=s.seed,
    )
    return mvtec.load_category(root, category)
