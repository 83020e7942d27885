"""Exact weighted greedy k-center that skips work it can prove idle (numpy).

Semantics of ``kcenter.kcenter`` (top of kcenter.py): dist = mean distance
to the starts times w; n_select times: i = first argmax(dist), record i,
dist = min(dist, d(x, x[i]) * w). Only distances that can change are
computed, and only for points that can become the argmax soon.

Hot and cold points. Only the argmax matters at each pick, and dist never
grows. So dist is kept exact on a hot set, the points with dist >= theta
(about 1/8 of them), and each pick updates only those. Every other point
keeps its dist from when it was last brought up to date: an upper bound
below theta, so the argmax stays in the hot set while its maximum is >=
theta. When it falls below, theta is lowered: the points it now admits are brought
up to date against the centres picked since (in batches, with one matrix
product per block of points and centres), and the next hot set is formed.
Points far below theta wait, and most never need the later centres at all.

Pruning. Distances in the leading principal axes of x bound the full ones
from below (_project): a pair (x, c) is computed only when that bound,
and then the one on all axes, say d(x, c) w(x) could be < dist(x). For the
batches the bound on all axes comes out of the same matrix product. Points
at dist 0 never change and leave.

Exactness. Computed points use the arithmetic of the float32 numpy
reference ``_testutil.numpy_greedy_kcenter`` (difference, square, numpy's
row sum, sqrt, times w, minimum); numpy rounds each row on its own, so
their values are bit-identical. A pair is skipped only if a lower bound L
on its exact distance has L (1 - tau) - eps >= q (1 + tau), q = dist / w:
the float32 distance is within a relative (d + 4) 2^-24 / 2 < tau (plus
underflow < eps) of the exact one, so its float32 product with w is >=
dist and min() keeps dist bit for bit. Every bound carries its own
rounding term (projection, centring, dot products and the float32 matrix
product), so hot points hold the reference's dist after every pick, the
others an upper bound below theta, and argmax picks the same index, ties and
duplicates included. The XLA paths (``kcenter_reference`` too) round some
distances an ulp differently: they agree on every pick unless two
candidates are within an ulp.

Memory: x, its projection (same size), (M,) vectors and blocks of about
1 MB; no M x n array.
"""

from __future__ import annotations

import math

import numpy as np

from softpatch_jax.kernels import blas
from softpatch_jax.kernels import kcenter

_U32 = 2.0**-24  # float32 unit roundoff
_TAU = 1e-4  # relative safety margin of every skip
_EPS_REL = 1e-6  # absolute margin, times the largest centred norm
_BLOCK = 2048  # rows per block of the exact pass (temporaries stay cached)
_PROJ_SHARE = 0.8  # variance kept by the hot pass's projection
_HOT_FRACTION = 1 / 8  # of the points at dist > 0
_HOT_MIN = 2048
_PRODUCT = 1 << 18  # elements per block of the catch-up product (L2-sized)
_CENTRES = 2048  # centres per catch-up product


def validate(x, n_select, start_idx, sampling_weight, first):
  """kcenter.kcenter's checks (and messages), returning numpy arrays."""
  # pylint: disable-next=protected-access
  x, n_select, start_idx, w = kcenter.validate(
      x, n_select, start_idx, sampling_weight, "kcenter_pruned"
  )
  m = x.shape[0]
  # pylint: disable-next=protected-access
  first = kcenter.check_first(first, m, "kcenter_pruned")
  start_idx = np.asarray(start_idx).astype(np.int64)
  if np.any(start_idx < -m) or np.any(start_idx >= m):
    raise ValueError(f"kernels.kcenter_pruned: start_idx not in [0, {m})")
  first = None if first is None else int(first)
  return np.ascontiguousarray(x), n_select, start_idx % m, np.asarray(w), first


