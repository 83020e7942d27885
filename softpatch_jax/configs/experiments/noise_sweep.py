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
coreset starts and the injected draw); 8 methods: PatchCore, PaDiM,
PaDiM*+PatchCore, CFLOW, SoftPatch-LOF / -nearest / -gaussian / -fusion.

Measured numbers below are from the PREVIOUS PROTOCOL (overlap cells only,
24 elpv / 12 synthetic cells; "without overlap" meant the column
image_auroc_excl_injected, the same models scored without the injected test
images, which equals the overlap=False cells of the same seed) and from the
in-sample Gaussian discriminator (SoftPatch-gaussian and -fusion change
since: denoise_gaussian.py). Not re-measured yet; expect about twice the
runtime (twice the cells).

Expected runtime (elpv, measured, previous protocol): 21 min on a 2-core CPU shared with other
jobs (load about 4; 30 min in an earlier run at load 4-9); 40-120 s per
cell (the first cells compile).

Expected result (elpv, measured, previous protocol; image AUROC, mean over mono + poly, mean
+- std over seeds 0-2; docs/results/table.md has every category):
  noise ratio          0            0.1          0.2          0.4
  PatchCore            0.891+-.011  0.853+-.014  0.791+-.013  0.717+-.030
  PaDiM                0.899+-.006  0.789+-.014  0.692+-.012  0.471+-.023
  PaDiM*+PatchCore     0.888+-.007  0.867+-.028  0.872+-.018  0.791+-.011
  CFLOW                0.627+-.016  0.579+-.009  0.544+-.010  0.526+-.014
  SoftPatch-LOF        0.850+-.009  0.836+-.006  0.836+-.014  0.834+-.016
  SoftPatch-nearest    0.873+-.010  0.876+-.002  0.856+-.032  0.825+-.008
  SoftPatch-gaussian   0.876+-.003  0.875+-.013  0.850+-.011  0.827+-.009
  SoftPatch-fusion     0.872+-.014  0.869+-.007  0.839+-.030  0.833+-.027
With overlap, PatchCore and PaDiM lose 0.17 and 0.43 from 0 to 40 % noise,
SoftPatch 0.02-0.05, and the PaDiM* filter holds PatchCore at 0.87 up to
20 %; without noise PatchCore and PaDiM are best and SoftPatch-LOF is 0.04
behind. Without overlap (then image_auroc_excl_injected) PaDiM leads or ties at
every ratio (0.87-0.90), PaDiM*+PatchCore from 20 % on, and SoftPatch trails
or ties PatchCore. CFLOW (3 epochs, 8 coupling blocks) is far behind at
this size: 0.35-0.50 on mono, 0.70-0.75 on poly (more epochs did not help
at 128 px; the defaults' docstring has 0.78-0.86 on mono at 224 px).

Synthetic (measured, previous protocol: 10.4 min, 12 cells): image AUROC saturates (1.000 for
SoftPatch and CFLOW at every ratio, PatchCore 0.974-0.979 and PaDiM
0.938 / 0.875 / 0.750 with noise); pixel AUROC at 0 / 0.1 / 0.2 / 0.4:
PatchCore 0.993 / 0.890 / 0.846 / 0.743, PaDiM 0.994 / 0.911 / 0.871 /
0.800, PaDiM*+PatchCore 0.993 / 0.993 / 0.952 / 0.838, CFLOW 0.998 at every
ratio, SoftPatch (every discriminator) 0.993-0.994 at every ratio.
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
