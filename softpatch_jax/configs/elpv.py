r"""SoftPatch vs PatchCore on the full ELPV solar-cell data (mono, poly).

The whole ELPV split (mono: 470 train / 431 test; poly: 736 / 586) at the
paper's 224 crop, EfficientNet-Lite0 stage3+stage5, 10 % injected defective
cells (overlap). The `default` config is the quick, subsampled version.

Command:
  python -m softpatch_jax.main --config=elpv --workdir out/elpv
  (injected noise from the ambiguous 0.33/0.67 cells instead:
   --config.noise.source=uncertain)

Expected runtime: roughly 30-60 min on a 2-core CPU; a few minutes on a GPU.
Expected result: see the `default` config for the measured numbers of the
quick version; this full run is the one to quote.
"""

from softpatch_jax import defaults


def get_config():
  return defaults.elpv_config()
