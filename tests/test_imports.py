"""The package's shape: every module imports, no cycles, the core never
imports the edge, the config stops at the edge, no private names across
modules, one scoring call site, short files and functions."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The pure, jittable core and the kernels it runs on.
CORE = {
    "softpatch_jax.settings",
    "softpatch_jax.registry",
    "softpatch_jax.banks",
    "softpatch_jax.pixel_maps",
    "softpatch_jax.torch_pickle",  # numpy only: the backbones' .pth reader
    "softpatch_jax.torch_unpickle",
    "softpatch_jax.features",
    "softpatch_jax.denoise",
    "softpatch_jax.denoise_gaussian",
    "softpatch_jax.mutual",
    "softpatch_jax.consensus",
    "softpatch_jax.coreset",
    "softpatch_jax.methods",
    "softpatch_jax.scoring",
    "softpatch_jax.metrics",
    "softpatch_jax.thresholds",
    "softpatch_jax.validation",
    "softpatch_jax.feature_store",  # where train features live; read by the core
    "softpatch_jax.parallel",
    "softpatch_jax.baselines",
    "softpatch_jax.baselines.padim",
    "softpatch_jax.baselines.cflow",
    "softpatch_jax.baselines.options",
}
CORE_PACKAGES = ("softpatch_jax.backbones", "softpatch_jax.kernels")
# The edge: the config, flags, files, printing, PNGs. Nothing below imports
# them, and only they import ml_collections or receive a ConfigDict.
EDGE = {
    "softpatch_jax.options",
    "softpatch_jax.defaults",
    "softpatch_jax.main",
    "softpatch_jax.evaluate",
    "softpatch_jax.experiments",
    "softpatch_jax.studies",
    "softpatch_jax.study_tables",
    "softpatch_jax.fit",
    "softpatch_jax.predict",
    "softpatch_jax.predict_files",
    "softpatch_jax.figures",
    "softpatch_jax.reports",
    "softpatch_jax.compile_cache",
    "softpatch_jax.cli",
    "softpatch_jax.cli_flags",
    "softpatch_jax.export",
}
MAX_LINES = 420
# A function a reader can hold in their head (README, "Layout").
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
# Pallas kernel bodies take one parameter per operand ref: pallas_call
# fixes their signature.
KERNEL_BODIES = {
    "softpatch_jax.kernels.knn_pallas:_triton_kernel",
    "softpatch_jax.kernels.knn_pallas:_tpu_kernel",
}


def _modules():
  """{module name: path} of the installed package, kernels included."""
  out = {}
  for path in sorted((ROOT / "softpatch_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  for path in sorted((ROOT / "kernels").glob("*.py")):
    name = "softpatch_jax.kernels"
    if path.stem != "__init__":
      name += "." + path.stem
    out[name] = path
  return out


MODULES = _modules()
# The shipped config files build ConfigDicts: they are the edge too.
EDGE |= {n for n in MODULES if n.startswith("softpatch_jax.configs")}


def _is_core(name):
  return name in CORE or name.startswith(CORE_PACKAGES)


def _imports(name, path):
  """Package modules imported by `name`, and any imports inside functions."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found, nested = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      targets = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    for t in targets:
      while t and t not in MODULES:
        t = t.rpartition(".")[0]
      if t and t != name:
        found.add(t)
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          nested.append(f"{path.name}:{node.lineno}")
  return found, nested


GRAPH = {n: _imports(n, p) for n, p in MODULES.items()}


_IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
  for key in [k for k in sys.modules if k.startswith("softpatch_jax")]:
    del sys.modules[key]
  importlib.import_module(name)
