"""The config stops at the edge: a walk of one evaluate run.

Every Python call made while `evaluate.run` works on a tiny generated data
set is watched; a function that receives a ConfigDict (or one of its
groups) as an argument must live in an edge module (`test_imports.EDGE`).
The static half, that only the edge imports ml_collections, is in
tests/test_imports.py.
"""

import os
import sys

import ml_collections

import test_imports  # pylint: disable=g-bad-import-order
from softpatch_jax import defaults
from softpatch_jax import evaluate

PACKAGE = os.path.dirname(os.path.abspath(evaluate.__file__))
KERNELS = os.path.join(os.path.dirname(PACKAGE), "kernels")


def _module_of(path):
  """The dotted module name of a package file."""
  if path.startswith(KERNELS):
    rel = "kernels/" + os.path.relpath(path, KERNELS)
  else:
    rel = os.path.relpath(path, PACKAGE)
  parts = rel[: -len(".py")].split(os.sep)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(["softpatch_jax", *parts])


def _tiny_config():
  c = defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = c.data.crop = c.data.synthetic.size = 32
  c.data.batch_size = 4
  c.data.num_workers = 1
  c.data.synthetic.n_train = 4
  c.data.synthetic.n_test_good = 2
  c.data.synthetic.n_test_defect = 2
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.backbone.weights = "random"
  c.features.pretrain_embed_dim = c.features.target_embed_dim = 32
  c.noise.ratio = 0.5
  c.output.num_heatmaps = 1
  # Every kind of method: banks, both baselines and the image filter.
  c.methods = "softpatch_lof,patchcore,padim,cflow,padim_filter+patchcore"
  c.baselines.cflow.epochs = 1
  c.baselines.cflow.coupling_blocks = 1
  c.baselines.cflow.condition_dim = 8
  c.baselines.filter_folds = 2
  c.baselines.filter_weights = "random"
  return c


def walk(run, config, workdir):
  """[(module, function)] of every call that received a ConfigDict."""
  seen = []

  def profile(frame, event, arg):
    del arg
    code = frame.f_code
    if event != "call" or not code.co_filename.startswith((PACKAGE, KERNELS)):
      return
    n = code.co_argcount + code.co_kwonlyargcount
    for name in code.co_varnames[:n]:
      if isinstance(frame.f_locals.get(name), ml_collections.ConfigDict):
        seen.append((_module_of(code.co_filename), code.co_name))
        return

  sys.setprofile(profile)
  try:
    run(config, workdir)
  finally:
    sys.setprofile(None)
  return seen


def test_no_function_below_the_edge_receives_the_config(tmp_path):
  seen = walk(evaluate.run, _tiny_config(), str(tmp_path))
  assert ("softpatch_jax.evaluate", "run") in seen  # the walk saw the entry
  below = sorted({f"{m}:{f}" for m, f in seen if m not in test_imports.EDGE})
  assert not below, f"these receive a ConfigDict below the edge: {below}"
  assert (tmp_path / "results.csv").exists()
