r"""The timing table: feature extraction, fitting and test time per method.

SoftPatch (Jiang et al., NeurIPS 2022, Table 8) reports the training and
inference cost of denoising. Timings are per category and cell, in seconds:
extract_s (training features, shared by the memory-bank methods), fit_s
(denoising + coreset, or PaDiM's Gaussians, or CFLOW's training; for
PaDiM*+<method> also the PaDiM* image filter, whose part is filter_s) and
predict_s (test features + scoring, shared by the memory-bank methods).
The cross-category rows are 'mean per category' and 'total' (the sum over
the categories of a run), each mean +- std over the seeds. Timings depend
on the machine and on what else runs on it; first cells include JIT
compilation. 10 % noise, overlap. Axes: seed=0,1,2 (6 elpv cells, 3
synthetic).

Variants: elpv (default), synthetic, mvtec, btad (as in noise_sweep.py).

Commands:
  python -m softpatch_jax.experiments \
      --config=experiments/timing --workdir out/timing
  python -m softpatch_jax.experiments \
      --config=experiments/timing:synthetic \
      --workdir out/timing_synth

Expected runtime (measured, 2-core x86-64 CPU, quiet): elpv 5 min (6
cells; CFLOW's training is most of it).

Expected result (elpv, measured; seconds per category, mean +- std over
seeds 0-2; the large stds are the first cell's compilation):
                      fit         filter    predict   extract   image AUROC
  PatchCore           0.49+-0.36  -         3.56      0.47      0.853
  PaDiM               0.31+-0.01  -         3.56      0.25      0.789
  PaDiM*+PatchCore    2.80+-0.97  2.42      3.56      0.47      0.867
  CFLOW              17.98+-2.50  -         3.56      0.25      0.809
  SoftPatch-LOF       0.50+-0.32  -         3.56      0.47      0.836
  SoftPatch-nearest   0.38+-0.04  -         3.56      0.47      0.876
  SoftPatch-gaussian  0.62+-0.02  -         3.56      0.47      0.874
  SoftPatch-fusion    0.79+-0.16  -         3.56      0.47      0.861
The 'total (2 categories)' rows of table.md double these. predict_s and
extract_s are shared: one test pass scores every model, so predict_s is the
same for all; extract_s is the training-feature pass (memory banks) or the
tap-map pass (PaDiM, CFLOW). PaDiM*'s filter (a PaDiM fit per fold) costs
4-5x the bank it filters for. CFLOW's training (at least 200 Adam steps per
scale) is the costliest fit by 20x or more.

Test time of consensus scoring, which compares every test patch with every
training patch, measured alone (--config.base.methods=consensus, then
=patchcore; --config.study.axes="seed=0,1"): predict_s 2.83+-0.07 s per
category against 0.79+-0.08 s for PatchCore's 10 % coreset; its fit is
free (no coreset).
"""

from softpatch_jax import defaults


def get_config(variant="elpv"):
  base = defaults.study_base(variant)
  base.noise.ratio = 0.1
  base.noise.overlap = True
  c = defaults.experiment_config(
      base,
      "seed=0,1,2",
      f"Timing, seconds per category ({variant})",
      "fit_s,filter_s,predict_s,extract_s,image_auroc",
  )
  return c
