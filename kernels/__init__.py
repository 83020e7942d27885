"""Custom kernels, importable as ``softpatch_jax.kernels``.

Each op has a plain-jnp ``*_reference`` (the tested ground truth), an XLA
path (blocked, the default on CPU) and a Pallas kernel (the default on
GPU/TPU; ``impl='pallas_interpret'`` runs it on CPU for tests).
"""
from softpatch_jax.kernels.knn import knn, knn_reference
from softpatch_jax.kernels.lof import lof, lof_reference
from softpatch_jax.kernels.kcenter import kcenter, kcenter_reference
from softpatch_jax.kernels.scorer import score_images

__all__ = [
    "knn", "knn_reference", "lof", "lof_reference", "kcenter",
    "kcenter_reference", "score_images",
]
