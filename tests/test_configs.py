"""Every packaged config loads, names known methods, and documents itself."""

import glob
import importlib.util
import os

import pytest

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import methods

CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(cli_flags.CONFIG_DIR, "*.py"))
    if not p.endswith("__init__.py")
)


def _load(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_all_target_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {"default", "mvtec", "btad", "elpv", "fit_folder"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_documents_itself(path):
  mod = _load(path)
  doc = mod.__doc__ or ""
  assert "python -m softpatch_jax" in doc, "docstring must give the command"
  assert "xpected" in doc, "docstring must give expected runtime/result"
  c = mod.get_config()
  methods.parse_methods(c.methods)
  assert c.backbone.name in backbones.list_backbones()
  assert c.mode in ("evaluate", "fit")
  assert 0 < c.coreset.fraction <= 1
