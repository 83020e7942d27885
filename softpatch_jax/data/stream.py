"""Ordered, bounded, multi-threaded decoding of Samples into Batches."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
from typing import Iterable, Iterator, Optional

import numpy as np

from softpatch_jax.data.augment import Augment
from softpatch_jax.data.preprocess import Preprocess
from softpatch_jax.data.types import Batch

ERROR_MODES = ("raise", "collect")


def n_batches(n: int, bs: int) -> int:
  """Batches of size bs that hold n items."""
  return (n + bs - 1) // bs


def stream_batches(
    samples: Iterable,
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int,
    with_masks: bool = True,
    prefetch: int = 2,
    augment: Optional[Augment] = None,
    errors: str = "raise",
) -> Iterator[Batch]:
  """Yields Batches of decoded samples in input order.

  Each batch covers the next `batch_size` input samples; the last one may
  cover fewer. Decoding (PIL + numpy, which release the GIL) runs in a thread
  pool of `num_workers` threads (0: decode in the calling thread). At most
  batch_size * (prefetch + 1) samples are submitted-but-not-yet-yielded at any
  time, so a category is never decoded into memory at once. `samples` may be
  any iterable (a generator works). Samples with aug_seed set are augmented
  with `augment` (default Augment()).

  Args:
    samples: the Samples to decode.
    preprocess: decodes and transforms each sample (`load_sample`).
    batch_size: input samples per batch, >= 1.
    num_workers: decoding threads, >= 0.
    with_masks: also decode the masks (`Batch.masks` is None otherwise).
    prefetch: batches decoded ahead of the consumer, >= 0.
    augment: the transforms for samples with aug_seed set.
    errors: what a sample whose decoding raises ValueError (a missing,
      empty or corrupt file, a mask of the wrong size; the message names the
      file) does. 'raise': the ValueError surfaces when its batch is reached.
      'collect': the sample is left out of its batch's images, masks, labels
      and indices and reported in `Batch.errors` as (index, message); the
      other samples come through in order. A batch may then hold fewer images
      than it covers samples, or none (see `Batch`). Other exceptions always
      propagate.

  Returns:
    An iterator of Batches.

  Raises:
    ValueError: at the call, for an invalid argument.
  """
  _check_args(batch_size, num_workers, prefetch, errors)
  decode = _Decoder(
      preprocess,
      bool(with_masks),
      augment if augment is not None else Augment(),
      errors == "collect",
  )
  # Arguments are checked now; the generators below start threads only when
  # iterated.
  items = enumerate(samples)
  if int(num_workers) == 0:
    return _serial(items, decode, int(batch_size))
  return _threaded(
      items, decode, int(batch_size), int(num_workers), int(prefetch)
  )


def _check_args(batch_size, num_workers, prefetch, errors) -> None:
  """ValueError naming the first invalid argument of `stream_batches`."""
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if int(num_workers) < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  if int(prefetch) < 0:
    raise ValueError(f"prefetch must be >= 0, got {prefetch}")
  if errors not in ERROR_MODES:
    raise ValueError(
        f"errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}"
    )


@dataclasses.dataclass(frozen=True)
class _Decoder:
  """Decodes one (index, sample) into (index, label, image, mask, error)."""

  preprocess: Preprocess
  with_masks: bool
  augment: Augment
  collect: bool  # errors='collect': a ValueError becomes the error message

  def __call__(self, item):
    index, sample = item
    try:
      x, m = self.preprocess.load_sample(
          sample, with_mask=self.with_masks, augment=self.augment
      )
    except ValueError as e:
      if not self.collect:
        raise
      return index, sample.label, None, None, str(e)
    return index, sample.label, x, m, None


def _serial(items, decode: _Decoder, batch_size: int) -> Iterator[Batch]:
  """Batches decoded in the calling thread."""
  while True:
    chunk = list(itertools.islice(items, batch_size))
    if not chunk:
      return
    yield _collate([decode(it) for it in chunk], decode.with_masks)


def _threaded(items, decode: _Decoder, batch_size, num_workers, prefetch):
  """Batches decoded by a pool of threads, at most prefetch batches ahead."""
  cap = batch_size * (prefetch + 1)
  pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=num_workers, thread_name_prefix="softpatch-data"
  )
  pending: collections.deque = collections.deque()
  exhausted = False

  def refill():
    nonlocal exhausted
    while not exhausted and len(pending) < cap:
      item = next(items, None)
      if item is None:
        exhausted = True
        return
      pending.append(pool.submit(decode, item))

  try:
    refill()
    while pending:
      futures = [
          pending.popleft() for _ in range(min(batch_size, len(pending)))
      ]
      batch = _collate([f.result() for f in futures], decode.with_masks)
      refill()  # keep the workers busy while the consumer uses this batch
      yield batch
  finally:
    # Consumer stopped early or an error surfaced: drop queued work, wait for
    # running.
    for f in pending:
      f.cancel()
    pool.shutdown(wait=True, cancel_futures=True)


def _collate(results, with_masks: bool) -> Batch:
  """One Batch from `load` results, in input order."""
  errors = tuple((r[0], r[4]) for r in results if r[4] is not None)
  ok = [r for r in results if r[4] is None]
  labels = np.asarray([r[1] for r in ok], dtype=np.int32)
  indices = np.asarray([r[0] for r in ok], dtype=np.int64)
  if not ok:
    return Batch(
        images=None, masks=None, labels=labels, indices=indices, errors=errors
    )
  shapes = {r[2].shape for r in ok}
  if len(shapes) > 1:
    raise ValueError(
        f"images in one batch have different shapes {sorted(shapes)}; set "
        "Preprocess.resize/crop so every image ends up the same size"
    )
  images = np.stack([r[2] for r in ok]).astype(np.float32, copy=False)
  masks = (
      np.stack([r[3] for r in ok]).astype(np.float32, copy=False)
      if with_masks
      else None
  )
  return Batch(
      images=images, masks=masks, labels=labels, indices=indices, errors=errors
  )
