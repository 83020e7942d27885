"""softpatch-jax: SoftPatch / PatchCore anomaly detection in JAX and Flax.

The core, in data-flow order, is pure and jittable: backbones -> features
(`embed`) -> denoise (`patch_weights`) -> coreset -> methods (`build_bank`)
-> scoring (`score`) -> metrics. `engine` chains the stages over image
streams; `experiment`, `fit`, `predict`, `model_io` and `main` are the edge
that touches files, flags and the terminal.
"""

__version__ = "0.1.0"
