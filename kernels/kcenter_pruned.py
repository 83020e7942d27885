"""Exact weighted greedy k-center with triangle-inequality pruning (numpy).

Semantics of ``kcenter.kcenter`` (top of kcenter.py): dist = mean distance
to the starts times w; n_select times: i = first argmax(dist), record i,
dist = min(dist, d(x, x[i]) * w). Only points whose value can change are
computed.

Pruning. Each point x with dist > 0 is in the cluster of an earlier centre
a with r(x) >= d(x, a). For a new centre c, d(x, c) >= d(a, c) - r(x), so
x cannot change if that is >= q(x) = dist(x) / w(x). A cluster keeps h >=
max over its points of r + q and is skipped unread when d(a, c) >= h;
founders (a net of centres at the current radius) keep g >= max over their
centres of d(founder, a) + h and skip whole groups. Where most points get
through (high intrinsic dimension, e.g. real patch features), a flat pass
runs instead: distances in the leading principal axes of x bound the full
ones from below at a fraction of the bytes, then all axes, and only points
that neither clears are computed. Points at dist 0 never change and leave.

Exactness. Computed points use the arithmetic of the float32 numpy
reference ``_testutil.numpy_greedy_kcenter`` (difference, square, numpy's
row sum, sqrt, times w, minimum); numpy rounds each row on its own, so
their values are bit-identical. A point is skipped only if a lower bound L
on its exact distance has L (1 - tau) - eps >= q (1 + tau): the float32
distance is within a relative (d + 4) 2^-24 / 2 < tau (plus underflow <
eps) of the exact one, so its float32 product with w is >= dist and min()
keeps dist bit for bit. Every bound carries its own rounding term (float32
centre distances, projection, centring, dot products), so after every pick
dist equals the reference's array and argmax picks the same index, ties
and duplicates included. The XLA paths (``kcenter_reference`` too) round
some distances an ulp differently: they agree on every pick unless two
candidates are within an ulp.

Memory: x, its projection (same size), (M,) vectors and two (n_select, d)
float32 tables; no M x n array.
"""

from __future__ import annotations

import math

import numpy as np

from softpatch_jax.kernels import kcenter

_U32 = 2.0**-24  # float32 unit roundoff
_TAU = 1e-4  # relative safety margin of every skip
_EPS_REL = 1e-6  # absolute margin, times the largest centred norm
_BLOCK = 2048  # rows per block of the exact pass (temporaries stay cached)
_MATVEC_ROWS = 4096
_FLAT_FRACTION = 0.05  # more candidates: flat passes for a while
_PROJ_SHARE = 0.8  # variance kept by the flat pass's projection
_FOUNDER_RADIUS = 2.0  # times the current radius
_REFOUND_FROM = 32  # regroup the centres at t = 32, 64, 128, ...


def _validate(x, n_select, start_idx, sampling_weight, first):
  """kcenter.kcenter's checks (and messages), returning numpy arrays."""
  # pylint: disable-next=protected-access
  x, n_select, start_idx, w = kcenter._validate(
      x, n_select, start_idx, sampling_weight, "kcenter_pruned"
  )
  m = x.shape[0]
  # pylint: disable-next=protected-access
  first = kcenter._check_first(first, m, "kcenter_pruned")
  start_idx = np.asarray(start_idx).astype(np.int64)
  if np.any(start_idx < -m) or np.any(start_idx >= m):
    raise ValueError(f"kernels.kcenter_pruned: start_idx not in [0, {m})")
  first = None if first is None else int(first)
  return np.ascontiguousarray(x), n_select, start_idx % m, np.asarray(w), first


