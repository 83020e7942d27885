"""CFLOW-AD: conditional normalizing flows on multi-scale features.

CFLOW-AD (Gudovskiy et al., WACV 2022) models the density of the patch
features of normal images at several scales of a pretrained encoder (the
layer1-3 maps of a ResNet; stage2/3/5 of EfficientNet-Lite, see `padim`).
Each scale has its own decoder: a normalizing flow of affine coupling layers
whose subnetworks also see a 2-D sinusoidal positional encoding of the patch
position (the condition). Trained by maximum likelihood, the decoder gives
every test patch a log-likelihood per feature dimension; low likelihood means
anomalous.

Per scale s the log-likelihoods become probabilities p_s = exp(log p -
ref_s), upsampled to the image, summed over the scales and subtracted from
their maximum, as in the paper. The paper takes ref_s and that maximum over
the test set; we take ref_s as the largest log-likelihood of the training
patches at scale s, so a test image's score never depends on the other test
images. The pixel map is sum_s (1 - p_s), upsampled and blurred exactly as
SoftPatch's maps (`scoring.anomaly_maps`); the image score is its maximum.

A coupling block permutes the dimensions with a fixed permutation, splits
them into x1 (the first half) and x2, and maps x2 -> x2 * exp(s) + t with
(s, t) = subnet([x1, condition]); s is soft-clamped to (-clamp, clamp) with
clamp * tanh(s / clamp). Then every dimension gets a learnt scale and
offset (the scale 0.1 * softplus_{beta=1/2}, starting at 1), as in the
FrEIA all-in-one blocks of CFLOW-AD's decoders: the taps have a standard
deviation near 7, which the couplings alone reach only slowly. The subnet
is a two-layer MLP whose output layer starts at zero, so every flow starts
as the identity.

Training minimises -log sigmoid(log p / C) (CFLOW-AD's code) for `epochs`
passes, and at least `min_steps` Adam steps per scale: without that floor
the coarsest scale of a small training set got a handful of steps and its
untrained likelihoods drowned the others (ELPV mono AUROC 0.47, now 0.87;
benchmarks/REFERENCE_BASELINES.md). The evaluate mode keeps the training
maps in memory (68 MB for Lite0 on 132 cells at 224 px).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softpatch_jax import scoring
from softpatch_jax import validation
from softpatch_jax.baselines import options as options_lib

_LOG_2PI = math.log(2.0 * math.pi)
# Positions scored at once when computing log-likelihoods.
_SCORE_POSITIONS = 8192


def positional_encoding(dim: int, h: int, w: int) -> np.ndarray:
  """(h * w, dim) 2-D sinusoidal encoding of the grid positions, row-major.

  The first half of the dimensions encode the column, the second half the
  row, each as interleaved sin / cos at geometrically spaced frequencies
  (Vaswani et al.'s encoding per axis, as CFLOW-AD uses). dim % 4 == 0.
  """
  if dim < 4 or dim % 4:
    raise ValueError(
        f"the condition dimension must be a multiple of 4, got {dim}"
    )
  half = dim // 2
  freq = np.exp(np.arange(0, half, 2) * -(math.log(10000.0) / half))
  col = np.arange(w)[:, None] * freq[None, :]
  row = np.arange(h)[:, None] * freq[None, :]
  pe = np.zeros((h, w, dim), np.float64)
  pe[:, :, 0:half:2] = np.sin(col)[None, :, :]
  pe[:, :, 1:half:2] = np.cos(col)[None, :, :]
  pe[:, :, half::2] = np.sin(row)[:, None, :]
  pe[:, :, half + 1 :: 2] = np.cos(row)[:, None, :]
  return pe.reshape(h * w, dim).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _permutation(dim: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  perm = np.random.default_rng(seed).permutation(dim)
  return perm, np.argsort(perm)


class _Subnet(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    # Zero-initialised output: the coupling starts as the identity.
    return nn.Dense(self.out, kernel_init=nn.initializers.zeros)(x)


class CouplingBlock(nn.Module):
  """A fixed permutation, an affine coupling conditioned on `c`, then a
  learnt per-dimension affine map. `__call__(x, c) -> (y, log|det dy/dx|)`;
  `inverse(y, c) -> x`."""

  dim: int
  hidden: int
  clamp: float = 1.9
  seed: int = 0

  def setup(self):
    self.subnet = _Subnet(self.hidden, 2 * (self.dim - self.dim // 2))
    # 0.1 * softplus_{beta=0.5}(g) starts at 1: the block starts as identity.
    init = 2.0 * math.log(math.expm1(5.0))
    self.global_scale = self.param(
        "global_scale", nn.initializers.constant(init), (self.dim,)
    )
    self.global_offset = self.param(
        "global_offset", nn.initializers.zeros, (self.dim,)
    )

  def _scale_shift(self, x1, c):
    s, t = jnp.split(self.subnet(jnp.concatenate([x1, c], axis=-1)), 2, -1)
    return self.clamp * jnp.tanh(s / self.clamp), t

  def _global(self):
    return 0.2 * jax.nn.softplus(0.5 * self.global_scale), self.global_offset

  def __call__(self, x, c):
    perm, _ = _permutation(self.dim, self.seed)
    x = x[..., perm]
    k = self.dim // 2
    s, t = self._scale_shift(x[..., :k], c)
    y = jnp.concatenate([x[..., :k], x[..., k:] * jnp.exp(s) + t], axis=-1)
    g, b = self._global()
    return y * g + b, s.sum(axis=-1) + jnp.log(g).sum()

  def inverse(self, y, c):
    _, inv = _permutation(self.dim, self.seed)
    g, b = self._global()
    y = (y - b) / g
    k = self.dim // 2
    s, t = self._scale_shift(y[..., :k], c)
    x = jnp.concatenate([y[..., :k], (y[..., k:] - t) * jnp.exp(-s)], -1)
    return x[..., inv]


class ConditionalFlow(nn.Module):
  """`n_blocks` coupling blocks: x (..., dim), c (..., cond_dim) -> (z,
  log|det dz/dx|). The subnet width is hidden_ratio * (dim // 2 + cond_dim),
  as in CFLOW-AD's decoders (ratio 2)."""

  dim: int
  cond_dim: int
  n_blocks: int = 8
  hidden_ratio: float = 2.0
  clamp: float = 1.9

  def setup(self):
    if self.dim < 2:
      raise ValueError(f"a coupling flow needs >= 2 dimensions, got {self.dim}")
    hidden = max(
        1, int(round(self.hidden_ratio * (self.dim // 2 + self.cond_dim)))
    )
    self.blocks = [
        CouplingBlock(self.dim, hidden, self.clamp, seed=i)
        for i in range(self.n_blocks)
    ]

  def __call__(self, x, c):
    logdet = jnp.zeros(x.shape[:-1], x.dtype)
    for block in self.blocks:
      x, ld = block(x, c)
      logdet = logdet + ld
    return x, logdet

  def inverse(self, z, c):
    for block in reversed(self.blocks):
      z = block.inverse(z, c)
    return z


def log_likelihood(z: jax.Array, logdet: jax.Array) -> jax.Array:
  """log p(x) per feature dimension under a standard normal base density:
  (log N(z; 0, I) + log|det|) / dim."""
  dim = z.shape[-1]
  logp = -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * dim * _LOG_2PI + logdet
  return logp / dim


def training_loss(loglik: jax.Array, objective: str) -> jax.Array:
  """Mean loss of per-dimension log-likelihoods: 'logsigmoid' (CFLOW-AD's
  code; saturates on well-fit positions) or 'nll' (-log p / C)."""
  if objective == "logsigmoid":
    return -jnp.mean(jax.nn.log_sigmoid(loglik))
  if objective == "nll":
    return -jnp.mean(loglik)
  raise ValueError(f"unknown CFLOW objective {objective!r}")


def epochs_for(options: options_lib.CflowOptions, steps: int) -> int:
  """Epochs for a scale of `steps` batches an epoch: at least
  `options.epochs` and `options.min_steps` Adam steps."""
  return max(int(options.epochs), -(-int(options.min_steps) // steps))


@functools.partial(jax.jit, static_argnums=0)
def _init(flow, key, x, c):
  # Compiled: an eager init dispatches every op of every block one by one.
  return flow.init(key, x, c)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _epoch(flow, learning_rate, objective, params, state, flat, cond, order):
  """One epoch of Adam steps over the (steps, batch) position indices."""
  opt = optax.adam(learning_rate)
  p = cond.shape[0]

  def loss_fn(params, idx):
    z, logdet = flow.apply(params, flat[idx], cond[idx % p])
    return training_loss(log_likelihood(z, logdet), objective)

  def step(carry, idx):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, idx)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  (params, state), losses = jax.lax.scan(step, (params, state), order)
  return params, state, losses


def train_flow(
    key: jax.Array,
    x,
    cond,
    flow: ConditionalFlow,
    options: options_lib.CflowOptions,
    progress: Optional[Callable[[int, float], None]] = None,
):
  """Fits `flow` to (N, P, C) features with conditions (P, cond_dim).

  Adam (optax) with `options.learning_rate` on `training_loss` of
  mini-batches of `options.batch_positions` patch positions, drawn without
  replacement from all N * P positions every epoch (a last partial batch
  is skipped), for `epochs_for(options, steps)` epochs.
  Returns (params, per-step losses as a numpy array). `progress(epoch,
  mean loss)` is called after each epoch.
  """
  n, p, c = x.shape
  m = n * p
  learning_rate = float(options.learning_rate)
  batch = min(int(options.batch_positions), m)
  steps = m // batch
  flat = jnp.asarray(np.asarray(x, np.float32).reshape(m, c))
  cond = jnp.asarray(cond, jnp.float32)
  init_key, key = jax.random.split(key)
  params = _init(flow, init_key, flat[:1], cond[:1])
  state = optax.adam(learning_rate).init(params)
  losses = []
  for e in range(epochs_for(options, steps)):
    key, sub = jax.random.split(key)
    order = jax.random.permutation(sub, m)[: steps * batch]
    params, state, loss = _epoch(
        flow,
        learning_rate,
        options.objective,
        params,
        state,
        flat,
        cond,
        order.reshape(steps, batch),
    )
    losses.append(np.asarray(loss))
    if progress is not None:
      progress(e + 1, float(losses[-1].mean()))
  losses = np.concatenate(losses)
  validation.check_finite(
      losses, "CFLOW training losses", "lower the learning rate"
  )
  return params, losses


@flax.struct.dataclass
class CflowModel:
  """Fitted CFLOW decoders, one per scale: a pytree (jitted over).

  Attributes:
    params: per-scale flow parameters.
    ref: (S,) per-scale reference log-likelihoods (the training maximum).
    dims, grids: per-scale feature dimension and (h, w) grid.
    cond_dim, n_blocks, hidden_ratio, clamp: the flows' shape.
    image_size, blur_sigma: the pixel-map geometry.
  """

  params: tuple
  ref: jax.Array
  dims: Tuple[int, ...] = flax.struct.field(pytree_node=False)
  grids: Tuple[Tuple[int, int], ...] = flax.struct.field(pytree_node=False)
  cond_dim: int = flax.struct.field(pytree_node=False)
  n_blocks: int = flax.struct.field(pytree_node=False)
  hidden_ratio: float = flax.struct.field(pytree_node=False)
  clamp: float = flax.struct.field(pytree_node=False)
  image_size: Tuple[int, int] = flax.struct.field(pytree_node=False)
  blur_sigma: float = flax.struct.field(
      pytree_node=False, default=scoring.ScoringOptions.blur_sigma
  )

  def flow(self, s: int) -> ConditionalFlow:
    return ConditionalFlow(
        self.dims[s],
        self.cond_dim,
        self.n_blocks,
        self.hidden_ratio,
        self.clamp,
    )


@functools.lru_cache(maxsize=32)
def _encoding(dim: int, h: int, w: int) -> np.ndarray:
  return positional_encoding(dim, h, w)


@functools.partial(jax.jit, static_argnums=0)
def _loglik(flow, params, x, cond):
  z, logdet = flow.apply(params, x, cond)
  return log_likelihood(z, logdet)


def log_likelihoods(model: CflowModel, maps: Sequence) -> List[np.ndarray]:
  """Per-scale (B, P_s) log-likelihoods per dimension of (B, h, w, C) maps,
  in padded chunks of `_SCORE_POSITIONS` (one compiled program a scale)."""
  out = []
  k = _SCORE_POSITIONS
  for s, m in enumerate(maps):
    b, h, w, c = m.shape
    n = b * h * w
    x = np.pad(np.asarray(m, np.float32).reshape(n, c), ((0, -n % k), (0, 0)))
    cond = _encoding(model.cond_dim, h, w)[np.arange(x.shape[0]) % (h * w)]
    flow, prm = model.flow(s), model.params[s]
    parts = [
        np.asarray(_loglik(flow, prm, x[i : i + k], cond[i : i + k]))
        for i in range(0, x.shape[0], k)
    ]
    out.append(np.concatenate(parts)[:n].reshape(b, h * w))
  return out


@jax.jit
def anomaly_maps(model: CflowModel, logliks: Sequence) -> jax.Array:
  """sum_s (1 - exp(log p_s - ref_s)), upsampled and blurred: (B, H, W)."""
  total = None
  for s, ll in enumerate(logliks):
    miss = 1.0 - jnp.exp(ll - model.ref[s])
    up = scoring.anomaly_maps(
        miss, model.grids[s], model.image_size, model.blur_sigma
    )
    total = up if total is None else total + up
  return total


def score(model: CflowModel, maps: Sequence):
  """(B, h_s, w_s, C_s) maps per scale -> (image scores (B,), maps (B, H, W))."""
  pix = anomaly_maps(model, log_likelihoods(model, maps))
  return pix.max(axis=(1, 2)), pix


def fit(
    key: jax.Array,
    maps: Sequence,
    options: options_lib.CflowOptions,
    *,
    image_size,
    blur_sigma: float,
    progress: Optional[Callable[[int, int, float], None]] = None,
):
  """Trains one decoder per scale on (N, h_s, w_s, C_s) training maps.

  `options`: the decoders' shape and their training; `image_size` and
  `blur_sigma`: the pixel maps' geometry. Returns (CflowModel, [per-step
  losses of each scale]). `progress(scale, epoch, mean loss)` is called
  after every epoch.
  """
  if not maps:
    raise ValueError("CFLOW needs at least one feature map")
  o = options
  params, losses, dims, grids = [], [], [], []
  for s, m in enumerate(maps):
    m = np.asarray(m, np.float32)
    validation.check_finite(m, f"CFLOW training features (scale {s})")
    _, h, w, c = m.shape
    flow = ConditionalFlow(
        c, o.condition_dim, o.coupling_blocks, o.hidden_ratio, o.clamp
    )
    report = None if progress is None else functools.partial(progress, s)
    prm, loss = train_flow(
        jax.random.fold_in(key, s),
        m.reshape(m.shape[0], h * w, c),
        positional_encoding(o.condition_dim, h, w),
        flow,
        o,
        progress=report,
    )
    params.append(prm), losses.append(loss), dims.append(c)
    grids.append((h, w))
  model = CflowModel(
      params=tuple(params),
      ref=jnp.zeros((len(maps),), jnp.float32),
      dims=tuple(dims),
      grids=tuple(grids),
      cond_dim=o.condition_dim,
      n_blocks=o.coupling_blocks,
      hidden_ratio=float(o.hidden_ratio),
      clamp=float(o.clamp),
      image_size=tuple(int(v) for v in image_size),
      blur_sigma=float(blur_sigma),
  )
  ref = [float(ll.max()) for ll in log_likelihoods(model, maps)]
  return model.replace(ref=jnp.asarray(ref, jnp.float32)), losses
