"""The base ml_collections config that every file in configs/ starts from.

Defaults are the official SoftPatch code's, except where noted (README,
"Deliberate differences from the reference implementation").
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 'evaluate': fit + predict + metrics per category (labelled data);
  # 'fit': fit on an unlabelled folder and save a model (configs/fit_folder.py).
  c.mode = "evaluate"
  # Comma-separated list (or a list) of methods.METHODS keys.
  c.methods = "softpatch_lof,patchcore"
  # Multi-device runs (softpatch_jax/parallel.py): 'auto' splits every stage
  # over the visible devices when there are two or more, 'on' always runs the
  # sharded code (on one device too), 'off' never; the results are the same.
  # devices: the first N devices (0: all). data.batch_size is then per device.
  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = "auto"
  c.parallel.devices = 0
  # Multi-host jobs (a TPU pod slice): jax.distributed.initialize() first.
  c.distributed = False

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = "wide_resnet50_2"
  # 'imagenet' (downloads / package file), 'random', or a path to a .pth.
  c.backbone.weights = "imagenet"
  c.backbone.layers = ("layer2", "layer3")

  c.features = ml_collections.ConfigDict()
  c.features.patchsize = 3
  c.features.pretrain_embed_dim = 1024
  c.features.target_embed_dim = 1024

  c.denoise = ml_collections.ConfigDict()
  # The reference's --lof_k flag never reaches the model, which runs k=5;
  # we honour the flag's documented default of 6.
  c.denoise.lof_k = 6
  c.denoise.noise_fraction = 0.15
  # How method softpatch_fusion combines the LOF, nearest and Gaussian
  # scores: 'rank' | 'zscore' | 'vote' (denoise.fuse_scores).
  c.denoise.fusion = "rank"

  c.coreset = ml_collections.ConfigDict()
  c.coreset.fraction = 0.1
  # The reference's SoftPatch sampler passes 128 into this slot by accident;
  # 10 is the intended value.
  c.coreset.num_starts = 10
  c.coreset.projection_dim = 128
  # True reproduces the official SoftPatch code exactly: the coreset runs on
  # a second random projection, and its first pick ignores the noise weight
  # (so it can be a noise patch). Off: one projection, noise never kept.
  c.coreset.reference_quirks = False
  # 'auto' (default), 'dense' or 'pruned'. pruned: an exact greedy on the host
  # that updates only the points that can become the next pick
  # (kernels/kcenter_pruned.py; the float32 numpy greedy's picks), one device
  # only; auto runs it for eager CPU fits of >= 16384 patches, where it is
  # 3-20x faster (README, "Benchmarks"), and the dense kernel elsewhere.
  c.coreset.impl = "auto"

  c.scoring = ml_collections.ConfigDict()
  # None: the method's own choice (on for softpatch_*, off for patchcore*).
  c.scoring.soft_weight = ml_collections.config_dict.placeholder(bool)
  c.scoring.blur_sigma = 4.0
  # Scoring against a bank larger than this many MiB scans it in chunks
  # (same scores, bounded memory). 0 = no limit.
  c.scoring.memory_budget_mb = 1024.0
  # Nearest-neighbour search at test time: 'auto' runs the exact pruned host
  # search (kernels/knn_pruned.py; same nearest rows to float rounding, about
  # 3x faster than the dense product on CPU, README "Benchmarks") for banks
  # of >= 4096 rows on CPU, and the dense kNN elsewhere; 'dense' or 'pruned'
  # force one ('pruned' holds a copy of the bank in host memory).
  c.scoring.search = "auto"

  # Decision thresholds of a saved model (mode='fit'); see thresholds.py.
  c.threshold = ml_collections.ConfigDict()
  c.threshold.method = "quantile"  # 'quantile' | 'manual' | 'f1'
  c.threshold.quantile = 0.95  # of held-out training image scores
  c.threshold.pixel_quantile = ml_collections.config_dict.placeholder(float)
  c.threshold.folds = 5
  c.threshold.value = ml_collections.config_dict.placeholder(float)
  c.threshold.pixel_value = ml_collections.config_dict.placeholder(float)
  c.threshold.val_dir = ""  # labelled folder for 'f1'

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "mvtec"  # mvtec | btad | folder | elpv | synthetic
  c.data.root = ""
  # 'files': the folders under root. 'tfds': mvtec / btad from TFDS records in
  # tfds_dir ('' = TFDS's default), built once from root, the manual download
  # directory (data/tfds_source.py; needs the `tfds` extra).
  c.data.source = "files"
  c.data.tfds_dir = ""
  c.data.categories = ""  # comma-separated; empty = all found
  c.data.train_dir = ""  # dataset=folder
  c.data.test_dir = ""  # dataset=folder (optional)
  c.data.resize = 256
  # 0: whole-image mode, no crop; images keep their aspect ratio and the patch
  # grid follows it (all training images must share one shape).
  c.data.crop = 224
  # Bounds on one image (data/preprocess.py): pixels after resizing, and
  # long side / short side.
  c.data.max_pixels = 1 << 22
  c.data.max_aspect_ratio = 20.0
  c.data.batch_size = 16
  # Where a fit keeps its train features: 'memory', or 'disk' (an unlinked
  # temporary file in TMPDIR, read back in chunks; same results, about
  # N x P x D x 4 bytes less resident memory; softpatch_jax/feature_store.py).
  c.data.feature_store = "memory"
  c.data.num_workers = 4
  c.data.max_test = 0  # >0: seeded per-label subsample of the test set
  # >0: at most this many training images, capped before noise injection (so
  # the injected count follows it): the first N in sorted order for mvtec,
  # btad, folder and synthetic; for elpv a subset drawn with split_seed.
  c.data.max_train = 0  # 0 = all
  # elpv only.
  c.data.split_seed = 0
  c.data.test_normal_fraction = 0.2
  # synthetic only.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_train = 20
  c.data.synthetic.n_test_good = 8
  c.data.synthetic.n_test_defect = 8
  c.data.synthetic.size = 128
  c.data.synthetic.seed = 0

  # Noisy-training protocol (README, "The default job").
  c.noise = ml_collections.ConfigDict()
  c.noise.ratio = 0.1
  c.noise.overlap = True
  c.noise.seed = 0
  # Augment the injected copies (affine / rotation / noise / blur).
  c.noise.augment = False
  c.noise.augment_affine = True  # +-3 % translation
  c.noise.augment_rotate = True  # +-3 degrees
  c.noise.augment_noise = False  # Gaussian noise, std 0.02 of full range
  c.noise.augment_blur = False  # Gaussian blur, sigma 0.5-1.5 px
  c.noise.resample = False
  c.noise.source = "test"  # 'test' | 'uncertain' (elpv)
  # Which images are injected (data/noise.py): 'reference' =
  # random.Random(seed).sample over the anomalous test images in test-list
  # order, injected in draw order (the official code's draw when its global
  # random state is seeded with `seed`); 'stratified' = round-robin over the
  # defect types; 'numpy' = the sorted default_rng(seed) draw of earlier
  # versions.
  c.noise.draw = "reference"
  # Replaces the draw (and the count, even at ratio 0) with listed images, in
  # the order given: a comma list of test-relative paths
  # ('broken_large/000.png', optionally prefixed 'bottle/' or 'bottle/test/';
  # entries of other categories are skipped), or a file: one path per line
  # ('#' comments), or the official code's cached noise_index .pth file of
  # test-list positions (needs data.max_test=0). '{category}' in it is
  # replaced by the category. Listed images leave the test set without
  # overlap.
  c.noise.inject_list = ""

  # Baselines without a memory bank (methods 'padim', 'cflow') and the
  # PaDiM image filter of 'padim_filter+<method>' (softpatch_jax/baselines).
  c.baselines = ml_collections.ConfigDict()
  c.baselines.padim = ml_collections.ConfigDict()
  # Random channels of the concatenated layer1-3 maps (EfficientNet-Lite:
  # stage2/3/5), per backbone; 100 and 550 are the PaDiM paper's.
  c.baselines.padim.channels = ml_collections.ConfigDict(
      dict(
          resnet18=100,
          wide_resnet50_2=550,
          efficientnet_lite0=100,
          efficientnet_lite1=100,
          efficientnet_lite2=100,
      )
  )
  c.baselines.padim.eps = 0.01  # covariance + eps * I
  # PaDiM* (padim_filter+<method>): PaDiM on this backbone scores every
  # training image and the top filter_fraction is dropped. Without the
  # backbone's weights (no network, no local .pth given as filter_weights)
  # the configured backbone is used instead, with a warning.
  c.baselines.filter_fraction = 0.15
  # Each fold's images are scored by the Gaussians of the others (1: in
  # sample, which cannot tell images apart with fewer images than channels).
  c.baselines.filter_folds = 5
  c.baselines.filter_backbone = "resnet18"
  c.baselines.filter_weights = "imagenet"
  # CFLOW decoders (baselines/cflow.py): Adam on the NLL, epochs over all
  # training positions in batches of batch_positions. Cost measured on a
  # 2-core CPU, EfficientNet-Lite0 at 224 px, 132 ELPV cells (414k, 103k and
  # 26k positions at the three scales): about 35 s per epoch, 125-140 s per
  # category with these settings. Longer training helps: ELPV mono image
  # AUROC 0.78 / 0.85 / 0.86 after 2 / 3 / 6 epochs (lr 1e-3 / 3e-3 / 1e-3).
  c.baselines.cflow = ml_collections.ConfigDict()
  c.baselines.cflow.epochs = 3
  c.baselines.cflow.coupling_blocks = 8
  c.baselines.cflow.learning_rate = 3e-3
  c.baselines.cflow.condition_dim = 128
  c.baselines.cflow.batch_positions = 1024
  c.baselines.cflow.hidden_ratio = 2.0
  c.baselines.cflow.clamp = 1.9

  c.output = ml_collections.ConfigDict()
  c.output.num_heatmaps = 4
  return c


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
# Experiment configs (configs/experiments/, softpatch_jax/studies.py).

MVTEC_CATEGORIES = (
    "bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,"
    "screw,tile,toothbrush,transistor,wood,zipper"
)
# The paper's methods; padim_filter+patchcore is PaDiM*.
PAPER_METHODS = (
    "patchcore,padim,padim_filter+patchcore,cflow,softpatch_lof,"
    "softpatch_nearest,softpatch_gaussian,softpatch_fusion"
)


def study_base(variant: str) -> ml_collections.ConfigDict:
  """The pipeline config of an experiment on one data set.

  'elpv' and 'synthetic' run offline and are sized for a 2-core CPU: ELPV
  at 128 px (a 16x16 patch grid) with 40 normal training cells (a seeded
  subset) and about 50 test cells (seeded, label-stratified) per category;
  synthetic textures at 96 px with 30 training and 10 + 20 test images.
  'mvtec' and 'btad' are the paper's setting (WideResNet-50-2, layer2 +
  layer3, 256 -> 224 crop, every image) and need --config.base.data.root
  and, without a network, --config.base.backbone.weights=<.pth>.
  """
  if variant == "elpv":
    c = elpv_config()
    c.data.resize = c.data.crop = 128
    c.data.max_train = 40
    c.data.max_test = 50
  elif variant == "synthetic":
    c = base_config()
    c.data.dataset = "synthetic"
    c.data.categories = "synth"
    c.data.resize = c.data.crop = c.data.synthetic.size = 96
    c.data.synthetic.n_train = 30
    c.data.synthetic.n_test_good = 10
    c.data.synthetic.n_test_defect = 20
    c.backbone.name = "efficientnet_lite0"
    c.backbone.layers = ("stage3", "stage5")
  elif variant in ("mvtec", "btad"):
    c = base_config()
    c.data.dataset = variant
    c.data.categories = MVTEC_CATEGORIES if variant == "mvtec" else "01,02,03"
  else:
    raise ValueError(
        f"unknown experiment variant {variant!r}; choose from elpv, "
        "synthetic, mvtec, btad"
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
