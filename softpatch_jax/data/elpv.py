"""ELPV electroluminescence solar cells, from the PyPI package `elpv-dataset`.

2,624 300x300 grayscale cells, image-level labels only (no masks: pixel
metrics are n/a). Defect probabilities: 0.0 functional, 1.0 defective,
0.33 / 0.67 uncertain.

Split (per cell type, deterministic for a given seed):
  * normals = probability 0.0 cells, in file-name order;
  * perm = np.random.default_rng(seed).permutation(len(normals));
    n_test = round(test_normal_fraction * len(normals)) normals perm[:n_test]
    go to test, the rest to train (both kept in file-name order);
  * test = held-out normals (label 0) + every probability-1.0 cell (label 1);
  * the uncertain cells are left out unless include_uncertain=True (then they
    are added to test as anomalous, defect_type 'uncertain_0.33' /
    'uncertain_0.67'); `uncertain_samples` returns them as a pool for
    noise.inject(source=...);
  * max_train keeps a subset of train chosen with default_rng([seed, 1]), in
    file-name order.
With test_normal_fraction 0.2 (the default of DataOptions): mono 470 train / 118 + 313 test, poly 736
train / 184 + 402 test.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from softpatch_jax.data.types import Sample

CATEGORIES = ("mono", "poly")
_LEVELS = {
    0.0: "good",
    1.0 / 3.0: "uncertain_0.33",
    2.0 / 3.0: "uncertain_0.67",
    1.0: "defective",
}


class MissingDataPackageError(ValueError, ImportError):
  """The data's PyPI package is not installed (the command lines' one-line
  error; an ImportError too)."""


def default_data_dir() -> str:
  """The folder with labels.csv and images/ in the elpv-dataset package."""
  spec = importlib.util.find_spec("elpv_dataset")
  if spec is None or not spec.submodule_search_locations:
    raise MissingDataPackageError(
        "the ELPV data (the default job's) comes from the PyPI package "
        "'elpv-dataset', which is not installed: pip install "
        "'softpatch-jax[demo]' (or pip install elpv-dataset)"
    )
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_labels(data_dir: Optional[str] = None) -> List[Tuple[str, float, str]]:
  """The labels: [(absolute image path, probability, 'mono' | 'poly')].

  Probabilities are snapped to 0, 1/3, 2/3 or 1.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  csv = os.path.join(data_dir, "labels.csv")
  if not os.path.isfile(csv):
    raise ValueError(f"ELPV labels file not found: {csv}")
  rows = []
  with open(csv, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 3:
        raise ValueError(
            f"{csv}:{lineno}: expected 'path probability type', got {line!r}"
        )
      rel, prob, kind = parts
      try:
        p = float(prob)
      except ValueError:
        raise ValueError(f"{csv}:{lineno}: bad probability {prob!r}") from None
      level = min(_LEVELS, key=lambda v: abs(v - p))
      if abs(level - p) > 1e-3:
        raise ValueError(
            f"{csv}:{lineno}: unexpected probability {p} (expected 0, 1/3, "
            "2/3 or 1)"
        )
      rows.append((os.path.join(data_dir, rel), level, kind))
  return rows


def _check_category(category: str) -> None:
  if category not in CATEGORIES:
    raise ValueError(
        f"ELPV category must be one of {CATEGORIES}, got {category!r}"
    )


def _cells(
    category: str, levels: Sequence[float], data_dir: Optional[str]
) -> List[Tuple[str, float]]:
  rows = read_labels(data_dir)
  out = sorted(
      (p, lv)
      for p, lv, kind in rows
      if kind == category and any(abs(lv - l) < 1e-6 for l in levels)
  )
  return out


def uncertain_samples(
    category: str,
    probabilities: Sequence[float] = (1 / 3, 2 / 3),
    data_dir: Optional[str] = None,
) -> List[Sample]:
  """Uncertain cells (label 1, no mask).

  A natural noise pool for noise.inject(source=...).
  """
  _check_category(category)
  return [
      Sample(p, 1, _LEVELS[lv], None, category=category)
      for p, lv in _cells(category, probabilities, data_dir)
  ]


def load_category(
    category: str,
    *,
    seed: int,
    test_normal_fraction: float,
    include_uncertain: bool = False,
    max_train: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> Tuple[List[Sample], List[Sample]]:
  """(train, test) of 'mono' or 'poly' cells (split: see the module doc).

  seed, test_normal_fraction: `DataOptions.split_seed` and
  `DataOptions.test_normal_fraction` (the fraction must be in (0, 1) here).
  """
  _check_category(category)
  if not 0.0 < float(test_normal_fraction) < 1.0:
    raise ValueError(
        f"test_normal_fraction must be in (0, 1), got {test_normal_fraction}"
    )
  if max_train is not None and int(max_train) < 1:
    raise ValueError(f"max_train must be >= 1 or None, got {max_train}")
  normals = [p for p, _ in _cells(category, (0.0,), data_dir)]
  defects = [p for p, _ in _cells(category, (1.0,), data_dir)]
  if not normals or not defects:
    raise ValueError(
        f"ELPV '{category}' has {len(normals)} functional and {len(defects)} "
        "defective cells; need both"
    )

  perm = np.random.default_rng(seed).permutation(len(normals))
  n_test = int(round(float(test_normal_fraction) * len(normals)))
  n_test = min(max(n_test, 1), len(normals) - 1)
  test_idx = np.sort(perm[:n_test])
  train_idx = np.sort(perm[n_test:])
  if max_train is not None and int(max_train) < len(train_idx):
    keep = np.random.default_rng([seed, 1]).choice(
        len(train_idx), size=int(max_train), replace=False
    )
    train_idx = train_idx[np.sort(keep)]

  train = [
      Sample(normals[i], 0, "good", None, category=category) for i in train_idx
  ]
  test = [
      Sample(normals[i], 0, "good", None, category=category) for i in test_idx
  ]
  test += [Sample(p, 1, "defective", None, category=category) for p in defects]
  if include_uncertain:
    test += uncertain_samples(category, data_dir=data_dir)
  test.sort(key=lambda s: s.path)
  return train, test
