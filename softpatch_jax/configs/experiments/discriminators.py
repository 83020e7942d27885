r"""Noise discriminators compared: LOF, nearest, Gaussian and their fusions.

SoftPatch (Jiang et al., NeurIPS 2022, Table 3) compares its three patch
outlier scores. The fusion methods combine the three after normalising each
over all training patches (denoise.fuse_scores): 'rank' (mean normalised
rank), 'zscore' (normal CDF of the mean robust z-score) and 'vote' (each
score votes for its top 15 %, the mean rank breaks ties), in the spirit of
the multi-discriminator SoftPatch+ follow-up (Jiang et al., 2024), whose
code is not public. PatchCore is the undenoised reference.

Axes: noise.overlap=True,False (the protocol; "overlap" / "no overlap" in
the tables and trend.png) x noise.ratio=0.1,0.2,0.4 x seed=0,1,2. Cells:
elpv 36 (2 categories x 18 settings), synthetic 18.

Variants: elpv (default), synthetic, mvtec, btad (as in noise_sweep.py).

Commands:
  python -m softpatch_jax.experiments \
      --config=experiments/discriminators \
      --workdir out/discriminators
  python -m softpatch_jax.experiments \
      --config=experiments/discriminators:synthetic \
      --workdir out/discriminators_synth

Expected runtime (elpv, measured on a 2-core x86-64 CPU): 8 min (36
cells).

Expected result, elpv (image AUROC, mean over mono + poly, mean +- std over
seeds 0-2; measured with the leave-one-out Gaussian; docs/results/
discriminators/table.md):
                        overlap                  no overlap
  noise ratio           0.1    0.2    0.4        0.1    0.2    0.4
  PatchCore             0.853  0.791  0.717      0.892  0.874  0.842
  SoftPatch-LOF         0.836  0.836  0.834      0.835  0.847  0.831
  SoftPatch-nearest     0.876  0.856  0.825      0.878  0.865  0.830
  SoftPatch-gaussian    0.874  0.865  0.828      0.875  0.875  0.829
  fusion rank           0.861  0.863  0.842      0.860  0.873  0.847
  fusion zscore         0.852  0.851  0.844      0.853  0.863  0.858
  fusion vote           0.865  0.864  0.809      0.869  0.872  0.799
  SoftPatch-mutual      0.841  0.847  0.804      0.837  0.854  0.811
Stds are 0.002-0.05. Every denoiser beats PatchCore with overlap from 20 %
noise on; without overlap PatchCore is best at 10 % and the denoisers tie
it at 20-40 %. At 40 % the rank and z-score fusions lead the denoisers
(0.842-0.858), 'vote' falls behind; SoftPatch-mutual trails LOF on these
aligned cells. None reaches consensus scoring (noise_sweep.py: 0.865 /
0.854 at 40 %).
"""

from softpatch_jax import defaults

METHODS = (
    "patchcore,softpatch_lof,softpatch_nearest,softpatch_gaussian,"
    "softpatch_fusion_rank,softpatch_fusion_zscore,softpatch_fusion_vote,"
    "softpatch_mutual"
)


def get_config(variant="elpv"):
  base = defaults.study_base(variant)
  base.methods = METHODS
  # image_auroc_excl_injected is left out: the overlap=False cells are the
  # no-overlap result (results.csv still has the column).
  metrics = "image_auroc"
  if variant == "synthetic":
    base.data.synthetic.n_test_defect = 24  # 12 injected at 0.4
  if variant != "elpv":  # pixel labels: ELPV has none
    metrics = "image_auroc,pixel_auroc"
  return defaults.experiment_config(
      base,
      "noise.overlap=True,False;noise.ratio=0.1,0.2,0.4;seed=0,1,2",
      f"Noise discriminators ({variant})",
      metrics,
  )
