"""Data layer: data sets, decoding and preprocessing, streaming, protocol.

Every function here takes the typed records `DataOptions` (types.py) and
`NoiseOptions` (noise.py), or plain values; the config is read at the edge
(softpatch_jax.options).

`register_dataset` / `get_dataset` / `list_categories` / `load_dataset`: the
data sets that `DataOptions.dataset` names (registry.py); `Preprocess` /
`preprocess_for`: decoding and the resize -> crop -> normalise transform
(preprocess.py, decode.py); `stream_batches`: ordered, bounded,
multi-threaded decoding into Batches (stream.py); `subsample_test` /
`prepare_category` / `apply_noise` / `build_augment`: the evaluation protocol (protocol.py);
`tfds_builders` / `tfds_source`: MVTec AD and BTAD as TFDS data sets, and
`DataOptions.source='tfds'`.
"""

from softpatch_jax.data import btad
from softpatch_jax.data import elpv
from softpatch_jax.data import files
from softpatch_jax.data import folder
from softpatch_jax.data import geometry
from softpatch_jax.data import mvtec
from softpatch_jax.data import noise
from softpatch_jax.data import synthetic
from softpatch_jax.data import tfds_builders
from softpatch_jax.data import tfds_source
from softpatch_jax.data.augment import Augment
from softpatch_jax.data.decode import open_image
from softpatch_jax.data.decode import open_mask
from softpatch_jax.data.files import IMAGE_EXTENSIONS
from softpatch_jax.data.geometry import whole_image_size
from softpatch_jax.data.noise import NoiseOptions
from softpatch_jax.data.preprocess import IMAGENET_MEAN
from softpatch_jax.data.preprocess import IMAGENET_STD
from softpatch_jax.data.preprocess import Preprocess
from softpatch_jax.data.preprocess import preprocess_for
from softpatch_jax.data.protocol import apply_noise
from softpatch_jax.data.protocol import build_augment
from softpatch_jax.data.protocol import Category
from softpatch_jax.data.protocol import prepare_category
from softpatch_jax.data.protocol import subsample_test
from softpatch_jax.data.registry import get_dataset
from softpatch_jax.data.registry import list_categories
from softpatch_jax.data.registry import load_dataset
from softpatch_jax.data.registry import register_dataset
from softpatch_jax.data.registry import registered_names
from softpatch_jax.data.stream import n_batches
from softpatch_jax.data.stream import stream_batches
from softpatch_jax.data.types import Batch
from softpatch_jax.data.types import DataOptions
from softpatch_jax.data.types import has_pixel_labels
from softpatch_jax.data.types import Sample

__all__ = [
    "Augment",
    "Batch",
    "DataOptions",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NoiseOptions",
    "Preprocess",
    "Sample",
    "apply_noise",
    "btad",
    "build_augment",
    "Category",
    "prepare_category",
    "elpv",
    "files",
    "folder",
    "geometry",
    "get_dataset",
    "has_pixel_labels",
    "list_categories",
    "load_dataset",
    "mvtec",
    "n_batches",
    "noise",
    "open_image",
    "open_mask",
    "preprocess_for",
    "register_dataset",
    "registered_names",
    "stream_batches",
    "subsample_test",
    "synthetic",
    "tfds_builders",
    "tfds_source",
    "whole_image_size",
]
