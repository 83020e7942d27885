r"""A quick self-contained run on procedurally generated textures.

Generates a small MVTec-layout folder under <workdir>/synthetic_data, injects
20 % anomalous images into training (overlap), and compares SoftPatch-LOF
with PatchCore using the offline EfficientNet-Lite0 ImageNet weights.

Command:
  python -m softpatch_jax.main --config=synthetic --workdir out/synth

Expected runtime: about 1 minute on a 2-core CPU.
Expected result: SoftPatch-LOF image AUROC above PatchCore's (PatchCore has
memorised the injected defects, which reappear in the test set).
"""

from softpatch_jax import defaults


def get_config():
  c = defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = 128
  c.data.crop = 128
  c.data.batch_size = 16
  c.data.synthetic.n_train = 30
  c.data.synthetic.n_test_good = 10
  c.data.synthetic.n_test_defect = 12
  c.data.synthetic.size = 128
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.2
  c.noise.overlap = True
  c.methods = "softpatch_lof,patchcore"
  c.output.num_heatmaps = 4
  return c
