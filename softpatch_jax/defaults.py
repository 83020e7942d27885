"""The base ml_collections config every packaged config (configs/) starts from.

Defaults are the official SoftPatch code's, except where noted (README,
"Deliberate differences from the reference implementation"). They are the
stage records' defaults (`softpatch_jax.options`).
"""

import ml_collections

from softpatch_jax import options


def base_config() -> ml_collections.ConfigDict:
  """Every setting at its default: one group per stage record.

  The defaults and their documentation live beside each stage, in its
  options record (`softpatch_jax.options.RunOptions` lists them).
  """
  return options.to_config()


def elpv_config() -> ml_collections.ConfigDict:
  """ELPV solar cells with the offline EfficientNet-Lite0 weights.

  Shared by configs/elpv.py (the whole split) and configs/default.py (a
  subsample that fits a few minutes on a laptop CPU).
  """
  c = base_config()
  c.data.dataset = "elpv"
  c.data.categories = "mono,poly"
  # The cells are square 300 px images: resize straight to 224 (no crop), so
  # defects at the cell border stay in view.
  c.data.resize = 224
  c.data.crop = 224
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")  # the layer2/layer3 analogues
  c.noise.ratio = 0.1
  c.noise.overlap = True
  c.methods = "softpatch_lof,patchcore"
  return c


# --------------------------------------------------------------------------
# Experiment configs (softpatch_jax/configs/experiments/, studies.py).

MVTEC_CATEGORIES = (
    "bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,"
    "screw,tile,toothbrush,transistor,wood,zipper"
)
# The paper's methods; padim_filter+patchcore is PaDiM*.
PAPER_METHODS = (
    "patchcore,padim,padim_filter+patchcore,cflow,softpatch_lof,"
    "softpatch_nearest,softpatch_gaussian,softpatch_fusion"
)

# The noise-sweep's methods: the paper's baselines, SoftPatch-LOF, and the
# candidates of this project for heavy noise (README, "Robust methods").
SWEEP_METHODS = (
    "patchcore,padim,padim_filter+patchcore,cflow,softpatch_lof,"
    "softpatch_mutual,consensus"
)
# The method the README recommends for noisy training data (README,
# "Robust methods"): consensus nearest neighbours.
best_robust_method = "consensus"


def study_base(variant: str) -> ml_collections.ConfigDict:
  """The pipeline config of an experiment on one data set.

  'elpv' and 'synthetic' run offline and are sized for a 2-core CPU: ELPV
  at 128 px (a 16x16 patch grid) with 40 normal training cells (a seeded
  subset) and about 50 test cells (seeded, label-stratified) per category;
  synthetic textures at 96 px with 30 training and 10 + 20 test images.
  'synthetic_hard' is 'synthetic' with faint, small defects and more varied
  normal textures (data.synthetic.difficulty 0.8), where image AUROC does
  not saturate: clean PatchCore 0.935, pixel AUROC 0.952 (data seed 0).
  'mvtec' and 'btad' are the paper's setting (WideResNet-50-2, layer2 +
  layer3, 256 -> 224 crop, every image) and need --config.base.data.root
  and, without a network, --config.base.backbone.weights=<.pth>.
  """
  if variant == "elpv":
    c = elpv_config()
    c.data.resize = c.data.crop = 128
    c.data.max_train = 40
    c.data.max_test = 50
  elif variant in ("synthetic", "synthetic_hard"):
    c = base_config()
    c.data.dataset = "synthetic"
    c.data.categories = "synth"
    c.data.resize = c.data.crop = c.data.synthetic.size = 96
    c.data.synthetic.n_train = 30
    c.data.synthetic.n_test_good = 10
    c.data.synthetic.n_test_defect = 20
    c.backbone.name = "efficientnet_lite0"
    c.backbone.layers = ("stage3", "stage5")
    if variant == "synthetic_hard":
      c.data.synthetic.difficulty = 0.8
  elif variant in ("mvtec", "btad"):
    c = base_config()
    c.data.dataset = variant
    c.data.categories = MVTEC_CATEGORIES if variant == "mvtec" else "01,02,03"
  else:
    raise ValueError(
        f"unknown experiment variant {variant!r}; choose from elpv, "
        "synthetic, synthetic_hard, mvtec, btad"
    )
  c.data.num_workers = 2
  c.output.num_heatmaps = 0  # per-cell heatmaps cost a test pass each
  c.methods = PAPER_METHODS
  return c


def experiment_config(
    base: ml_collections.ConfigDict,
    axes: str,
    title: str,
    metrics: str = "image_auroc",
) -> ml_collections.ConfigDict:
  """An experiment config: `base` plus a study (softpatch_jax/studies.py).

  Presets start empty; figures and the diagnosis of the noisiest cell are
  on.
  """
  c = ml_collections.ConfigDict()
  c.base = base
  c.study = ml_collections.ConfigDict()
  c.study.title = title
  c.study.axes = axes
  # Axes averaged in the tables; unset: 'seed' when that is an axis.
  c.study.repeat = ml_collections.config_dict.placeholder(str)
  c.study.metrics = metrics
  c.study.presets = ml_collections.ConfigDict()
  c.study.figures = True
  c.study.diagnose = "auto"
  return c
