r"""Every method on several data sets: the paper's main comparison.

SoftPatch (Jiang et al., NeurIPS 2022, Tables 1-2 for MVTec AD, Table 4 for
BTAD): PatchCore, PaDiM, PaDiM* (a PaDiM image filter before PatchCore),
CFLOW and SoftPatch with each discriminator and the fusion, at 10 % noise
with overlap (image_auroc_excl_injected: the no-overlap result).

Variants: offline (default: ELPV and the synthetic textures, one axis over
the data sets), mvtec, btad (one data set each; the paper's tables).

Commands:
  python -m softpatch_jax.experiments \
      --config=experiments/methods_x_datasets \
      --workdir out/methods_x_datasets
  python -m softpatch_jax.experiments \
      --config=experiments/methods_x_datasets:mvtec \
      --config.base.data.root=/data/mvtec_anomaly_detection \
      --config.base.backbone.weights=/path/wide_resnet50_2-95faca4d.pth \
      --workdir out/methods_mvtec

Expected runtime (offline, measured on a 2-core CPU shared with other
jobs, load 3-4): 8.4 min (9 cells: ELPV mono + poly and synthetic, 3 seeds).

Expected result (offline, measured; mean +- std over seeds 0-2):
                      ELPV image AUROC   synthetic image / pixel AUROC
  PatchCore           0.853 +- 0.014     0.983 / 0.895
  PaDiM               0.789 +- 0.014     0.925 / 0.912
  PaDiM*+PatchCore    0.867 +- 0.028     1.000 / 0.993
  CFLOW               0.579 +- 0.009     1.000 / 0.998
  SoftPatch-LOF       0.836 +- 0.006     1.000 / 0.994
  SoftPatch-nearest   0.876 +- 0.002     1.000 / 0.994
  SoftPatch-gaussian  0.875 +- 0.013     1.000 / 0.993
  SoftPatch-fusion    0.869 +- 0.007     1.000 / 0.994
On ELPV SoftPatch-nearest / -gaussian / -fusion and PaDiM* beat PatchCore;
SoftPatch-LOF does not at 10 % (see noise_sweep.py for where it does).
CFLOW fails on ELPV mono (0.42) while it is the best on the synthetic
textures.
"""

from softpatch_jax import defaults

# The synthetic data set on the ELPV base: the fields of
# defaults.study_base('synthetic') that differ from 'elpv'.
SYNTHETIC = (
    "data.dataset=synthetic data.categories=synth data.resize=96 "
    "data.crop=96 data.max_train=0 data.max_test=0 data.synthetic.size=96 "
    "data.synthetic.n_train=30 data.synthetic.n_test_good=10 "
    "data.synthetic.n_test_defect=20"
)


def get_config(variant="offline"):
  metrics = "image_auroc,pixel_auroc,image_auroc_excl_injected"
  if variant == "offline":
    base = defaults.study_base("elpv")
    axes = "dataset=elpv,synthetic;seed=0,1,2"
  else:
    base = defaults.study_base(variant)
    axes = "seed=0"
  base.noise.ratio = 0.1
  base.noise.overlap = True
  c = defaults.experiment_config(
      base, axes, f"Methods x data sets, 10 % noise ({variant})", metrics
  )
  if variant == "offline":
    c.study.presets.dataset = {"elpv": "", "synthetic": SYNTHETIC}
  return c
