"""softpatch-jax: SoftPatch / PatchCore anomaly detection in JAX and Flax.

The core, in data-flow order, is pure and jittable: backbones -> features
(`embed`) -> denoise (`patch_weights`) -> coreset -> banks (`build_bank`)
-> scoring (`score`) -> metrics. Below the edge, `embedding`, `fitting` and
`inference` chain the stages over image streams, taking typed settings
records. The edge reads the config once (`options.from_config`) and touches
files, flags and the terminal: `evaluate`, `fit`, `predict`,
`experiments` and `main`.
"""

__version__ = "0.3.0"
