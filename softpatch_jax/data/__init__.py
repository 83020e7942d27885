"""Data layer: dataset loaders, decoding/preprocessing, streaming, noise protocol."""
from .augment import Augment
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, open_image, open_mask
from .stream import stream_batches
from .types import Batch, Sample, has_pixel_labels
from ._files import IMAGE_EXTENSIONS
from . import btad, elpv, folder, mvtec, noise, synthetic

__all__ = ["Augment", "Batch", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess",
           "Sample", "btad", "elpv", "folder", "has_pixel_labels", "mvtec", "noise", "open_image",
           "open_mask", "stream_batches", "synthetic"]
