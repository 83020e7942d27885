r"""SoftPatch-LOF vs PatchCore on MVTec AD with 10 % injected anomalies.

The seed paper's main setting (WideResNet-50-2, layer2+layer3, 224 crop,
10 % coreset, LOF k=6, 15 % of patches dropped as noise, overlap protocol).

Command:
  python -m softpatch_jax.main --config=mvtec \
      --config.data.root=/path/to/mvtec_anomaly_detection --workdir out/mvtec
  (one category: --config.data.categories=bottle; no-overlap:
   --config.noise.overlap=False; other methods:
   --config.methods=softpatch_lof,softpatch_gaussian,patchcore,patchcore_random)

Weights: --config.backbone.weights=/path/to/wide_resnet50_2-95faca4d.pth, or
'imagenet' to download torchvision's file when a network exists.

Expected runtime: a few minutes per category on one GPU; roughly 15-40 min
per category on a 2-core CPU (feature extraction dominates).
Expected result (seed paper, overlap, 10 % noise): SoftPatch image AUROC
about 0.99 mean over the 15 categories, several points above PatchCore.
"""

from softpatch_jax import defaults


def get_config():
  c = defaults.base_config()
  c.data.dataset = "mvtec"
  c.backbone.name = "wide_resnet50_2"
  c.backbone.layers = ("layer2", "layer3")
  c.methods = "softpatch_lof,patchcore"
  return c
