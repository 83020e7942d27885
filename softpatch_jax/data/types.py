"""Plain records of the data layer: a `Sample` per image, a `Batch` per step."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import numpy as np

# Labels: 0 normal, 1 anomalous, -1 unknown (unlabelled test folders).
NORMAL, ANOMALOUS, UNLABELLED = 0, 1, -1


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image on disk plus what is known about it.

  path:        image file.
  label:       0 normal, 1 anomalous, -1 unknown (unlabelled test folder).
  defect_type: sub-folder name ('good', 'scratch', ...).
  mask_path:   pixel ground truth (white = defect) or None when there is none.
  injected:    True for anomalous test images added to train by the noise
               protocol.
  aug_seed:    when not None, the stream augments this image deterministically
               from the seed.
  category:    dataset category ('bottle', 'mono', ...).
  """

  path: str
  label: int
  defect_type: str
  mask_path: Optional[str] = None
  injected: bool = False
  aug_seed: Optional[int] = None
  category: str = ""

  def __post_init__(self):
    if self.label not in (UNLABELLED, NORMAL, ANOMALOUS):
      raise ValueError(
          f"Sample label must be -1, 0 or 1, got {self.label!r} for {self.path}"
      )


class Batch(NamedTuple):
  """One decoded batch, covering up to batch_size consecutive input samples.

  images:  float32 (B, H, W, C), already normalised with the preprocess
           mean/std; None when no sample of the batch could be decoded
           (errors="collect" only).
  masks:   float32 (B, H, W) in {0, 1}, or None when masks were not
           requested or images is None.
  labels:  int32 (B,).
  indices: int64 (B,) positions of these images in the sample list given to
           the stream.
  errors:  ((index, message), ...) for the samples of this batch whose
           decoding failed, in input order (errors="collect" only; always
           empty otherwise). Those samples are not in images/labels/indices,
           so B is the number of samples decoded, possibly 0.
  """

  images: Optional[np.ndarray]
  masks: Optional[np.ndarray]
  labels: np.ndarray
  indices: np.ndarray
  errors: Tuple[Tuple[int, str], ...] = ()


def has_pixel_labels(samples) -> bool:
  """True when every anomalous sample has a mask (pixel metrics are meaningful).

  The stream fills a missing mask with zeros; for anomalous images without
  masks (ELPV, unlabelled folders) those zeros are not ground truth, so pixel
  metrics should be reported as n/a.
  """
  samples = list(samples)
  anomalous = [s for s in samples if s.label == ANOMALOUS]
  return bool(anomalous) and all(s.mask_path is not None for s in anomalous)
