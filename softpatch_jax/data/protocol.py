"""The evaluation protocol on top of the loaders, driven by the records.

`subsample_test` shrinks the test set for quick runs; `apply_noise` turns a
clean training set into a noisy one following a `NoiseOptions` (the noisy
training setting of SoftPatch, Jiang et al., NeurIPS 2022, Section 4.1: a
fraction of the anomalous test images is added to the training set, with or
without keeping them in the test set); `build_augment` gives the transforms
applied to the injected copies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from softpatch_jax import torch_pickle
from softpatch_jax.data import btad
from softpatch_jax.data import elpv
from softpatch_jax.data import mvtec
from softpatch_jax.data import noise as noise_lib
from softpatch_jax.data import registry
from softpatch_jax.data.augment import Augment
from softpatch_jax.data.noise import NoiseOptions
from softpatch_jax.data.types import DataOptions
from softpatch_jax.data.types import Sample

# Files holding test-list positions, as cached by the official SoftPatch code.
_INDEX_FILES = (".pth", ".pt")
_LIST_FILES = _INDEX_FILES + (".txt", ".lst")


def apply_noise(
    noise: NoiseOptions,
    data: DataOptions,
    category: str,
    train: Sequence[Sample],
    test: Sequence[Sample],
) -> Tuple[List[Sample], List[Sample], Optional[dict]]:
  """Applies the noisy-training protocol of `noise` to one category.

  Args:
    noise: the protocol (ratio, overlap, seed, augment, resample, source,
      draw, inject_list).
    data: the data set settings; `dataset` (source='uncertain' needs elpv)
      and `max_test` (inject_list positions need the whole test set) are
      read.
    category: the category the samples belong to (recorded in the info, and
      the cell type for `noise.source='uncertain'`).
    train: the clean training samples.
    test: the test samples.

  Returns:
    (train, test, info): the samples after injection and the record of
    `noise.inject` with `category` and `inject_list` (the setting) added;
    `(train, test, None)` unchanged when `noise.ratio` is 0 and no
    `inject_list` is set.

  Raises:
    ValueError: a bad `inject_list` (every bad entry named);
      `noise.source='uncertain'` with a data set other than elpv; or any
      error of `noise.inject`.
  """
  if not noise.ratio and not noise.inject_list:
    return train, test, None
  pool = None
  if noise.source == "uncertain":
    if data.dataset != "elpv":
      raise ValueError("config.noise.source='uncertain' needs the elpv dataset")
    pool = elpv.uncertain_samples(category)
  chosen = None
  if noise.inject_list:
    candidates = test if pool is None else pool
    chosen = _listed(noise.inject_list, data, category, candidates)
  new_train, new_test, info = noise_lib.inject(train, test, noise, pool, chosen)
  k = int(noise.ratio * len(train))
  if chosen is not None and len(chosen) != k:
    logging.info(
        "%s: config.noise.inject_list gives %d image(s) for this category, "
        "not int(ratio %s * %d train images) = %d; injecting the list",
        category,
        len(chosen),
        noise.ratio,
        len(train),
        k,
    )
  info = dict(info, category=category, inject_list=noise.inject_list)
  return new_train, new_test, info


def read_inject_list(setting: str, category: str) -> List[Union[str, int]]:
  """The entries of a `config.noise.inject_list` setting for `category`.

  `{category}` in the setting is replaced by `category`. An existing file,
  or a name ending in .pth/.pt/.txt/.lst, is read: a .pth/.pt file is the
  official SoftPatch code's cached draw (a torch-saved list of test-list
  positions, read without torch); any other file holds one path per line
  (blank lines and '#' comments ignored). Otherwise the setting is a comma
  list of paths.
  """
  text = setting.replace("{category}", category).strip()
  path = os.path.expanduser(text)
  is_file = os.path.isfile(path)
  if not is_file and ("," in text or not text.lower().endswith(_LIST_FILES)):
    return [e.strip() for e in text.split(",") if e.strip()]
  if not is_file:
    raise ValueError(f"config.noise.inject_list: file not found: {path}")
  if path.lower().endswith(_INDEX_FILES):
    return _read_positions(path)
  entries = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split(" #", 1)[0].strip()
      if line and not line.startswith("#"):
        entries.append(line)
  return entries


def _read_positions(path: str) -> List[int]:
  """The list of ints in a torch-saved index file (ValueError otherwise)."""
  obj = torch_pickle.load(path)
  if isinstance(obj, np.ndarray) and obj.ndim == 1:
    obj = obj.tolist() if np.issubdtype(obj.dtype, np.integer) else obj
  if not isinstance(obj, (list, tuple)) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in obj
  ):
    raise ValueError(
        f"config.noise.inject_list: {path} does not hold a list of test-list "
        f"positions (ints), but a {type(obj).__name__}"
    )
  return list(obj)


def _other_categories(data: DataOptions, category: str) -> set:
  """Category names other than `category` (entries of theirs are skipped)."""
  names = set(mvtec.CATEGORIES) | set(btad.CATEGORIES) | set(elpv.CATEGORIES)
  try:
    names.update(registry.list_categories(data))
    dataset = registry.get_dataset(data.dataset)
    names.update(dataset.categories(data, None))
  except (ValueError, OSError):
    pass  # no discovery possible: the built-in and configured names remain
  names.discard(category)
  return names


def _listed(setting: str, data: DataOptions, category, candidates):
  """The samples `setting` (an inject_list) names for `category`."""
  entries = read_inject_list(setting, category)
  max_test = data.max_test
  positions = any(not isinstance(e, str) for e in entries)
  if positions and max_test:
    raise ValueError(
        f"config.noise.inject_list={setting!r} gives test-list positions, "
        "which refer to the whole test set; set config.data.max_test=0 "
        f"(it is {max_test})"
    )
  try:
    return noise_lib.select(
        entries, candidates, category, _other_categories(data, category)
    )
  except ValueError as e:
    hint = (
        f" (config.data.max_test={max_test} may have left them out)"
        if max_test
        else ""
    )
    raise ValueError(
        f"config.noise.inject_list={setting!r}: {e}{hint}"
    ) from None


def subsample_test(
    test: Sequence[Sample], max_test: int, seed: int
) -> Sequence[Sample]:
  """A seeded subsample of at most about `max_test` test images, per label.

  Keeps the normal/anomalous proportions (each label gets its rounded share,
  at least one image), so a quick run still has both classes; the kept
  samples stay in their input order. Applied before noise injection, so with
  overlap the injected images stay in the test set.

  Args:
    test: the test samples.
    max_test: the target size; 0 (or a set no larger) returns `test` itself.
    seed: the seed (the draw uses `np.random.default_rng([seed, 2])`).

  Returns:
    The subsample, or `test` unchanged.
  """
  if not max_test or len(test) <= max_test:
    return test
  rng = np.random.default_rng([seed, 2])
  labels = np.array([s.label for s in test])
  keep = []
  for lab in np.unique(labels):
    idx = np.flatnonzero(labels == lab)
    n = max(1, int(round(max_test * len(idx) / len(test))))
    keep += list(rng.choice(idx, size=min(n, len(idx)), replace=False))
  return [test[i] for i in sorted(keep)]


def build_augment(noise: NoiseOptions) -> Augment:
  """The transforms applied to injected training copies."""
  return Augment(
      affine=noise.augment_affine,
      rotate=noise.augment_rotate,
      noise=noise.augment_noise,
      blur=noise.augment_blur,
  )


@dataclasses.dataclass
class Category:
  """One category's samples after the protocol.

  name: the category; train / test: the samples after `subsample_test` and
  `apply_noise`; noise_info: the record of the injection (None: none).
  """

  name: str
  train: List[Sample]
  test: List[Sample]
  noise_info: Optional[dict]

  @property
  def n_injected(self) -> int:
    return sum(bool(s.injected) for s in self.train)


def prepare_category(
    data: DataOptions, noise: NoiseOptions, category: str, workdir
) -> Category:
  """Loads a category and applies the protocol: the one place that does.

  The test set is subsampled (`data.max_test`) before injection, so with
  overlap the injected images stay in the test set.
  """
  train, test = registry.load_dataset(data, category, workdir)
  test = subsample_test(test, data.max_test, data.split_seed)
  train, test, info = apply_noise(noise, data, category, train, test)
  return Category(category, list(train), list(test), info)
