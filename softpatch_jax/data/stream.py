"""Ordered, bounded, multi-threaded decoding of Samples into Batches."""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
from typing import Iterable, Iterator, Optional

import numpy as np

from .augment import Augment
from .preprocess import Preprocess
from .types import Batch


def stream_batches(samples: Iterable, preprocess: Preprocess, batch_size: int = 32,
                   num_workers: int = 4, with_masks: bool = True, prefetch: int = 2,
                   augment: Optional[Augment] = None) -> Iterator[Batch]:
    """Yield Batches of decoded samples in input order; the last batch may be smaller.

    Decoding (PIL + numpy, which release the GIL) runs in a thread pool of num_workers
    threads (0: decode in the calling thread).  At most batch_size * (prefetch + 1)
    samples are submitted-but-not-yet-yielded at any time, so a category is never
    decoded into memory at once.  `samples` may be any iterable (a generator works).
    Samples with aug_seed set are augmented with `augment` (default Augment()).
    Decoding errors (ValueError naming the file) surface when their batch is reached.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if int(prefetch) < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    augment = augment if augment is not None else Augment()
    # Arguments are checked now; the generator below starts threads only when iterated.
    return _generate(samples, preprocess, int(batch_size), int(num_workers), bool(with_masks),
                     int(prefetch), augment)


def _generate(samples, preprocess, batch_size, num_workers, with_masks, prefetch, augment):
    def load(item):
        index, sample = item
        x, m = preprocess.load_sample(sample, with_mask=with_masks, augment=augment)
        return index, sample.label, x, m

    items = enumerate(samples)
    if num_workers == 0:
        while True:
            chunk = list(itertools.islice(items, batch_size))
            if not chunk:
                return
            yield _collate([load(it) for it in chunk], with_masks)

    cap = batch_size * (prefetch + 1)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers,
                                                 thread_name_prefix="softpatch-data")
    pending: collections.deque = collections.deque()
    exhausted = False

    def refill():
        nonlocal exhausted
        while not exhausted and len(pending) < cap:
            item = next(items, None)
            if item is None:
                exhausted = True
                return
            pending.append(pool.submit(load, item))

    try:
        refill()
        while pending:
            futures = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            results = [f.result() for f in futures]
            batch = _collate(results, with_masks)
            refill()  # keep the workers busy while the consumer uses this batch
            yield batch
    finally:
        # Consumer stopped early or an error surfaced: drop queued work, wait for running.
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _collate(results, with_masks: bool) -> Batch:
    shapes = {r[2].shape for r in results}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; "
                         "set Preprocess.resize/crop so every image ends up the same size")
    images = np.stack([r[2] for r in results]).astype(np.float32, copy=False)
    masks = np.stack([r[3] for r in results]).astype(np.float32, copy=False) if with_masks else None
    labels = np.asarray([r[1] for r in results], dtype=np.int32)
    indices = np.asarray([r[0] for r in results], dtype=np.int64)
    return Batch(images=images, masks=masks, labels=labels, indices=indices)
