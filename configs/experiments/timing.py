r"""The timing table: feature extraction, fitting and test time per method.

SoftPatch (Jiang et al., NeurIPS 2022, Table 8) reports the training and
inference cost of denoising. Timings are per category and cell, in seconds:
extract_s (training features, shared by the memory-bank methods), fit_s
(denoising + coreset, or PaDiM's Gaussians, or CFLOW's training) and
predict_s (test features + scoring, shared by the memory-bank methods).
Timings depend on the machine and on what else runs on it; first cells
include JIT compilation. 10 % noise, overlap.

Variants: elpv (default), synthetic, mvtec, btad (as in noise_sweep.py).

Commands:
  python -m softpatch_jax.experiments \
      --config configs/experiments/timing.py --workdir out/timing
  python -m softpatch_jax.experiments \
      --config configs/experiments/timing.py:synthetic \
      --workdir out/timing_synth

Expected runtime (measured, 2-core CPU shared with other jobs, load 2-4):
elpv 5.7 min (6 cells), synthetic 3.0 min (3 cells).

Expected result (measured, seconds per category, mean +- std over seeds
0-2; the large stds are the first cell's compilation):
                      elpv (128 px, ~44 train / 50 test)   synthetic (96 px)
                      fit         predict   extract        fit
  PatchCore           1.7+-1.4    9.4       1.9            2.5+-4.0
  PaDiM               0.8+-0.1    5.1       0.7            1.0+-0.2
  PaDiM*+PatchCore    1.1+-0.8    9.4       1.9            2.0+-3.2
  CFLOW              12.5+-4.2    5.1       0.7           14.7+-16.1
  SoftPatch-LOF       1.6+-0.9    9.4       1.9            1.9+-2.7
  SoftPatch-nearest   1.2+-0.2    9.4       1.9            0.8+-0.3
  SoftPatch-gaussian  3.2+-0.9    9.4       1.9            1.3+-0.1
  SoftPatch-fusion    4.0+-0.1    9.4       1.9            2.7+-1.6
predict_s and extract_s are shared: one test pass scores every memory bank
(PatchCore, PaDiM*+PatchCore, SoftPatch), another serves PaDiM and CFLOW.
Denoising costs about as much as the coreset here (SoftPatch-LOF /
-nearest fit as fast as PatchCore; the Gaussian and the fusion of all three
add 2-3 s); CFLOW's training is the costliest fit. Image AUROC as in
noise_sweep.py at 0.1.
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
      "fit_s,predict_s,extract_s,image_auroc",
  )
  return c