def _blocked_distance(x, rows, subtrahend):
  """float32 ||x[rows] - subtrahend(s, e)|| over blocks s:e of rows.

  Difference, square, numpy's sum over each row, sqrt: numpy sums each row
  on its own, so every value is the reference's bit for bit whatever the
  block; the blocks keep the temporaries cache-sized.
  """
  k = x.shape[0] if rows is None else len(rows)
  out = np.empty((k,), np.float32)
  for s in range(0, k, _BLOCK):
    e = min(s + _BLOCK, k)
    if rows is None:
      b = x[s:e] - subtrahend(s, e)
    else:
      b = x[rows[s:e]]  # a copy: subtract in place
      np.subtract(b, subtrahend(s, e), out=b)
    np.multiply(b, b, out=b)
    np.sqrt(np.add.reduce(b, axis=1), out=out[s:e])
  return out


def exact_distance(x, c, rows=None):
  """float32 d(x[rows], c) with the numpy reference's arithmetic.

  The same values bit for bit as np.sqrt(((x - c) ** 2).sum(1)) on all of
  x, computed in blocks without a copy of x.
  """
  return _blocked_distance(x, rows, lambda s, e: c)


def initial_distance(x, start_idx, w):
  """Mean distance to the starts times w, summed start by start (float32)."""
  acc = np.zeros((x.shape[0],), np.float32)
  for s in start_idx:
    acc = acc + exact_distance(x, x[int(s)])
  return acc / np.asarray(len(start_idx), np.float32) * w


def _dense(x, n_select, dist, w, first):
  """The unpruned loop (for inputs the bounds do not cover: inf, nan, w < 0)."""
  sel = np.zeros((n_select,), np.int32)
  for t in range(n_select):
    i = first if (t == 0 and first is not None) else int(np.argmax(dist))
    sel[t] = i
    dist = np.minimum(dist, exact_distance(x, x[i]) * w)
  return sel


def _pair_distance(x, rows, cols):
  """float32 d(x[rows], x[cols]) pair by pair, as exact_distance rounds."""
  return _blocked_distance(x, rows, lambda s, e: x[cols[s:e]])


def _down32(v):
  """float32 values <= v (float64): round to nearest, then step down."""
  with np.errstate(over="ignore"):
    v32 = v.astype(np.float32)
  return np.where(v32 > v, np.nextafter(v32, np.float32(-np.inf)), v32)


