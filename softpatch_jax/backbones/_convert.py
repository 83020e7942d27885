"""torch state dict (numpy) -> Flax variables, shared by every backbone.

Each Flax leaf is mapped to one torch key:

* module path: each Flax submodule name is turned into its torch name by a
  per-model function (e.g. ``layer1_0`` -> ``layer1.0``), joined with dots;
* leaf: conv/dense ``kernel`` <- ``weight`` (OIHW -> HWIO, or (out,in) ->
  (in,out)), ``bias`` <- ``bias``, BatchNorm ``scale`` <- ``weight`` and
  ``batch_stats`` ``mean``/``var`` <- ``running_mean``/``running_var``.

Every expected leaf must be found with the right shape and every torch key
must be used (``num_batches_tracked`` is ignored); otherwise one ValueError
lists all missing / unexpected keys and shape mismatches. `check_fit` does
that check from shapes alone, and `expected_torch_shapes` gives the torch
shapes up front, so a loader can refuse a misshaped file before reading it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _flax_axes(ndim: int, leaf: str) -> tuple[int, ...] | None:
  """Axis order taking a torch array to Flax layout; None: unchanged."""
  if leaf != "kernel":
    return None
  if ndim == 4:  # conv OIHW -> HWIO (depthwise: (C,1,kh,kw) -> (kh,kw,1,C))
    return (2, 3, 1, 0)
  if ndim == 2:  # linear (out, in) -> (in, out)
    return (1, 0)
  return None


def _to_flax_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
  axes = _flax_axes(arr.ndim, leaf)
  return arr if axes is None else arr.transpose(axes)


def _flax_shape(torch_shape, leaf: str) -> tuple[int, ...]:
  axes = _flax_axes(len(torch_shape), leaf)
  shape = tuple(torch_shape)
  return shape if axes is None else tuple(shape[a] for a in axes)


def _torch_keys(expected_shapes, module_name_to_torch) -> dict:
  """{Flax leaf path: (torch key, Flax shape)} for every expected leaf."""
  out = {}
  for path, spec in traverse_util.flatten_dict(dict(expected_shapes)).items():
    collection, *modules, leaf = path
    key_leaf = _LEAF_TO_TORCH.get((collection, leaf))
    if key_leaf is None:
      raise ValueError(
          f"no torch equivalent for Flax variable {'/'.join(path)}"
      )
    key = ".".join([module_name_to_torch(m) for m in modules] + [key_leaf])
    out[path] = key, tuple(spec.shape)
  return out


def expected_torch_shapes(
    expected_shapes, module_name_to_torch: Callable[[str], str]
) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} a state dict needs to fill ``expected_shapes``."""
  out = {}
  for path, (key, shape) in _torch_keys(
      expected_shapes, module_name_to_torch
  ).items():
    axes = _flax_axes(len(shape), path[-1])
    torch_shape = list(shape)
    for i, a in enumerate(axes or ()):
      torch_shape[a] = shape[i]
    out[key] = tuple(torch_shape)
  return out


def check_fit(
    expected_shapes,
    file_shapes: Mapping[str, tuple[int, ...]],
    module_name_to_torch: Callable[[str], str],
    source: str = "state dict",
) -> None:
  """Raise one ValueError listing every missing, unexpected or misshaped key.

  file_shapes: ``{torch key: shape}`` of the state dict's tensors.
  """
  used: set[str] = set()
  missing, mismatched = [], []
  for path, (key, shape) in _torch_keys(
      expected_shapes, module_name_to_torch
  ).items():
    if key not in file_shapes:
      missing.append(key)
      continue
    used.add(key)
    got = tuple(file_shapes[key])
    if _flax_shape(got, path[-1]) != shape:
      mismatched.append(
          f"{key}: file {got} -> {_flax_shape(got, path[-1])}, "
          f"model expects {shape}"
      )
  unexpected = sorted(
      k
      for k in file_shapes
      if k not in used and not k.endswith(_IGNORED_SUFFIXES)
  )
  if missing or unexpected or mismatched:
    parts = [
        _listing(what, items)
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    hint = ""
    if len(missing) + len(mismatched) > len(used) // 2:
      hint = " (is it the weights of another architecture?)"
    raise ValueError(
        f"{source}: weights do not fit the model{hint}; " + "; ".join(parts)
    )


# How many of each kind of misfit a weights error names (then a count).
MAX_LISTED = 5


def _listing(what: str, items) -> str:
  shown = ", ".join(items[:MAX_LISTED])
  more = len(items) - MAX_LISTED
  return f"{what} ({len(items)}): {shown}" + (
      f", ... and {more} more" if more > 0 else ""
  )


def torch_to_flax(
    expected_shapes,
    state_dict: Mapping[str, np.ndarray],
    module_name_to_torch: Callable[[str], str],
    source: str = "state dict",
):
  """Build Flax variables matching ``expected_shapes`` from ``state_dict``.

  expected_shapes: pytree of objects with ``.shape`` (e.g. the output of
  ``jax.eval_shape(module.init, ...)``). source: names the file in errors.
  """
  check_fit(
      expected_shapes,
      {k: np.shape(v) for k, v in state_dict.items()},
      module_name_to_torch,
      source,
  )
  out = {
      path: np.ascontiguousarray(
          _to_flax_layout(np.asarray(state_dict[key]), path[-1]),
          dtype=np.float32,
      )
      for path, (key, _) in _torch_keys(
          expected_shapes, module_name_to_torch
      ).items()
  }
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------ random weights

_CHUNK = 1 << 20
# std of a unit normal truncated to [-2, 2]; flax's lecun_normal divides by it.
_TRUNC_STD = 0.87962566103423978


@jax.jit
def _truncated_chunk(key):
  return jax.random.truncated_normal(
      key, -2.0, 2.0, (_CHUNK,), jax.numpy.float32
  )


def random_variables(expected_shapes, seed: int):
  """Flax-default initialisation from ``jax.random.PRNGKey(seed)``, cheaply.

  Same distributions as ``module.init`` with Flax's default initialisers
  (kernels lecun_normal: truncated normal, std sqrt(1/fan_in); biases 0; BN
  scale 1, running mean 0, running var 1), but drawn as one stream of
  fixed-size chunks so only one small RNG kernel is ever compiled -- jitting
  ``module.init`` compiles one RNG per parameter, which takes tens of
  seconds on CPU for these networks.
  """
  flat = traverse_util.flatten_dict(dict(expected_shapes))
  kernels = [p for p in flat if p[0] == "params" and p[-1] == "kernel"]
  total = sum(int(np.prod(flat[p].shape)) for p in kernels)
  key = jax.random.PRNGKey(seed)
  stream = np.concatenate(
      [
          np.asarray(_truncated_chunk(jax.random.fold_in(key, i)))
          for i in range(-(-total // _CHUNK))
      ]
      or [np.zeros(0, np.float32)]
  )
  out, pos = {}, 0
  for path, spec in flat.items():
    shape = tuple(spec.shape)
    if path in kernels:
      n = int(np.prod(shape))
      fan_in = int(np.prod(shape[:-1]))  # HWI of HWIO, or `in` of a Dense
      std = np.float32(np.sqrt(1.0 / fan_in) / _TRUNC_STD)
      out[path] = stream[pos : pos + n].reshape(shape) * std
      pos += n
    elif path[-1] in ("scale", "var"):
      out[path] = np.ones(shape, np.float32)
    else:  # bias, mean
      out[path] = np.zeros(shape, np.float32)
  return traverse_util.unflatten_dict(out)