def exact_distance(x, c, rows=None):
  """float32 d(x[rows], c) with the numpy reference's arithmetic.

  Difference, square, numpy's sum over each row, sqrt: the same values bit
  for bit as np.sqrt(((x - c) ** 2).sum(1)) on all of x (numpy sums each
  row on its own), computed in cache-sized blocks without a copy of x.
  """
  k = x.shape[0] if rows is None else len(rows)
  out = np.empty((k,), np.float32)
  for s in range(0, k, _BLOCK):
    if rows is None:
      b = x[s : s + _BLOCK] - c
    else:
      b = x[rows[s : s + _BLOCK]]
      np.subtract(b, c, out=b)
    np.multiply(b, b, out=b)
    np.sqrt(np.add.reduce(b, axis=1), out=out[s : s + len(b)])
  return out


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


def _ranges(starts, lens):
  """Concatenation of arange(s, s + l) over (starts, lens)."""
  lens = lens.astype(np.int64)
  excl = np.cumsum(lens) - lens
  return np.repeat(starts - excl, lens) + np.arange(int(lens.sum()))


def _dist32(rows, c):
  """float32 distances to c (one point, or one per row) as float64."""
  diff = rows - c
  return np.sqrt(np.einsum("ij,ij->i", diff, diff)).astype(np.float64)