"""


def test_every_module_imports_on_its_own():
  # One interpreter; the package is dropped from sys.modules before each
  # module, so each one is imported from scratch (third-party modules stay
  # loaded, which saves a jax import per module).
  subprocess.run(
      [sys.executable, "-c", _IMPORT_EACH, *sorted(MODULES)],
      check=True,
      cwd=os.path.dirname(ROOT),
  )


def test_no_import_cycles():
  state = {}

  def visit(n, stack):
    state[n] = "open"
    for m in sorted(GRAPH[n][0]):
      # A package's __init__ importing its own submodules is not a cycle.
      if n.startswith(m + "."):
        continue
      if state.get(m) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack + [n, m]))
      if m not in state:
        visit(m, stack + [n])
    state[n] = "done"

  for n in sorted(GRAPH):
    if n not in state:
      visit(n, [])


def test_core_never_imports_edge_or_middle():
  for name, (deps, _) in GRAPH.items():
    if _is_core(name):
      bad = sorted(d for d in deps if not _is_core(d) and d != "softpatch_jax")
      assert not bad, f"core module {name} imports {bad}"


def test_nothing_below_the_edge_imports_it():
  for name, (deps, _) in GRAPH.items():
    if name in EDGE:
      continue
    bad = sorted(deps & EDGE)
    assert not bad, f"{name} imports edge modules {bad}"
  assert not any("softpatch_jax.main" in deps for n, (deps, _) in GRAPH.items())


def test_no_function_level_imports():
  nested = {n: v for n, (_, v) in GRAPH.items() if v}
  assert not nested, nested


def test_one_scoring_call_site_of_the_nearest_neighbour_kernel():
  calls = []
  for name, path in MODULES.items():
    if name.startswith("softpatch_jax.kernels"):
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if (
          isinstance(node, ast.Call)
          and isinstance(node.func, ast.Attribute)
          and node.func.attr == "knn"
      ):
        calls.append(f"{name}:{node.lineno}")
  assert len(calls) == 1 and calls[0].startswith(
      "softpatch_jax.scoring:"
  ), calls


def test_library_files_are_short():
  long = {
      n: len(p.read_text(encoding="utf-8").splitlines())
      for n, p in MODULES.items()
  }
  long = {n: k for n, k in long.items() if k > MAX_LINES}
  assert not long, long


def test_only_the_edge_imports_ml_collections():
  bad = []
  for name, path in MODULES.items():
    if name in EDGE:
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      if any(n.split(".")[0] == "ml_collections" for n in names):
        bad.append(name)
  assert not bad, f"below the edge, these import ml_collections: {bad}"


def _private_uses(name, path):
  """`module._name` uses and `from module import _name` of other modules."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  aliases, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      for a in node.names:
        full = f"{base}.{a.name}"
        if full in MODULES:
          aliases[a.asname or a.name] = full
          if a.name.startswith("_") and base != package:
            found.append(f"from {base} import {a.name}")
        elif base in MODULES and a.name.startswith("_"):
          found.append(f"from {base} import {a.name}")
  for node in ast.walk(tree):
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ):
      found.append(f"{aliases[node.value.id]}.{node.attr}")
  return found


def test_no_private_name_is_used_across_modules():
  # A package may import its own private submodules (backbones._convert);
  # no module reaches for another module's private functions or values.
  bad = {}
  for name, path in MODULES.items():
    uses = _private_uses(name, path)
    if uses:
      bad[name] = sorted(set(uses))
  assert not bad, bad


def _functions():
  for name, path in MODULES.items():
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        n = len(params) + (a.vararg is not None) + (a.kwarg is not None)
        if params and params[0].arg in ("self", "cls"):
          n -= 1
        lines = node.end_lineno - node.lineno + 1
        yield f"{name}:{node.name}", lines, n


def test_library_functions_are_short():
  long = {f: n for f, n, _ in _functions() if n > MAX_FUNCTION_LINES}
  assert not long, long


def test_library_functions_take_few_parameters():
  many = {
      f: n
      for f, _, n in _functions()
      if n > MAX_PARAMETERS and f not in KERNEL_BODIES
  }
  assert not many, many
