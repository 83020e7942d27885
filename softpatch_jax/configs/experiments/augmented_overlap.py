r"""Augmented overlap: the injected copies are transformed before training.

The paper's appendix study (SoftPatch, Jiang et al., NeurIPS 2022, Table
10): with overlap, an injected training image is the very test image, which
flatters any method that memorises it. Augmenting the copy (affine +-3 %
translation, +-3 degree rotation, Gaussian noise std 0.02, blur sigma
0.5-1.5 px; data/augment.py) makes the overlap less exact. 10 % noise,
overlap, seeds 0, 1, 2.

Variants: elpv (default), synthetic, mvtec, btad (as in noise_sweep.py).

Commands:
  python -m softpatch_jax.experiments \
      --config=experiments/augmented_overlap \
      --workdir out/augmented_overlap
  python -m softpatch_jax.experiments \
      --config=experiments/augmented_overlap:synthetic \
      --workdir out/augmented_overlap_synth

Expected runtime (measured, 2-core CPU shared with other jobs, load 3-4):
synthetic 3.6 min (18 cells). elpv (36 cells) is not measured; at the
40-60 s per cell of discriminators.py it takes about 30 min.

Expected result (synthetic, measured; mean +- std over seeds 0-2):
  augment        none     affine   rotation noise    blur     all
  pixel AUROC
  PatchCore      0.895    0.944    0.897    0.899    0.944    0.958
  SoftPatch-*    0.993-0.994 in every column (LOF, nearest, Gaussian,
                 fusion)
  image AUROC
  PatchCore      0.983    0.998    0.996    0.999    1.000    1.000
  SoftPatch-*    1.000 in every column
Translating or blurring the injected copies makes the overlap inexact and
gives back PatchCore half of what it lost; a +-3 degree rotation or pixel
noise barely does. SoftPatch is unaffected either way.
"""

from softpatch_jax import defaults

_OFF = (
    "noise.augment_affine=False noise.augment_rotate=False "
    "noise.augment_noise=False noise.augment_blur=False"
)
PRESETS = {
    "none": "noise.augment=False",
    "affine": f"noise.augment=True {_OFF} noise.augment_affine=True",
    "rotation": f"noise.augment=True {_OFF} noise.augment_rotate=True",
    "noise": f"noise.augment=True {_OFF} noise.augment_noise=True",
    "blur": f"noise.augment=True {_OFF} noise.augment_blur=True",
    "all": (
        "noise.augment=True noise.augment_affine=True "
        "noise.augment_rotate=True noise.augment_noise=True "
        "noise.augment_blur=True"
    ),
}


def get_config(variant="elpv"):
  base = defaults.study_base(variant)
  base.methods = (
      "patchcore,softpatch_lof,softpatch_nearest,softpatch_gaussian,"
      "softpatch_fusion"
  )
  base.noise.ratio = 0.1
  base.noise.overlap = True
  metrics = "image_auroc"
  if variant != "elpv":  # pixel labels: ELPV has none
    metrics = "image_auroc,pixel_auroc"
  c = defaults.experiment_config(
      base,
      "augment=none,affine,rotation,noise,blur,all;seed=0,1,2",
      f"Augmented overlap, 10 % noise ({variant})",
      metrics,
  )
  c.study.presets.augment = PRESETS
  return c
