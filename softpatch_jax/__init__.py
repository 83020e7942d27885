"""softpatch-jax: SoftPatch / PatchCore anomaly detection in JAX and Flax.

Stages, in data-flow order: backbones -> features -> denoise -> coreset ->
scoring -> metrics; `pipeline` chains them and `main` is the command line.
"""

__version__ = "0.1.0"
