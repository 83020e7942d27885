"""Baselines of the SoftPatch paper's tables (Jiang et al., NeurIPS 2022).

Pure functions over arrays:
- `padim`: PaDiM (Defard et al., ICPR 2021), a Gaussian per patch position
  over randomly selected channels of the layer1-3 maps, scored by the
  Mahalanobis distance.
- `cflow`: CFLOW-AD (Gudovskiy et al., WACV 2022), conditional normalizing
  flows with positional encoding on multi-scale features, trained with optax.

Over image streams, for the evaluate mode (method names 'padim', 'cflow' and
'padim_filter+<method>'; README, "Baselines"):
- `image_filter`: PaDiM* of the paper's tables, PaDiM scoring every training
  image and dropping the highest-scoring share before another method fits.
- `fitters`: the baseline fitters (PaDiM, CFLOW) over a training stream,
  whose models score test images in the one prediction loop (`inference`).
"""
