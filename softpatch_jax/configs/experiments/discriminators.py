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

Measured numbers below are from the PREVIOUS PROTOCOL (overlap cells only;
the no-overlap columns were image_auroc_excl_injected, the same models
scored without the injected test images, which equals the overlap=False
cells of the same seed) and from the in-sample Gaussian discriminator (the
Gaussian and fusion rows change since: denoise_gaussian.py). Not
re-measured yet; expect about twice the runtime (twice the cells).

Expected runtime (measured on a 2-core CPU shared with other jobs, load
about 7; previous protocol): elpv 20 min (18 cells), synthetic 8.5 min (9
cells).

Expected result, elpv (image AUROC, mean over mono + poly, mean +- std over
seeds 0-2; measured, previous protocol):
                        overlap                  no overlap (excl. injected)
  noise ratio           0.1    0.2    0.4        0.1    0.2    0.4
  PatchCore             0.853  0.791  0.717      0.892  0.874  0.842
  SoftPatch-LOF         0.836  0.836  0.834      0.835  0.847  0.831
  SoftPatch-nearest     0.876  0.856  0.825      0.878  0.865  0.830
  SoftPatch-gaussian    0.875  0.850  0.827      0.877  0.854  0.840
  fusion rank           0.869  0.839  0.833      0.868  0.850  0.840
  fusion zscore         0.859  0.846  0.820      0.861  0.855  0.819
  fusion vote           0.859  0.842  0.837      0.858  0.852  0.845
Stds are 0.002-0.06. Every denoiser beats PatchCore with overlap from 20 %
noise on; without overlap PatchCore is best at 10-20 % and the denoisers
only tie it at 40 %. Fusion lands between its members: it beats LOF and the
z-score fusion, not nearest or Gaussian, and 'vote' is best only at 40 %
(within the std). On synthetic textures every denoiser scores image AUROC
1.000 and pixel AUROC 0.992-0.994 at every ratio (PatchCore 0.979 / 0.978 /
0.974 image, 0.890 / 0.846 / 0.743 pixel): too easy to rank them.
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