class _Greedy:
  """State of the hot/cold greedy loop; see the module docstring."""

  def __init__(self, x, w, dist):
    m, d = x.shape
    self.x, self.w, self.dist, self.m = x, w, dist, m
    delta = (d + 4) * _U32  # >= twice the relative error of a float32 d
    self.tau = max(_TAU, 2.0 * delta)
    self._project(x)
    # Underflow of tiny squares moves a float32 distance by < eta; eps
    # covers eta and the float64 rounding of the bounds themselves.
    self.eta = 2.0 * math.sqrt(d * 2.0**-150)
    self.eps = _EPS_REL * self.scale + 2.0 * self.eta
    # nu_q(x): the exact distance to a centre below which x may change;
    # a_half(x): the same threshold for the hot pass's dot products.
    self.nu_q = np.zeros((m,))
    self.a_half = np.full((m,), np.inf)
    self._set_nu_q(np.flatnonzero(dist > 0))
    # dist[x] is exact for the centres before fresh_at[x] (an upper bound
    # on the reference's dist); the hot set and its threshold.
    self.fresh_at = np.zeros((m,), np.int64)
    self.hot_theta = 0.0  # the current hot set's threshold

  def _project(self, x):
    """y = (x - mean) V on the principal axes, with its error terms.

    ||V^T z|| <= sigma ||z|| for any V, so distances between rows of y
    bound those of x from below once rounding is accounted for: centring
    (c_err), y's matmul (proj_err) and the dot products (dot_err). Any V
    is valid; with the principal axes of a row sample the first k columns
    (_PROJ_SHARE of the variance) give most of it.
    """
    m, d = x.shape
    mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sub = (x[:: max(1, m // 20_000)] - mu).astype(np.float64)
    lam, v = np.linalg.eigh(sub.T @ sub)
    share = np.cumsum(lam[::-1]) / max(float(lam.sum()), 1e-300)
    k = self.k = min(d, -(-(int(np.sum(share < _PROJ_SHARE)) + 1) // 8) * 8)
    v = v[:, ::-1].astype(np.float32)
    gram = v.T.astype(np.float64) @ v
    self.sigma = math.sqrt(1.0 + np.linalg.norm(gram - np.eye(d))) + 1e-12
    self.y, nx_max = np.empty((m, d), np.float32), 0.0
    for s in range(0, m, _BLOCK):
      xc = x[s : s + _BLOCK] - mu  # the centred rows the bounds refer to
      np.matmul(xc, v, out=self.y[s : s + _BLOCK])
      nx_max = max(nx_max, float(np.einsum("ij,ij->i", xc, xc).max()))
    y1 = self.y[:, :k]
    self.ny1 = np.einsum("ij,ij->i", y1, y1, dtype=np.float64)
    self.ny = np.einsum("ij,ij->i", self.y, self.y, dtype=np.float64)
    self.scale = math.sqrt(nx_max) * 1.001  # >= every centred norm
    self.c_err = 2.0001 * _U32 * self.scale
    # (proj_err, dot_err) of the first k axes and of all d.
    tr = np.cumsum(np.diag(gram)) * 1.001  # ||V[:, :j]||_F^2
    pe = 2.02 * (d + 2) * _U32 * self.scale
    self.errs = [
        (pe * math.sqrt(tr[j - 1]), (j + 2) * 1.01 * _U32 + 1e-13)
        for j in (k, d)
    ]

  def _set_nu_q(self, pts):
    q = self.dist[pts].astype(np.float64) / self.w[pts]
    self.nu_q[pts] = (q * (1 + self.tau) + self.eps) / (1 - self.tau)
    self.a_half[pts] = self._a_half(pts, self.ny1, *self.errs[0])
    self.a_half[pts[self.dist[pts] == 0]] = np.inf  # can never change again

  def _a_half(self, pts, ny, proj_err, dot_err):
    # x cannot change while its exact distance to c is >= nu_q; in the
    # projection that holds when ||y_x - y_c|| >= lim, i.e. when
    # y_x . y_c <= a_half + ny_c (1 - dot_err) / 2.
    lim = (self.nu_q[pts] + self.c_err) * self.sigma + proj_err
    return (ny[pts] * (1 - dot_err) - lim * lim) / 2

  def _lower(self, pts, vals):
    """dist[pts] = min(dist[pts], vals) (pts may repeat), bounds after."""
    old = self.dist[pts]
    np.minimum.at(self.dist, pts, vals)
    moved = pts[self.dist[pts] < old]
    self._set_nu_q(np.unique(moved))

  def run(self, n_select, first):
    sel = np.zeros((n_select,), np.int32)
    t = 0
    if first is not None:
      sel[0], t = first, 1  # everyone catches up with it when needed
    while t < n_select:
      theta, hot = self._heat(t, sel)
      y1 = np.ascontiguousarray(self.y[hot, : self.k])
      a_half = self.a_half[hot]
      while t < n_select:
        dh = self.dist[hot]
        j = int(np.argmax(dh))
        if dh[j] < theta:  # the argmax may be cold now: new hot set
          break
        sel[t], t = hot[j], t + 1
        if t < n_select:
          self._hot_update(int(hot[j]), hot, y1, a_half)
      self.fresh_at[hot] = t
    return sel

  def _heat(self, t, sel):
    """theta and the hot set (all up to date) for picks from t on."""
    while True:
      live = np.flatnonzero(self.dist > 0)
      h = max(_HOT_MIN, int(_HOT_FRACTION * len(live)))
      theta, v = 0.0, self.dist[live]
      if len(live) > h:
        theta = float(np.partition(v, len(v) - h)[len(v) - h])
      stale = live[(v >= theta) & (self.fresh_at[live] < t)]
      if not len(stale):
        break
      fresh_at = self.fresh_at[stale]
      for f in np.unique(fresh_at):
        self._catch_up(stale[fresh_at == f], sel[f:t].astype(np.int64))
      self.fresh_at[stale] = t
    # At theta = 0 every point is hot, so ties at 0 go to index 0.
    hot = np.arange(self.m)
    if theta > 0:
      hot = np.flatnonzero(self.dist >= theta)
    self.hot_theta = theta
    return theta, hot

  def _hot_update(self, i, hot, y1, a_half):
    """dist = min(dist, d(x, c) w) on the hot set: bounds, then exact."""
    dots = y1 @ self.y[i, : self.k]
    ny_c = self.ny1[i] * (1 - self.errs[0][1]) / 2
    loc = np.flatnonzero(dots > a_half + ny_c)
    if len(loc) and self.k < self.y.shape[1]:
      pts = hot[loc]
      full = dots[loc].astype(np.float64)
      full += self.y[pts, self.k :] @ self.y[i, self.k :]
      ny_c = self.ny[i] * (1 - self.errs[1][1]) / 2
      keep = full > self._a_half(pts, self.ny, *self.errs[1]) + ny_c
      loc = loc[keep]
    pts = hot[loc]
    self._lower(pts, exact_distance(self.x, self.x[i], pts) * self.w[pts])
    a_half[loc] = self.a_half[pts]

  def _catch_up(self, pts, cents):
    """Brings pts up to date with the centres cents (indices into x)."""
    d = self.y.shape[1]
    # One product of (y_x, a_x, 1) and (y_c, -1, -t_c) gives
    # y_x . y_c - a_x - t_c, the all-axes test of _hot_update; a_x is
    # lowered by its float32 rounding (gamma times the sum of |terms|).
    gamma = 1.01 * (d + 3) * _U32
    proj_err, dot_err = self.errs[1]
    for s in range(0, len(cents), _CENTRES):
      c = cents[s : s + _CENTRES]
      t_c = self.ny[c] * (1 - dot_err) / 2
      cy = np.empty((d + 2, len(c)), np.float32)
      cy[:d], cy[d], cy[d + 1] = self.y[c].T, -1.0, -_down32(t_c)
      y_max, t_max = math.sqrt(self.ny[c].max()), float(np.abs(t_c).max())
      rows, cols = [], []
      step = max(64, _PRODUCT // len(c))
      for r in range(0, len(pts), step):
        p = pts[r : r + step]
        p = p[self.dist[p] > 0]
        a = self._a_half(p, self.ny, proj_err, dot_err)
        a -= gamma * (np.sqrt(self.ny[p]) * y_max + np.abs(a) + t_max)
        py = np.empty((len(p), d + 2), np.float32)
        py[:, :d], py[:, d], py[:, d + 1] = self.y[p], _down32(a), 1.0
        hit = np.flatnonzero(py @ cy > 0)
        rows.append(p[hit // len(c)])
        cols.append(c[hit % len(c)])
      if not rows:
        continue
      rows, cols = np.concatenate(rows), np.concatenate(cols)
      self._lower(rows, _pair_distance(self.x, rows, cols) * self.w[rows])


def kcenter_pruned(
    x, n_select: int, start_idx, sampling_weight=None, *, first=None
):
  """Weighted greedy k-center, exact, updating only points that can matter.

  A numpy host loop with a fixed cost per pick: it pays off for large M
  (tens of thousands of points and up); small inputs run faster dense.

  Args:
    x: (M, d) features.
    n_select: number of centres to pick.
    start_idx: (S,) int indices of the random starting points.
    sampling_weight: (M,) weights >= 0 (1 clean, 0 outlier) or None (ones).
    first: None or an int index forced as the first pick.

  Returns:
    (n_select,) int32 numpy indices into x in selection order, identical
    to the float32 numpy reference (see the module docstring).
  """
  x, n_select, start_idx, w, first = validate(
      x, n_select, start_idx, sampling_weight, first
  )
  if n_select == 0:
    return np.zeros((0,), np.int32)
  dist = initial_distance(x, start_idx, w)
  # The bounds need finite x, w >= 0, squares within float32 and (d + 4)
  # 2^-24 well below 1; other inputs take the unpruned loop.
  bounded = np.all(np.abs(x) < 1e15) and np.all((w >= 0) & (w < np.inf))
  if not bounded or not np.all(np.isfinite(dist)) or x.shape[1] > 100_000:
    return _dense(x, n_select, dist, w, first)
  with blas.one_thread():  # many ~1 MB products: see kernels/blas.py
    return _Greedy(x, w, dist).run(n_select, first)
