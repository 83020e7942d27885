r"""Noise-ratio sweep: every method against the share of injected anomalies.

The paper's trend study (SoftPatch, Jiang et al., NeurIPS 2022, Fig. 4 and
Tables 1-2): anomalous test images are added to the training set at each
noise ratio. The protocol is an axis, noise.overlap=True,False: with overlap
the injected images also stay in the test set, without it they are removed
from it (data/protocol.py; the same seed injects the same images, so both
protocols fit on the same training set). The tables and trend.png call the
two "overlap" and "no overlap".

Variants (the text after ':'): elpv (default, offline), synthetic (offline),
mvtec and btad (the paper's tables; need the data and the WideResNet-50-2
weights).

Commands:
  python -m softpatch_jax.experiments \
      --config=experiments/noise_sweep --workdir out/noise_sweep
  python -m softpatch_jax.experiments \
      --config=experiments/noise_sweep:synthetic \
      --workdir out/noise_sweep_synth
  python -m softpatch_jax.experiments \
      --config=experiments/noise_sweep:mvtec \
      --config.base.data.root=/data/mvtec_anomaly_detection \
      --config.base.backbone.weights=/path/wide_resnet50_2-95faca4d.pth \
      --workdir out/noise_sweep_mvtec
  The paper's finer grid:
      --config.study.axes="noise.overlap=True,False;\
noise.ratio=0,0.05,0.1,0.15,0.2,0.4;seed=0,1,2"

Axes: noise.overlap=True,False x noise.ratio=0,0.1,0.2,0.4 x seed=0,1,2
(elpv, synthetic); mvtec and btad: noise.overlap=True,False x
noise.ratio=0,0.05,0.1,0.15,0.2 x seed=0. At ratio 0 nothing is injected,
so both protocols give the same numbers there (the trend lines start
together). Cells: elpv 48 (2 categories x 24 settings), synthetic 24.

ELPV sizes (defaults.study_base): 128 px, 40 normal training cells per
category (a seeded subset; ratio 0.4 adds 16 defective ones), about 50 test
cells per category (seeded, label-stratified); seeds 0, 1, 2 (projection,
coreset starts and the injected draw). Methods (defaults.SWEEP_METHODS):
PatchCore, PaDiM, PaDiM*+PatchCore, CFLOW, SoftPatch-LOF, SoftPatch-mutual
and consensus (README, "Noisy training data: robust methods").

Measured on a 2-core x86-64 CPU shared with other jobs, without CFLOW
(--config.base.methods=patchcore,padim,padim_filter+patchcore,softpatch_lof,\
softpatch_mutual,consensus): elpv 14 min (48 cells, 6-30 s each),
synthetic_hard 2.7 min (24 cells). CFLOW adds 40-100 s per category and
cell at 128 px; the README's CFLOW rows come from a run at ratios 0 and
0.4 only.

Expected result (elpv, image AUROC, mean over mono + poly, mean +- std over
seeds 0-2; docs/results/table.md has every category):
                     overlap                               no overlap
  noise ratio        0      0.1    0.2    0.4              0.1    0.2    0.4
  PatchCore          0.891  0.853  0.791  0.717+-.030      0.892  0.874  0.842+-.035
  PaDiM              0.899  0.789  0.692  0.471+-.023      0.891  0.897  0.867+-.043
  PaDiM*+PatchCore   0.888  0.867  0.872  0.791+-.011      0.876  0.893  0.883+-.031
  SoftPatch-LOF      0.850  0.836  0.836  0.834+-.016      0.835  0.847  0.831+-.048
  SoftPatch-mutual   0.859  0.841  0.847  0.804+-.006      0.837  0.854  0.811+-.038
  consensus          0.882  0.879  0.869  0.865+-.004      0.878  0.873  0.854+-.032
(ratio 0 is the same for both protocols.) With overlap consensus loses
0.017 from 0 to 40 %, SoftPatch-LOF 0.016, PatchCore 0.17 and PaDiM 0.43.
Without overlap the test set shrinks to the images that were not injected;
re-scored on those images (benchmarks/noise_loss.py,
docs/results/noise_loss.md) the clean models lose 0.009 (consensus), 0.006
(SoftPatch-LOF), 0.019 (PaDiM) and 0.035 (PatchCore) at 40 %.

synthetic_hard (pixel masks; docs/results/synthetic_hard/): image / pixel
AUROC at 0 -> 40 % with overlap: PatchCore 0.956 / 0.948 -> 0.849 / 0.754,
SoftPatch-LOF 0.931 / 0.944 -> 0.956 / 0.924, consensus 0.915 / 0.942 ->
0.917 / 0.950; without overlap at 40 %: 0.957 / 0.950, 0.972 / 0.952,
0.932 / 0.954.
"""

from softpatch_jax import defaults


def get_config(variant="elpv"):
  base = defaults.study_base(variant)
  base.methods = defaults.SWEEP_METHODS
  # image_auroc_excl_injected is left out: the overlap=False cells are the
  # no-overlap result (results.csv still has the column).
  metrics = "image_auroc"
  axes = "noise.overlap=True,False;noise.ratio=0,0.1,0.2,0.4;seed=0,1,2"
  if variant in ("synthetic", "synthetic_hard"):
    base.data.synthetic.n_test_defect = 24  # 12 injected at 0.4
  if variant != "elpv":  # pixel labels: ELPV has none
    metrics = "image_auroc,pixel_auroc,aupro"
  if variant in ("mvtec", "btad"):
    axes = "noise.overlap=True,False;noise.ratio=0,0.05,0.1,0.15,0.2;seed=0"
  return defaults.experiment_config(
      base, axes, f"Noise-ratio sweep ({variant})", metrics
  )
