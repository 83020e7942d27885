"""The evaluation protocol on top of the loaders, driven by the config.

`subsample_test` shrinks the test set for quick runs; `apply_noise` turns a
clean training set into a noisy one following `config.noise` (the noisy
training setting of SoftPatch, Jiang et al., NeurIPS 2022, Section 4.1: a
fraction of the anomalous test images is added to the training set, with or
without keeping them in the test set); `build_augment` gives the transforms
applied to the injected copies.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from softpatch_jax.data import elpv
from softpatch_jax.data import noise
from softpatch_jax.data.augment import Augment
from softpatch_jax.data.types import Sample


def apply_noise(
    config, category: str, train: Sequence[Sample], test: Sequence[Sample]
) -> Tuple[List[Sample], List[Sample], Optional[dict]]:
  """Applies the noisy-training protocol of `config.noise` to one category.

  Args:
    config: the run config; reads `config.noise` (ratio, overlap, seed,
      augment, resample, source) and `config.data.dataset`.
    category: the category the samples belong to (recorded in the info, and
      the cell type for `config.noise.source='uncertain'`).
    train: the clean training samples.
    test: the test samples.

  Returns:
    (train, test, info): the samples after injection and the record of
    `noise.inject` with the category added; `(train, test, None)` unchanged
    when `config.noise.ratio` is 0.

  Raises:
    ValueError: `config.noise.source='uncertain'` with a data set other than
      elpv, or any error of `noise.inject`.
  """
  nc = config.noise
  if not nc.ratio:
    return train, test, None
  source = None
  if nc.get("source", "test") == "uncertain":
    if config.data.dataset != "elpv":
      raise ValueError("config.noise.source='uncertain' needs the elpv dataset")
    source = elpv.uncertain_samples(category)
  train, test, info = noise.inject(
      train,
      test,
      ratio=nc.ratio,
      overlap=nc.overlap,
      seed=nc.seed,
      augment=nc.augment,
      source=source,
      resample=nc.get("resample", False),
  )
  info = dict(info, category=category)
  return train, test, info


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


def build_augment(config) -> Augment:
  """The transforms applied to injected training copies (`config.noise`)."""
  nc = config.noise
  return Augment(
      affine=nc.get("augment_affine", True),
      rotate=nc.get("augment_rotate", True),
      noise=nc.get("augment_noise", False),
      blur=nc.get("augment_blur", False),
  )
