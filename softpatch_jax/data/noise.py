"""Noisy-training-set protocol.

The noisy setting of SoftPatch (Jiang et al., NeurIPS 2022): a
fraction of the anomalous test images is added to the training set, which is
then used as if it were all normal; in the "overlap" setting the added images
also stay in the test set, in the "no overlap" setting they are removed from
it.

n = int(ratio * len(train)) anomalous images are drawn from the test set (or
from `source`) with np.random.default_rng(seed), without replacement, and
appended to train with injected=True. Their label stays 1 so a run can tell
which training images are noise; fitting uses every train sample
regardless of label. overlap=True keeps the drawn images in test as
well; overlap=False removes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from softpatch_jax.data.types import ANOMALOUS
from softpatch_jax.data.types import Sample


def inject(
    train: Sequence[Sample],
    test: Sequence[Sample],
    ratio: float,
    overlap: bool,
    seed: int,
    augment: bool = False,
    source: Optional[Sequence[Sample]] = None,
    resample: bool = False,
) -> Tuple[List[Sample], List[Sample], dict]:
  """Returns (train + injected, test', info).

  source:   candidate pool; default the anomalous (label 1) test samples. ELPV
            passes its uncertain cells here.
  augment:  give every injected copy an aug_seed (the stream then augments it).
  resample: when the pool is smaller than n, draw every candidate once plus
            the rest with replacement; the repeats always get an aug_seed so
            they are not identical copies (with overlap, a small jitter such
            as +-3 deg rotation and +-3 % translation; see augment.py).
            Without it, too small a pool is a ValueError.
  info: {n_injected, injected_paths, overlap, ratio, seed, augment, resample,
         n_resampled, pool_size}.
  """
  ratio = float(ratio)
  if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
    raise ValueError(f"noise ratio must be in [0, 1), got {ratio}")
  train, test = list(train), list(test)
  from_test = source is None
  pool = (
      [s for s in test if s.label == ANOMALOUS] if from_test else list(source)
  )
  pool_name = (
      "anomalous test images" if from_test else "candidate images in `source`"
  )
  n = int(ratio * len(train))
  rng = np.random.default_rng(seed)

  if n > len(pool) and not resample:
    cat = next((s.category for s in train if s.category), "")
    where = f" of category '{cat}'" if cat else ""
    raise ValueError(
        f"noise ratio {ratio} needs {n} {pool_name} (int({ratio} * "
        f"{len(train)} train images)){where}, but only {len(pool)} exist. "
        "Lower the ratio, or use overlap=True with resample=True (draw with "
        "replacement and augment the repeats, e.g. +-3 deg rotation and +-3 % "
        "translation)."
    )

  if n <= len(pool):
    picks = (
        np.sort(rng.choice(len(pool), size=n, replace=False))
        if n
        else np.zeros(0, int)
    )
    repeat = np.zeros(n, dtype=bool)
  else:
    extra = rng.choice(len(pool), size=n - len(pool), replace=True)
    picks = np.concatenate([np.arange(len(pool)), np.sort(extra)])
    repeat = np.arange(n) >= len(pool)
  # One augmentation seed per injected copy, drawn after the picks so the picks
  # do not depend on the augment flag.
  aug_seeds = rng.integers(0, 2**31 - 1, size=n)

  injected = []
  for i, (k, rep) in enumerate(zip(picks, repeat)):
    aug_seed = int(aug_seeds[i]) if (augment or rep) else None
    injected.append(
        dataclasses.replace(pool[int(k)], injected=True, aug_seed=aug_seed)
    )

  new_test = test
  if not overlap and n:
    drawn = {pool[int(k)].path for k in picks}
    new_test = [s for s in test if s.path not in drawn]
    if any(s.label == ANOMALOUS for s in test) and not any(
        s.label == ANOMALOUS for s in new_test
    ):
      raise ValueError(
          f"no-overlap injection of {n} images would remove every anomalous "
          f"test image ({len(pool)} exist), leaving nothing to evaluate; "
          "lower the ratio or use overlap=True"
      )

  info = dict(
      n_injected=n,
      injected_paths=[s.path for s in injected],
      overlap=bool(overlap),
      ratio=ratio,
      seed=seed,
      augment=bool(augment),
      resample=bool(resample),
      n_resampled=int(repeat.sum()),
      pool_size=len(pool),
  )
  return train + injected, new_test, info
