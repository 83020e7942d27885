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

Expected runtime (measured, 2-core CPU shared with other jobs, load 1.5-2):
elpv 4.1 min (6 cells), synthetic 2.0 min (3 cells).

Expected result (measured with the previous table, whose fit_s left out the
PaDiM* filter (PaDiM*+PatchCore's fit below is the bank alone; the filter
adds a PaDiM pass over the training images) and with the in-sample Gaussian
discriminator; seconds per category, mean +- std over seeds 0-2; the large
stds are the first cell's compilation):
                      elpv (128 px, ~44 train / 50 test)   synthetic (96 px)
                      fit         predict   extract        fit
  PatchCore           1.0+-0.9    5.6       1.4            1.4+-2.2
  PaDiM               0.7+-0.0    3.4       0.5            0.6+-0.0
  PaDiM*+PatchCore    0.8+-0.7    5.6       1.4            1.1+-1.6
  CFLOW              10.7+-5.5    3.4       0.5            8.8+-9.0
  SoftPatch-LOF       0.8+-0.5    5.6       1.4            0.8+-1.3
  SoftPatch-nearest   0.7+-0.1    5.6       1.4            0.4+-0.1
  SoftPatch-gaussian  1.2+-0.1    5.6       1.4            0.9+-0.3
  SoftPatch-fusion    1.6+-0.3    5.6       1.4            1.4+-0.7
predict_s and extract_s are shared: one test pass scores every memory bank
(PatchCore, PaDiM*+PatchCore, SoftPatch), another serves PaDiM and CFLOW.
At this size denoising costs no more than the coreset (SoftPatch-LOF /
-nearest fit as fast as PatchCore; the fusion of all three adds under a
second), and CFLOW's training is the costliest fit by 10x. Image AUROC as in
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
      "fit_s,filter_s,predict_s,extract_s,image_auroc",
  )
  return c
