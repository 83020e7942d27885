"""Helpers shared by the test files (not a test module itself)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  """Loads configs/<name>.py the way the command line does and returns it."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def fit_config(train_dir, folds=3, **overrides):
  """configs/fit_folder.py shrunk for tests: 64 px, small batches.

  `overrides` use dotted keys given with '__' (e.g. threshold__method='f1'
  is not needed: pass {'threshold.method': 'f1'} via **{...}).
  """
  c = load_config("fit_folder")
  c.data.train_dir = str(train_dir)
  c.data.resize = c.data.crop = 64
  c.data.batch_size = 4
  c.data.num_workers = 1
  if folds is not None:
    c.threshold.folds = folds
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c
