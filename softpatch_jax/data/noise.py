"""Noisy-training-set protocol.

The noisy setting of SoftPatch (Jiang et al., NeurIPS 2022): a
fraction of the anomalous test images is added to the training set, which is
then used as if it were all normal; in the "overlap" setting the added images
also stay in the test set, in the "no overlap" setting they are removed from
it.

n = int(ratio * len(train)) images are drawn without replacement from the
candidate pool (the anomalous test images in test-list order, or `pool`)
and appended to train with injected=True, in the order of the draw. Their
label stays 1 so a run can tell which training images are noise; fitting
uses every train sample regardless of label. overlap=True keeps the drawn
images in test as well; overlap=False removes them (the rest keep their
order).

The draws (`draw`):
  * 'reference': random.Random(seed).sample(range(len(pool)), n). The
    official SoftPatch code draws with Python's random.sample over the
    positions of the anomalous images of its test list (defect-type folders
    sorted, the normal folder among them, files sorted within each folder,
    which is the order of the MVTec and BTAD loaders here), so for the same
    seed it injects the same images in the same order.
  * 'stratified': as even across defect types as their sizes allow; the
    candidates of each type (types in sorted order) are shuffled with
    random.Random(seed) and taken round-robin, one per type per round.
  * 'numpy': np.random.default_rng(seed).choice, sorted; the draw of earlier
    versions, kept to reproduce their results.
`chosen` replaces the draw with a given list of candidates, in its order
(`select` builds it from paths or test-list positions).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import random
from typing import Collection, List, Optional, Sequence, Tuple, Union

import numpy as np

from softpatch_jax import settings

from softpatch_jax.data.types import ANOMALOUS
from softpatch_jax.data.types import NORMAL
from softpatch_jax.data.types import Sample

DRAWS = ("reference", "stratified", "numpy")


# Values of NoiseOptions.source: injected images come from the anomalous
# test images, or (elpv) from the cells its labellers were unsure about.
NOISE_SOURCES = ("test", "uncertain")


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
  """config.noise: the noisy-training protocol (README, "The default job").

  ratio: injected anomalous images per clean training image, in [0, 1).
  overlap: keep the injected images in the test set too.
  seed: the draw's seed.
  augment: augment the injected copies; augment_affine (+-3 % translation),
    augment_rotate (+-3 degrees), augment_noise (Gaussian, std 0.02 of the
    range), augment_blur (Gaussian, sigma 0.5-1.5 px) pick the transforms.
  resample: draw with replacement when the pool is too small.
  source: 'test' | 'uncertain' (elpv).
  draw: which images are injected (`DRAWS`): 'reference' =
    random.Random(seed).sample over the anomalous test images in test-list
    order, injected in draw order (the official code's draw when its global
    random state is seeded with `seed`); 'stratified' = round-robin over the
    defect types; 'numpy' = the sorted default_rng(seed) draw of earlier
    versions.
  inject_list: replaces the draw (and the count, even at ratio 0) with
    listed images, in the order given: a comma list of test-relative paths
    ('broken_large/000.png', optionally prefixed 'bottle/' or
    'bottle/test/'; entries of other categories are skipped), or a file:
    one path per line ('#' comments), or the official code's cached
    noise_index .pth file of test-list positions (needs data.max_test=0).
    '{category}' in it is replaced by the category. Listed images leave the
    test set without overlap.
  """

  ratio: float = 0.1
  overlap: bool = True
  seed: int = 0
  augment: bool = False
  augment_affine: bool = True
  augment_rotate: bool = True
  augment_noise: bool = False
  augment_blur: bool = False
  resample: bool = False
  source: str = "test"
  draw: str = "reference"
  inject_list: str = ""

  def __post_init__(self):
    ratio = settings.check_float(
        self.ratio, "noise.ratio", 0.0, 1.0, hi_open=True
    )
    settings.set_field(self, "ratio", ratio)
    settings.set_field(
        self, "seed", settings.check_int(self.seed, "noise.seed")
    )
    settings.check_choice(self.source, "noise.source", NOISE_SOURCES)
    settings.check_choice(self.draw, "noise.draw", DRAWS)
    settings.set_field(self, "inject_list", (self.inject_list or "").strip())


def _stratified(pool: Sequence[Sample], n: int, rnd: random.Random):
  """n pool positions, round-robin over the shuffled defect types."""
  types = sorted({s.defect_type for s in pool})
  groups = [
      [i for i, s in enumerate(pool) if s.defect_type == t] for t in types
  ]
  order = []
  # Each round of the outer loop uses every candidate once; further rounds
  # (resample) reshuffle.
  while len(order) < n:
    for g in groups:
      rnd.shuffle(g)
    for r in range(max(len(g) for g in groups)):
      order += [g[r] for g in groups if r < len(g)]
  return order[:n]


def _draw(pool, n, seed, draw, rng) -> Tuple[List[int], np.ndarray]:
  """(pool positions, is-repeat flags); repeats only when n > len(pool)."""
  size = len(pool)
  repeat = np.arange(n) >= size
  if draw == "numpy":
    if n <= size:
      picks = np.sort(rng.choice(size, size=n, replace=False)) if n else []
    else:
      extra = rng.choice(size, size=n - size, replace=True)
      picks = np.concatenate([np.arange(size), np.sort(extra)])
    return [int(k) for k in picks], repeat
  rnd = random.Random(seed)
  if draw == "stratified":
    return _stratified(pool, n, rnd), repeat
  # Every candidate once (what a draw of exactly len(pool) gives), then the
  # rest with replacement.
  picks = rnd.sample(range(size), min(n, size))
  picks += rnd.choices(range(size), k=max(0, n - size))
  return picks, repeat


def inject(
    train: Sequence[Sample],
    test: Sequence[Sample],
    options: NoiseOptions,
    pool: Optional[Sequence[Sample]] = None,
    chosen: Optional[Sequence[Sample]] = None,
) -> Tuple[List[Sample], List[Sample], dict]:
  """Returns (train + injected, test', info).

  options:  ratio, overlap, seed, augment, resample and draw are read
            (`NoiseOptions`):
    augment:  give every injected copy an aug_seed (the stream then augments
              it).
    resample: when the pool is smaller than n, draw every candidate once plus
              the rest with replacement; the repeats always get an aug_seed
              so they are not identical copies (with overlap, a small jitter
              such as +-3 deg rotation and +-3 % translation; see
              augment.py). Without it, too small a pool is a ValueError.
    draw:     'reference', 'stratified' or 'numpy' (module doc).
  pool:     the candidates; default the anomalous (label 1) test samples.
            ELPV passes its uncertain cells here.
  chosen:   the samples to inject, in this order, instead of a draw (then
            n = len(chosen) and `draw` is recorded as 'list').
  The augmentation seeds come from np.random.default_rng(seed) (after the
  picks for the numpy draw, as in earlier versions), one per injected copy.
  info: {n_injected, injected_paths, overlap, ratio, seed, augment, resample,
         n_resampled, pool_size, draw}.
  """
  train, test = list(train), list(test)
  from_test = pool is None
  pool = [s for s in test if s.label == ANOMALOUS] if from_test else list(pool)
  n = int(options.ratio * len(train)) if chosen is None else len(chosen)
  rng = np.random.default_rng(options.seed)
  if chosen is None:
    _check_pool(options, train, n, pool, from_test)
    picks, repeat = _draw(pool, n, options.seed, options.draw, rng)
    drawn = [pool[k] for k in picks]
  else:
    drawn, repeat = list(chosen), np.zeros(n, dtype=bool)
  # One augmentation seed per injected copy, drawn after the picks so the picks
  # do not depend on the augment flag.
  aug_seeds = rng.integers(0, 2**31 - 1, size=n)
  injected = _copies(drawn, repeat, aug_seeds, options.augment)
  new_test = test if options.overlap else _without(test, drawn, len(pool))
  info = dict(
      n_injected=n,
      injected_paths=[s.path for s in injected],
      overlap=bool(options.overlap),
      ratio=options.ratio,
      seed=options.seed,
      augment=bool(options.augment),
      resample=bool(options.resample),
      n_resampled=int(repeat.sum()),
      pool_size=len(pool),
      draw=options.draw if chosen is None else "list",
  )
  return train + injected, new_test, info


def _copies(drawn, repeat, aug_seeds, augment: bool) -> List[Sample]:
  """The injected copies; augmented ones (all, or the repeats) get a seed."""
  return [
      dataclasses.replace(
          s,
          injected=True,
          aug_seed=int(aug_seeds[i]) if (augment or rep) else None,
      )
      for i, (s, rep) in enumerate(zip(drawn, repeat))
  ]


def _check_pool(options, train, n: int, pool, from_test: bool) -> None:
  """A draw of n needs n candidates, unless it may resample a non-empty pool."""
  if n <= len(pool) or (options.resample and pool):
    return
  ratio = options.ratio
  pool_name = (
      "anomalous test images" if from_test else "candidate images in the pool"
  )
  cat = next((s.category for s in train if s.category), "")
  where = f" of category '{cat}'" if cat else ""
  raise ValueError(
      f"noise ratio {ratio} needs {n} {pool_name} (int({ratio} * "
      f"{len(train)} train images)){where}, but only {len(pool)} exist. "
      "Lower the ratio, or use overlap=True with resample=True (draw with "
      "replacement and augment the repeats, e.g. +-3 deg rotation and +-3 % "
      "translation)."
  )


def _without(test, drawn, pool_size: int) -> List[Sample]:
  """`test` less the drawn images (no overlap); refuses to empty it."""
  if not drawn:
    return test
  paths = {s.path for s in drawn}
  new_test = [s for s in test if s.path not in paths]
  if any(s.label == ANOMALOUS for s in test) and not any(
      s.label == ANOMALOUS for s in new_test
  ):
    raise ValueError(
        f"no-overlap injection of {len(drawn)} images would remove every "
        f"anomalous test image ({pool_size} exist), leaving nothing to "
        "evaluate; lower the ratio or use overlap=True"
    )
  return new_test


def _norm(path: str) -> str:
  return posixpath.normpath(path.replace(os.sep, "/").replace("\\", "/"))


def select(
    entries: Sequence[Union[str, int]],
    candidates: Sequence[Sample],
    category: str,
    other_categories: Collection[str] = (),
) -> List[Sample]:
  """The candidates named by `entries`, in the order given.

  An int is a position in `candidates` (the test list, or the pool). A
  string names the one candidate whose path ends with it (compared by whole
  path components, separators normalised), optionally prefixed with the
  category ('bottle/broken_large/000.png' for
  '.../bottle/test/broken_large/000.png'). A string prefixed with a name in
  `other_categories` that matches nothing here is skipped: it belongs to
  another category.

  Raises:
    ValueError: listing every entry that is out of range, matches no
      candidate, matches several, names an image that is not anomalous, or
      repeats an earlier entry.
  """
  paths = [_norm(s.path) for s in candidates]
  out, bad, seen = [], [], {}
  for entry in entries:
    hit, why = _find(entry, candidates, paths, category, other_categories)
    if hit is None:
      if why:
        bad.append((entry, why))
      continue
    s = candidates[hit]
    if s.label != ANOMALOUS:
      kind = "a normal" if s.label == NORMAL else "an unlabelled"
      bad.append((entry, f"is {kind} test image ({s.path})"))
    elif hit in seen:
      bad.append((entry, f"repeats entry {seen[hit]!r} ({s.path})"))
    else:
      seen[hit] = entry
      out.append(s)
  if bad:
    lines = "\n".join(f"  {e!r}: {why}" for e, why in bad)
    raise ValueError(
        f"{len(bad)} listed image(s) do not name one anomalous test image of "
        f"category '{category}':\n{lines}"
    )
  return out


def _find(entry, candidates, paths, category, other_categories):
  """(position of the one candidate `entry` names, None) or (None, why);
  why is '' for an entry of another category (skipped)."""
  if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
    if not 0 <= int(entry) < len(candidates):
      return None, f"out of range (0..{len(candidates) - 1})"
    return int(entry), ""
  e = _norm(str(entry)).lstrip("/")
  head, _, rest = e.partition("/")
  forms = [e] + ([rest] if head == category and rest else [])
  hits = [
      i
      for i, p in enumerate(paths)
      if any(p == f or p.endswith("/" + f) for f in forms)
  ]
  if not hits:
    if rest and head != category and head in other_categories:
      return None, ""
    return None, f"matches no test image of category '{category}'"
  if len(hits) > 1:
    names = ", ".join(candidates[i].path for i in hits[:3])
    more = ", ..." if len(hits) > 3 else ""
    return None, f"matches {len(hits)} test images ({names}{more})"
  return hits[0], ""
