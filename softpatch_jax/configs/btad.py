r"""SoftPatch-LOF vs PatchCore on BTAD (categories 01, 02, 03).

Command:
  python -m softpatch_jax.main --config=btad \
      --config.data.root=/path/to/BTAD --workdir out/btad

Expected runtime: a few minutes per category on one GPU; tens of minutes per
category on a 2-core CPU.
Expected result (seed paper, overlap, 10 % noise): SoftPatch image AUROC
about 0.93 mean, pixel AUROC about 0.97.
"""

from softpatch_jax import defaults


def get_config():
  c = defaults.base_config()
  c.data.dataset = "btad"
  c.backbone.name = "wide_resnet50_2"
  c.methods = "softpatch_lof,patchcore"
  return c
