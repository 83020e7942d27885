"""Multi-device (SPMD) versions of every stage, with `jax.shard_map`.
Each function splits one axis over a 1-d device mesh (axis "shards") and runs
the single-device computation on every slice, laid out so that the results
are the single-device results, bit for bit (README, "Scaling out"):

* features: data-parallel over images; each device embeds the batch one
  device would (another batch size could round the convolutions otherwise);
* discriminators (SoftPatch's per-position outlier scores, Jiang et al.,
  NeurIPS 2022): positions are independent and are dealt out in the blocks
  `denoise` batches them in, so no communication is needed; 'fusion' fuses
  its three sharded scores over all patches, as on one device;
* weighted greedy k-center: points split over devices; per pick a local
  argmax, then one all-gather of each device's (value, index, row) gives the
  global argmax, lowest global index on ties, and the picked point;
* kNN scoring: the bank split over devices in whole tiles of the
  single-device scan, a local top-1 per device, and a global merge (smallest
  distance, lowest global index on ties).
Inputs are concrete host arrays; every process of a multi-host job passes
the same ones and fills its own devices, and gets whole results back."""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from softpatch_jax import denoise
from softpatch_jax import features as features_lib
from softpatch_jax import settings
from softpatch_jax import validation
from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import kcenter as kcenter_lib
from softpatch_jax.kernels import kcenter_common
from softpatch_jax.kernels import kcenter_pallas
from softpatch_jax.kernels import knn as knn_lib

AXIS = "shards"
MODES = ("auto", "on", "off")
_BIG = np.iinfo(np.int32).max
# Coordinates of the bank's padding rows: their squared norm overflows to
# +inf (or ~D * 1e36), so they are never the nearest row of a real query.
_FAR = 1e18


# Meshes and data movement.


def make_mesh(n_devices: int = 0) -> Mesh:
  """A 1-d mesh over the first `n_devices` devices (0: all of them)."""
  devices = jax.devices()
  n = int(n_devices) or len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(
        f"parallel: {n_devices} devices requested, {len(devices)} visible"
    )
  return Mesh(np.array(devices[:n]), (AXIS,))


def resolve_mesh(mode: str = "auto", n_devices: int = 0) -> Optional[Mesh]:
  """The mesh of a parallel mode, or None for the single-device code: 'auto'
  a mesh when more than one device is visible, 'on' always a mesh (of one
  device too), 'off' None. `n_devices` (0: all) limits the mesh."""
  settings.check_choice(mode, "parallel.mode", MODES)
  mesh = None if mode == "off" else make_mesh(n_devices)
  return None if mode == "auto" and mesh.size < 2 else mesh


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
  """config.parallel: `resolve_mesh`'s mode and devices (same results)."""

  mode: str = "auto"
  devices: int = 0

  def __post_init__(self):
    settings.check_choice(self.mode, "parallel.mode", MODES)
    n = settings.check_int(self.devices, "parallel.devices", 0)
    settings.set_field(self, "devices", n)

  def mesh(self) -> Optional[Mesh]:
    return resolve_mesh(self.mode, self.devices)


def _host(x, what: str, dtype=None) -> np.ndarray:
  if not validation.is_concrete(x):
    raise ValueError(f"parallel.{what}: needs concrete arrays, not a tracer")
  return np.asarray(x, dtype)