class _Greedy:
  """State of the pruned greedy loop; see the module docstring."""

  def __init__(self, x, w, dist, n_select):
    m, d = x.shape
    self.x, self.w, self.dist, self.m = x, w, dist, m
    delta = (d + 4) * _U32  # >= twice the relative error of a float32 d
    self.tau = max(_TAU, 2.0 * delta)
    self._project(x)
    # Underflow of tiny squares moves a float32 distance by < eta; eps
    # covers eta and the float64 rounding of the bounds themselves.
    self.eta = 2.0 * math.sqrt(d * 2.0**-150)
    self.eps = _EPS_REL * self.scale + 2.0 * self.eta
    # For a float32 distance D_f: D_f lo_rel - eta <= d <= D_f up_rel + eta.
    self.lo_rel, self.up_rel = 1.0 - 2.0 * delta, 1.0 + 2.0 * delta
    # Per point: its cluster (-1: dist 0, never changes again), an upper
    # bound on the distance to that centre, nu_q and a_half (_set_nu_q).
    self.assign = np.where(dist > 0, 0, -1)
    self.r_up = np.full((m,), np.inf)
    self.nu_q = np.zeros((m,))
    self.a_half = np.full((m,), np.inf)
    self._set_nu_q(np.flatnonzero(dist > 0))
    # Cluster members as segments of one pool (valid while self.pooled).
    self.pooled, self.flat_until, self.wait = False, 1, 4
    self.pool, self.end = np.zeros((2 * m,), np.int64), 0
    self.off, self.cnt = np.zeros((2, n_select), np.int64)
    self.h = np.full((n_select,), -np.inf)  # >= max of nu_q + r_up
    self.cent = np.zeros((n_select, d), np.float32)
    # Founders head groups of centres; g >= max over a group of rho_up + h.
    self.fcent, self.n_f = np.zeros((n_select, d), np.float32), 0
    self.sup_of = np.zeros((n_select,), np.int64)
    self.rho_up = np.zeros((n_select,))  # >= d(founder, centre)
    self.g = np.full((n_select,), -np.inf)
    self.q_pick = np.zeros((n_select,))  # about the radius at each pick

  def _project(self, x):
    """y = (x - mean) V on the principal axes, with its error terms.

    ||V^T z|| <= sigma ||z|| for any V, so distances between rows of y
    bound those of x from below (_flat_update) once rounding is accounted
    for: centring (c_err), y's matmul (proj_err) and the dot products
    (dot_err). Any V is valid; with the principal axes of a row sample the
    first k columns (y1, _PROJ_SHARE of the variance) give most of it.
    """
    m, d = x.shape
    mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sub = (x[:: max(1, m // 20_000)] - mu).astype(np.float64)
    lam, v = np.linalg.eigh(sub.T @ sub)
    share = np.cumsum(lam[::-1]) / max(float(lam.sum()), 1e-300)
    k = min(d, -(-(int(np.sum(share < _PROJ_SHARE)) + 1) // 8) * 8)
    v = v[:, ::-1].astype(np.float32)
    gram = v.T.astype(np.float64) @ v
    self.sigma = math.sqrt(1.0 + np.linalg.norm(gram - np.eye(d))) + 1e-12
    self.y1 = np.empty((m, k), np.float32)
    self.y2, nx_max = np.empty((m, d - k), np.float32), 0.0
    for s in range(0, m, _BLOCK):
      xc = x[s : s + _BLOCK] - mu  # the centred rows the bounds refer to
      np.matmul(xc, v[:, :k], out=self.y1[s : s + _BLOCK])
      np.matmul(xc, v[:, k:], out=self.y2[s : s + _BLOCK])
      nx_max = max(nx_max, float(np.einsum("ij,ij->i", xc, xc).max()))
    self.ny1 = np.einsum("ij,ij->i", self.y1, self.y1, dtype=np.float64)
    ny2 = np.einsum("ij,ij->i", self.y2, self.y2, dtype=np.float64)
    self.ny = self.ny1 + ny2
    self.scale = math.sqrt(nx_max) * 1.001  # >= every centred norm
    self.c_err = 2.0001 * _U32 * self.scale
    # (proj_err, dot_err) of the first k axes and of all d.
    tr = np.cumsum(np.diag(gram)) * 1.001  # ||V[:, :j]||_F^2
    pe = 2.02 * (d + 2) * _U32 * self.scale
    self.errs = [
        (pe * math.sqrt(tr[j - 1]), (j + 2) * 1.01 * _U32 + 1e-13)
        for j in (k, d)
    ]
    self.dot_buf = np.empty((m,), np.float32)

  def _set_nu_q(self, pts):
    q = self.dist[pts].astype(np.float64) / self.w[pts]
    self.nu_q[pts] = (q * (1 + self.tau) + self.eps) / (1 - self.tau)
    self.a_half[pts] = self._a_half(pts, self.ny1, *self.errs[0])

  def _a_half(self, pts, ny, proj_err, dot_err):
    # x cannot change while its exact distance to c is >= nu_q; in the
    # projection that holds when ||y_x - y_c|| >= lim, i.e. when
    # y_x . y_c <= a_half + ny_c (1 - dot_err) / 2.
    lim = (self.nu_q[pts] + self.c_err) * self.sigma + proj_err
    return (ny[pts] * (1 - dot_err) - lim * lim) / 2

  def run(self, n_select, first):
    sel = np.zeros((n_select,), np.int32)
    for t in range(n_select):
      i = first if t == 0 and first is not None else int(np.argmax(self.dist))
      sel[t] = i
      if t + 1 < n_select:
        if t >= _REFOUND_FROM and t & (t - 1) == 0:
          self._refound(t)
        self._add_centre(t, i)
    return sel

  def _add_centre(self, t, i):
    c = self.cent[t] = self.x[i]
    q_c = self.q_pick[t] = self.nu_q[i]  # read before the update
    if not self.pooled and t >= self.flat_until:
      self._rebuild(t)
    dsup = _dist32(self.fcent[: self.n_f], c)
    if self.pooled:
      cand, pooled_state = self._candidates(t, c, dsup)
      if len(cand) > _FLAT_FRACTION * self.m:
        # Pruning is not paying: flat passes for a while, twice as long
        # after each failed try (the pool goes stale and is rebuilt).
        self.pooled, self.flat_until = False, t + self.wait
        self.wait *= 2
      else:
        self.wait = 4
    if self.pooled:
      self._exact_update(t, i, cand)
      self._maintain(t, *pooled_state)
    else:
      self._flat_update(t, i)
    # File c under its nearest founder, or make it one when that is
    # farther than the current radius (a net at the scale of the clusters).
    s = int(np.argmin(dsup)) if len(dsup) else -1
    if s < 0 or dsup[s] > _FOUNDER_RADIUS * q_c:
      f = self.n_f
      self.fcent[f] = c
      self.sup_of[t], self.rho_up[t], self.g[f] = f, 0.0, self.h[t]
      self.n_f += 1
    else:
      self.sup_of[t] = s
      self.rho_up[t] = dsup[s] * self.up_rel + self.eta
      self.g[s] = max(self.g[s], self.rho_up[t] + self.h[t])

  def _candidates(self, t, c, dsup):
    """Points of the pool that the triangle bounds cannot clear."""
    # Founder p skips its centres k if d(p, c) - rho_up(k) >= h(k).
    dsup_lo = dsup * self.lo_rel - self.eta
    live_f = dsup_lo < self.g[: self.n_f]
    kf = np.flatnonzero(live_f[self.sup_of[:t]])
    kf = kf[self.cnt[kf] > 0]
    ks = kf[dsup_lo[self.sup_of[kf]] < self.rho_up[kf] + self.h[kf]]
    # Cluster k is skipped if d(k, c) >= h(k).
    dk = _dist32(self.cent[ks], c) * self.lo_rel - self.eta
    live = dk < self.h[ks]
    lc, lens = ks[live], self.cnt[ks[live]]
    idx = self.pool[_ranges(self.off[lc], lens)]
    # Point x is skipped if d(a, c) - r_up(x) >= nu_q(x).
    need = self.nu_q[idx] + self.r_up[idx]
    keep = np.flatnonzero(np.repeat(dk[live], lens) < need)
    return idx[keep], (live_f, kf, lc, lens, idx)

  def _flat_update(self, t, i):
    """All points: bounds on the first k axes, on all d, then exact."""
    if t == 0:  # every point gets an upper bound r_up (pooled mode needs it)
      pts = np.flatnonzero(self.assign >= 0)
    else:
      dots = self._dots(self.y1, i)
      ny_c = self.ny1[i] * (1 - self.errs[0][1]) / 2
      pts = np.flatnonzero(dots > self.a_half + ny_c)
      if self.y2.shape[1] and len(pts):
        full = dots[pts].astype(np.float64)  # before dot_buf is reused
        if len(pts) > self.m // 8:
          full += self._dots(self.y2, i)[pts]
        else:
          full += self.y2[pts] @ self.y2[i]
        ny_c = self.ny[i] * (1 - self.errs[1][1]) / 2
        pts = pts[full > self._a_half(pts, self.ny, *self.errs[1]) + ny_c]
    self._new_cluster_bound(t, self._exact_update(t, i, pts))

  def _exact_update(self, t, i, pts):
    """dist = min(dist, d(x, c) w) on pts; returns those moved to cluster t."""
    dn = exact_distance(self.x, self.x[i], pts)
    old = self.dist[pts]
    new = np.minimum(old, dn * self.w[pts])
    self.dist[pts] = new
    self._set_nu_q(pts[new < old])
    up = dn * self.up_rel + self.eta
    go = up < self.r_up[pts]
    self.r_up[pts[go]] = up[go]
    self.assign[pts[go]] = t
    gone = pts[new == 0]  # can never change again
    self.assign[gone] = -1
    self.a_half[gone] = np.inf
    return pts[go & (new > 0)]

  def _new_cluster_bound(self, t, mem):
    self.h[t] = np.max(self.nu_q[mem] + self.r_up[mem], initial=-np.inf)

  def _dots(self, y, i):
    # Row blocks: OpenBLAS runs a small matvec on one thread, which on
    # busy machines beats one large threaded call by 2x.
    out, c, n = self.dot_buf, y[i], _MATVEC_ROWS
    for s in range(0, self.m, n):
      np.matmul(y[s : s + n], c, out=out[s : s + n])
    return out

  def _maintain(self, t, live_f, kf, lc, lens, idx):
    """Pool and founder bounds after a pooled update."""
    movers = np.flatnonzero(self.assign[idx] == t)
    self._new_cluster_bound(t, idx[movers])
    if self.end + len(movers) > len(self.pool):
      self._rebuild(t + 1)
    else:
      # Stayers are compacted to the front of their segment, h recomputed.
      stay = self.assign[idx] == np.repeat(lc, lens)
      heads = np.cumsum(lens) - lens
      cs = np.cumsum(stay)
      before = np.repeat(cs[heads] - stay[heads], lens)
      dest = np.repeat(self.off[lc], lens) + (cs - 1 - before)
      self.pool[dest[stay]] = idx[stay]
      if len(lc):
        self.cnt[lc] = np.add.reduceat(stay.astype(np.int64), heads)
        vals = np.where(stay, self.nu_q[idx] + self.r_up[idx], -np.inf)
        self.h[lc] = np.maximum.reduceat(vals, heads)
      self.off[t], self.cnt[t] = self.end, len(movers)
      self.pool[self.end : self.end + len(movers)] = idx[movers]
      self.end += len(movers)
    self.g[: len(live_f)][live_f] = -np.inf
    np.maximum.at(self.g, self.sup_of[kf], self.rho_up[kf] + self.h[kf])

  def _rebuild(self, t):
    """Pool segments and exact h for clusters 0..t-1, from assign."""
    act = np.flatnonzero(self.assign >= 0)
    order = act[np.argsort(self.assign[act], kind="stable")]
    self.cnt[:t] = np.bincount(self.assign[act], minlength=t)
    self.off[:t] = np.cumsum(self.cnt[:t]) - self.cnt[:t]
    self.end = len(order)
    self.pool[: self.end] = order
    nz = np.flatnonzero(self.cnt[:t])
    self.h[:t] = -np.inf
    if len(nz):
      vals = self.nu_q[order] + self.r_up[order]
      self.h[nz] = np.maximum.reduceat(vals, self.off[nz])
    self.pooled = True
    self._regroup_bounds(t)

  def _regroup_bounds(self, t):
    self.g[:] = -np.inf
    np.maximum.at(self.g, self.sup_of[:t], self.rho_up[:t] + self.h[:t])

  def _refound(self, t):
    """Regroups centres 0..t-1 under founders at today's scale.

    Founders: the centres picked while the radius was above _FOUNDER_RADIUS
    times today's; every centre joins its (roughly) nearest founder.
    """
    f_ids = np.flatnonzero(
        self.q_pick[:t] > _FOUNDER_RADIUS * self.q_pick[t - 1]
    )[: max(1, t // 4)]
    if not len(f_ids):
      f_ids = np.zeros((1,), np.int64)
    n_f = self.n_f = len(f_ids)
    fc = self.fcent[:n_f] = self.cent[f_ids]
    half_norm = 0.5 * np.einsum("ij,ij->i", fc, fc)
    sup = np.empty((t,), np.int64)
    step = max(1, (1 << 20) // n_f)
    for s in range(0, t, step):
      e = min(s + step, t)
      sup[s:e] = np.argmin(half_norm - self.cent[s:e] @ fc.T, 1)
    sup[f_ids] = np.arange(n_f)
    rho = _dist32(self.cent[:t], self.fcent[sup])  # row by row
    self.sup_of[:t], self.rho_up[:t] = sup, rho * self.up_rel + self.eta
    self.rho_up[f_ids] = 0.0
    self._regroup_bounds(t)


def kcenter_pruned(
    x, n_select: int, start_idx, sampling_weight=None, *, first=None
):
  """Weighted greedy k-center, exact, with triangle-inequality pruning.

  A numpy host loop with a fixed cost per pick: it pays off for large M
  (tens of thousands of points and up); small inputs run faster dense.

  Args:
    x: (M, d) features.
    n_select: number of centres to pick.
    start_idx: (S,) int indices of the random starting points.
    sampling_weight: (M,) weights >= 0 (1 clean, 0 noise) or None (ones).
    first: None or an int index forced as the first pick.

  Returns:
    (n_select,) int32 numpy indices into x in selection order, identical
    to the float32 numpy reference (see the module docstring).
  """
  x, n_select, start_idx, w, first = _validate(
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
  return _Greedy(x, w, dist, n_select).run(n_select, first)