def _put(x, mesh: Mesh, spec: P = P(), rows=None, fill=0) -> jax.Array:
  """A global array of host `x` (first axis padded to `rows` with `fill`);
  each process fills its own devices."""
  x = np.asarray(x)
  if rows is not None:
    x = np.concatenate(
        [x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)]
    )
  return jax.make_array_from_callback(
      x.shape, NamedSharding(mesh, spec), lambda idx: x[idx]
  )


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly sharded) global array, on every process."""
  if jax.process_count() > 1:  # the other processes' slices too
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _spmd(body, mesh: Mesh, in_specs, out_specs):
  # Results replicated by a collective (P() outputs) are the same on every
  # device by construction; shard_map's type check cannot see that.
  return jax.jit(
      jax.shard_map(
          body,
          mesh=mesh,
          in_specs=in_specs,
          out_specs=out_specs,
          check_vma=False,
      )
  )


# Arrays laid out on a mesh once and reused (a bank scored batch after
# batch, backbone weights): (id, mesh, layout) -> (source, its device copy).
_LAYOUTS = collections.OrderedDict()


def _layout(src, mesh: Mesh, layout, make: Callable):
  key = (id(src), mesh, layout)
  hit = _LAYOUTS.get(key)
  if hit is not None and hit[0] is src:
    _LAYOUTS.move_to_end(key)
    return hit[1]
  _LAYOUTS[key] = (src, make())
  while len(_LAYOUTS) > 8:
    _LAYOUTS.popitem(last=False)
  return _LAYOUTS[key][1]


# Features: data-parallel over images.


@functools.lru_cache(maxsize=16)
def _embed_fn(spec, mesh):
  body = lambda variables, x: features_lib.embed_jit(variables, x, spec)
  return _spmd(body, mesh, (P(), P(AXIS)), P(AXIS))


def embed(variables, images, spec, mesh: Optional[Mesh]) -> jax.Array:
  """`features.embed_jit` of (B, H, W, 3) images split evenly over devices.

  B must be a multiple of the mesh size; each device embeds B / n_devices
  images with the program one device runs on that batch. The weights are
  copied to every device once. Returns the (B, P, D) features. Without a
  mesh, this is `features.embed_jit` itself.
  """
  if mesh is None:
    return features_lib.embed_jit(variables, jnp.asarray(images), spec)
  images = _host(images, "embed", np.float32)
  if images.ndim != 4 or images.shape[0] % mesh.size:
    raise ValueError(
        f"parallel.embed: images {images.shape} must be (B, H, W, 3) with B "
        f"a multiple of the {mesh.size} devices"
    )
  put = functools.partial(jax.tree_util.tree_map, lambda a: _put(a, mesh))
  weights = _layout(variables, mesh, "all", lambda: put(variables))
  out = _embed_fn(spec, mesh)(weights, _put(images, mesh, P(AXIS)))
  return jnp.asarray(_to_host(out))


# Discriminators: sharded over patch positions.


def _position_block(name: str, p: int, n: int, d: int):
  """(positions per block, pad the last block) of one-device `denoise`.

  Positions are scored by batched programs over blocks; handing out the
  same blocks gives every position the program it gets on one device. LOF
  steps over 16 positions, zero-padding the last step (kernels/lof.py);
  'nearest' and 'gaussian' map over memory-bounded blocks plus a remainder.
  """
  if name == "lof":
    return min(16, p), True
  per_position = n * n if name == "nearest" else d * d + n * d
  return min(p, denoise.positions_per_block(per_position)), False


@functools.lru_cache(maxsize=32)
def _positions_fn(mesh, name, options, impl):
  del impl  # the kernel path (SOFTPATCH_JAX_IMPL) the trace takes: a key
  disc = functools.partial(denoise.DISCRIMINATORS.get(name), options=options)
  return _spmd(disc, mesh, P(AXIS), P(AXIS))


def _positionwise(x: np.ndarray, name: str, mesh: Mesh, options) -> np.ndarray:
  """(P, N, d) -> (P, N) scores of a per-position discriminator, sharded."""
  p, n, d = x.shape
  block, pad_last = _position_block(name, p, n, d)
  blocks = -(-p // block) if pad_last else p // block
  split = min(p, blocks * block)
  rows = -(-blocks // mesh.size) * block * mesh.size
  impl = dispatch.resolve_impl(None, name)
  fn = _positions_fn(mesh, name, options, impl)
  out = _to_host(fn(_put(x[:split], mesh, P(AXIS), rows)))[:split]
  if split == p:
    return out
  # One device maps the few positions after the whole blocks eagerly, op by
  # op; so does this, on the last block and them, on the default device.
  tail = denoise.DISCRIMINATORS.get(name)(
      jnp.asarray(x[split - block :]), options
  )
  return np.concatenate([out, np.asarray(tail)[block:]])


def patch_weights(
    projected, discriminator: str, options: denoise.DenoiseOptions, *, mesh
) -> jax.Array:
  """`denoise.patch_weights` with the patch positions split over devices.

  'lof', 'nearest', 'gaussian' and the 'fusion' variants run sharded, other
  registered discriminators on one device. Returns the (N, P) weights.
  """
  x = _host(projected, "patch_weights", np.float32)
  if x.ndim != 3 or x.shape[0] < 2 or min(x.shape) < 1:
    raise ValueError(
        "patch_weights: expected (N >= 2, P, d) features, got shape "
        f"{tuple(x.shape)}"
    )
  validation.check_finite(x, "patch_weights: projected features")
  xt = np.transpose(x, (1, 0, 2))  # (P, N, d)
  base = denoise.FUSED_DISCRIMINATORS  # 'lof', 'nearest', 'gaussian'
  # The base discriminators use lof_k only (one compiled program each).
  plain = denoise.DenoiseOptions(lof_k=options.lof_k)
  if discriminator in base:
    out = jnp.asarray(_positionwise(xt, discriminator, mesh, plain))
  elif discriminator.startswith("fusion") and discriminator in (
      denoise.DISCRIMINATORS
  ):
    # Normalised over all patches: the base scores are computed sharded,
    # then fused exactly as `denoise.fusion` does.
    scores = [jnp.asarray(_positionwise(xt, f, mesh, plain)) for f in base]
    fused = denoise.fusion_mode(discriminator, options)
    out = denoise.fused_weights(scores, fused)
  else:  # one device (and its error for an unknown name)
    return denoise.patch_weights(x, discriminator, options)
  return jnp.transpose(out).astype(jnp.float32)


# Weighted greedy k-center: points sharded, one all-gather per pick.


def _global_pick(value, index, row):
  """Global argmax of every device's local (value, index, row): the largest
  value, then the lowest global index, as a first-occurrence argmax."""
  vals = jax.lax.all_gather(jnp.concatenate([row, value[None]]), AXIS)
  idxs = jax.lax.all_gather(index, AXIS)
  top = jnp.max(vals[:, -1])
  win = jnp.argmin(jnp.where(vals[:, -1] == top, idxs, _BIG))
  return idxs[win], vals[win, :-1]


@functools.lru_cache(maxsize=32)
def _kcenter_fn(mesh, rows, dim, n_select, forced, kernel):
  block_m, interpret, backend = kernel  # Pallas step (block_m > 0) or not
  if block_m:
    plan = kcenter_pallas.plan(rows, dim, backend, block_m=block_m)
    step = kcenter_pallas.make_step(rows // block_m, plan, backend, interpret)

  def body(x, w, start_rows, first, first_row):
    offset = jax.lax.axis_index(AXIS) * rows
    xt = kcenter_pallas.transposed(x, plan, rows) if block_m else None

    def local_max(dist):
      i = jnp.argmax(dist).astype(jnp.int32)  # first occurrence
      return dist, dist[i], i, x[i]

    def update(dist, c):
      if not block_m:  # the reference path's difference form
        return local_max(jnp.minimum(dist, kcenter_common.dist_to(x, c) * w))
      col = kcenter_pallas.column(c, plan)  # the one-device Pallas step
      dist, top, li = step(col, xt, w[None, :], dist[None, :])
      return dist[0], top, li, x[li]

    def pick(dist, value, i, row):
      return dist, _global_pick(value, offset + i, row)

    def loop(t, carry):
      dist, sel, (i, c) = carry
      dist, nxt = pick(*update(dist, c))
      return dist, sel.at[t].set(i), nxt

    # kcenter_common.initial_distance, with the start rows given.
    acc = jax.lax.fori_loop(
        0,
        start_rows.shape[0],
        lambda j, a: a + kcenter_common.dist_to(x, start_rows[j]),
        jnp.zeros((rows,), jnp.float32),
    )
    dist, nxt = pick(*local_max(acc / start_rows.shape[0] * w))
    if forced:
      nxt = (first, first_row)
    sel = jnp.zeros((n_select,), jnp.int32)
    return jax.lax.fori_loop(0, n_select, loop, (dist, sel, nxt))[1]

  return _spmd(body, mesh, (P(AXIS), P(AXIS), P(), P(), P()), P())


def kcenter(
    x,
    n_select: int,
    start_idx,
    sampling_weight=None,
    *,
    mesh: Mesh,
    first=None,
    impl: Optional[str] = None,
) -> jax.Array:
  """`kernels.kcenter.kcenter` with the points split over the devices.

  Each device updates its points' distances with the arithmetic of the
  single-device reference path (coordinate differences) or, where `impl`
  resolves to Pallas (GPU/TPU), the single-device Pallas step: distances and
  picks are that path's, bit for bit. (One CPU device runs the Gram-form XLA
  path instead; its picks are held to the same numpy reference.)
  """
  # The single-device checks, with its messages.
  kcenter_lib.kcenter(x, 0, start_idx, sampling_weight, first=first)
  x, starts = _host(x, "kcenter", np.float32), _host(start_idx, "kcenter")
  m, dim = x.shape
  if int(n_select) < 0 or starts.min() < 0 or starts.max() >= m:
    raise ValueError(
        f"parallel.kcenter: n_select={n_select} < 0, or start_idx not in "
        f"[0, {m})"
    )
  w = np.ones((m,), np.float32)
  if sampling_weight is not None:
    w = _host(sampling_weight, "kcenter", np.float32)
  if int(n_select) == 0:
    return jnp.zeros((0,), jnp.int32)
  first = None if first is None else int(_host(first, "kcenter"))
  path = dispatch.resolve_impl(impl, "kcenter")
  interpret = path == "pallas_interpret"
  block_m, backend = 0, dispatch.pallas_backend()
  if path.startswith("pallas") and first is None:  # one device's points
    block_m = kcenter_pallas.plan(-(-m // mesh.size), dim, backend).block_m
  rows = dispatch.round_up(-(-m // mesh.size), block_m or 8)
  kernel = (block_m, interpret, backend)
  fn = _kcenter_fn(mesh, rows, dim, int(n_select), first is not None, kernel)
  i0 = 0 if first is None else first
  sel = fn(
      _put(x, mesh, P(AXIS), rows * mesh.size),
      _put(w, mesh, P(AXIS), rows * mesh.size),
      _put(x[starts], mesh),
      _put(np.int32(i0), mesh),
      _put(x[i0], mesh),
  )
  return jnp.asarray(_to_host(sel))


# kNN scoring: the bank sharded, local top-1, global merge.


def knn_blocks(n_queries: int, n_bank: int):
  """(query tile, bank tile, path) of the single-device kNN scan."""
  path = dispatch.resolve_impl(None, "knn")
  if path.startswith("pallas"):
    # The kernel's plan; its tiles do not depend on d (1 stands in).
    backend = dispatch.pallas_backend()
    p = knn_lib.knn_pallas.plan(n_queries, n_bank, 1, 1, backend)
    return p.block_q, p.block_n, path
  return (*knn_lib.default_blocks(n_queries, n_bank, 1), path)


@functools.lru_cache(maxsize=32)
def _nearest_fn(mesh, rows, block_q, block_n, local_nearest, impl):
  del impl  # the kernel path the trace takes: part of the cache key

  def body(bank, queries):
    d, i = local_nearest(bank, queries, block_n=block_n, block_q=block_q)
    all_d = jax.lax.all_gather(d, AXIS)
    all_i = jax.lax.all_gather(i + jax.lax.axis_index(AXIS) * rows, AXIS)
    best = jnp.min(all_d, axis=0)
    return best, jnp.min(jnp.where(all_d == best, all_i, _BIG), axis=0)

  return _spmd(body, mesh, (P(AXIS), P()), (P(), P()))


def nearest(bank_feats, queries, mesh: Mesh, local_nearest: Callable) -> tuple:
  """Nearest (M, D) bank row of every (Q, D) query, the bank split over
  devices: (squared distances (Q,), indices (Q,)) as numpy, those of one
  device (the smallest distance, the lowest index on ties).

  `local_nearest(bank, queries, block_n=, block_q=)` is the single-device
  top-1 search (`scoring`'s); each device runs it on its slice with the
  tiles of a single-device scan of the whole bank.
  """
  queries = _host(queries, "nearest", np.float32)
  m, q = int(bank_feats.shape[0]), int(queries.shape[0])
  block_q, block_n, path = knn_blocks(q, m)
  rows = -(-(-(-m // block_n)) // mesh.size) * block_n
  fn = _nearest_fn(mesh, rows, block_q, block_n, local_nearest, path)
  feats = lambda: _host(bank_feats, "nearest", np.float32)
  put = lambda: _put(feats(), mesh, P(AXIS), rows * mesh.size, _FAR)
  d, i = fn(_layout(bank_feats, mesh, rows, put), _put(queries, mesh))
  return _to_host(d), _to_host(i)
