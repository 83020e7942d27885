"""kernels.kcenter_pruned: identical picks to the float32 references."""

import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import kcenter
from softpatch_jax.kernels import kcenter_pruned


def _weights(rng, kind, m):
  if kind is None:
    return None
  if kind == "binary":
    return (rng.random(m) >= rng.uniform(0, 0.9)).astype(np.float32)
  if kind == "unit":  # in (0, 1]
    return (1.0 - rng.random(m)).astype(np.float32)
  if kind == "zero":
    return np.zeros((m,), np.float32)
  raise ValueError(kind)


def _case(seed, kind, wkind, max_m=2500):
  rng = np.random.default_rng(seed)
  m = int(rng.integers(1, max_m))
  d = int(rng.integers(1, 65))
  x = _testutil.points(rng, kind, m, d).astype(np.float32)
  w = _weights(rng, wkind, m)
  starts = rng.choice(m, size=int(rng.integers(1, min(m, 6) + 1)))
  n_sel = int(rng.integers(0, min(m, 400) + 1))
  return x, n_sel, starts, w


def _numpy_with_first(x, n_select, start_idx, w, first):
  """_testutil.numpy_greedy_kcenter with the first pick forced."""
  w = np.ones(len(x), np.float32) if w is None else w

  def d(i):
    return np.sqrt(((x - x[i]) * (x - x[i])).sum(1))

  acc = np.zeros(len(x), np.float32)
  for s in start_idx:
    acc = acc + d(int(s))
  dist = acc / np.asarray(len(start_idx), np.float32) * w
  sel = []
  for t in range(n_select):
    i = first if t == 0 else int(np.argmax(dist))
    sel.append(i)
    dist = np.minimum(dist, d(i) * w)
  return np.array(sel, np.int32)


CASES = [
    (seed, kind, wkind)
    for seed, (kind, wkind) in enumerate([
        ("gauss", None),
        ("gauss", "binary"),
        ("gauss", "unit"),
        ("clustered", None),
        ("clustered", "binary"),
        ("clustered", "unit"),
        ("clustered", "binary"),
        ("duplicates", None),
        ("duplicates", "binary"),
        ("grid", None),
        ("grid", "unit"),
        ("offset", "binary"),
        ("gauss", "zero"),
    ])
]


@pytest.mark.parametrize("seed,kind,wkind", CASES)
def test_same_picks_as_numpy_and_reference(seed, kind, wkind):
  x, n_sel, starts, w = _case(seed, kind, wkind)
  got = kcenter_pruned.kcenter_pruned(x, n_sel, starts, w)
  assert isinstance(got, np.ndarray) and got.dtype == np.int32
  want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  np.testing.assert_array_equal(got, want)
  ref = np.asarray(kcenter.kcenter_reference(x, n_sel, starts, w))
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("seed", range(100, 112))
def test_many_small_cases_match_numpy(seed):
  kinds = ["gauss", "clustered", "duplicates", "grid", "offset"]
  wkinds = [None, "binary", "unit", "zero"]
  rng = np.random.default_rng(seed)
  kind = kinds[int(rng.integers(len(kinds)))]
  wkind = wkinds[int(rng.integers(len(wkinds)))]
  x, n_sel, starts, w = _case(seed, kind, wkind, max_m=300)
  np.testing.assert_array_equal(
      kcenter_pruned.kcenter_pruned(x, n_sel, starts, w),
      _testutil.numpy_greedy_kcenter(x, n_sel, starts, w),
      err_msg=f"{kind} {wkind} {x.shape} n={n_sel}",
  )


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  # Small hot sets and blocks, so these small inputs go through many hot
  # sets, catch-ups and blocked products (the defaults suit ~1e5 points).
  monkeypatch.setattr(kcenter_pruned, "_HOT_MIN", 8)
  monkeypatch.setattr(kcenter_pruned, "_HOT_FRACTION", 0.05)
  monkeypatch.setattr(kcenter_pruned, "_CENTRES", 7)
  monkeypatch.setattr(kcenter_pruned, "_PRODUCT", 300)


@pytest.mark.parametrize("seed", range(6))
def test_dist_is_exact_on_the_hot_set_after_every_pick(monkeypatch, seed):
  # Low dimensions make the projection bounds nearly tight, so a bound
  # that skips a pair it should not shows up in dist at once.
  rng = np.random.default_rng(seed)
  m, d = 1500, [1, 2, 5][seed % 3]
  x = (rng.normal(size=(40, d)) * 10)[rng.integers(0, 40, m)]
  x = x + rng.normal(size=(m, d))
  x = (np.round(x) if seed >= 3 else x).astype(np.float32)
  w = (1.0 - rng.random(m) * (seed % 2)).astype(np.float32)
  starts = rng.choice(m, 3)

  def dist_to(i):
    return np.sqrt(((x - x[i]) * (x - x[i])).sum(1))

  ref = sum(dist_to(s) for s in starts) / np.float32(3) * w
  update = kcenter_pruned._Greedy._hot_update  # pylint: disable=protected-access
  seen = set()

  def checked(state, i, hot, y1, a_half):
    nonlocal ref
    update(state, i, hot, y1, a_half)
    ref = np.minimum(ref, dist_to(i) * w)
    np.testing.assert_array_equal(state.dist[hot], ref[hot])
    assert np.all(state.dist >= ref)  # cold points: upper bounds ...
    cold = np.ones(m, bool)
    cold[hot] = False
    assert np.all(state.dist[cold] < state.hot_theta)  # ... below theta
    np.testing.assert_array_equal(a_half, state.a_half[hot])
    seen.add(len(hot))

  monkeypatch.setattr(kcenter_pruned._Greedy, "_hot_update", checked)
  got = kcenter_pruned.kcenter_pruned(x, 600, starts, w)
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(x, 600, starts, w)
  )
  assert len(seen) > 5  # many hot sets, each brought up to date


def test_selects_every_point_of_a_clustered_set():
  # n = M: the run ends where every remaining distance is 0 (the hot set
  # is then every point and picks repeat index 0).
  x, _, starts, w = _case(7, "clustered", "binary", max_m=1200)
  m = len(x)
  for n_sel in (m, m + 5):
    np.testing.assert_array_equal(
        kcenter_pruned.kcenter_pruned(x, n_sel, starts, w),
        _testutil.numpy_greedy_kcenter(x, n_sel, starts, w),
    )


@pytest.mark.parametrize("hot_min", [2048, 1])
def test_default_and_tiny_hot_sets(monkeypatch, hot_min):
  monkeypatch.setattr(kcenter_pruned, "_HOT_MIN", hot_min)
  monkeypatch.setattr(kcenter_pruned, "_HOT_FRACTION", 1 / 8)
  monkeypatch.setattr(kcenter_pruned, "_CENTRES", 2048)
  monkeypatch.setattr(kcenter_pruned, "_PRODUCT", 1 << 18)
  rng = np.random.default_rng(11)
  x = _testutil.points(rng, "clustered", 3000, 24).astype(np.float32)
  w = _weights(rng, "binary", 3000)
  np.testing.assert_array_equal(
      kcenter_pruned.kcenter_pruned(x, 700, [5, 9], w),
      _testutil.numpy_greedy_kcenter(x, 700, [5, 9], w),
  )


def test_more_picks_than_positive_weights():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(60, 4)).astype(np.float32)
  w = np.zeros(60, np.float32)
  w[rng.choice(60, 7, replace=False)] = 1.0
  got = kcenter_pruned.kcenter_pruned(x, 20, [1, 2], w)
  np.testing.assert_array_equal(
      got, _testutil.numpy_greedy_kcenter(x, 20, [1, 2], w)
  )
  assert set(got[:7].tolist()) == set(np.flatnonzero(w).tolist())
  np.testing.assert_array_equal(got[7:], 0)  # all at 0: first index


def test_all_zero_weights_pick_index_zero():
  x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
  got = kcenter_pruned.kcenter_pruned(x, 5, [4], np.zeros(30))
  np.testing.assert_array_equal(got, np.zeros(5, np.int32))


def test_grid_ties_with_a_single_start():
  g = np.stack(np.meshgrid(*[np.arange(5)] * 2), -1).reshape(-1, 2)
  x = np.concatenate([g, g[::-1]]).astype(np.float32)  # every point twice
  for start in ([12], [0], [49]):
    got = kcenter_pruned.kcenter_pruned(x, 30, start)
    np.testing.assert_array_equal(
        got, _testutil.numpy_greedy_kcenter(x, 30, start)
    )
    np.testing.assert_array_equal(
        got, np.asarray(kcenter.kcenter_reference(x, 30, start))
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_first(seed):
  x, _, starts, w = _case(seed + 20, "clustered", "binary", max_m=800)
  rng = np.random.default_rng(seed)
  n_sel = min(len(x), 50)
  for first in (0, int(rng.integers(len(x))), len(x) - 1):
    got = kcenter_pruned.kcenter_pruned(x, n_sel, starts, w, first=first)
    np.testing.assert_array_equal(
        got, _numpy_with_first(x, n_sel, starts, w, first)
    )
    ref = kcenter.kcenter_reference(x, n_sel, starts, w, first=first)
    np.testing.assert_array_equal(got, np.asarray(ref))
  # Forcing the pick the loop would make anyway changes nothing.
  plain = kcenter_pruned.kcenter_pruned(x, n_sel, starts, w)
  again = kcenter_pruned.kcenter_pruned(
      x, n_sel, starts, w, first=np.int64(plain[0])
  )
  np.testing.assert_array_equal(plain, again)


def test_exact_distance_rounds_like_the_reference():
  rng = np.random.default_rng(5)
  for m, d in [(1, 1), (7, 3), (300, 8), (3000, 17), (5000, 128)]:
    x = (rng.normal(size=(m, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    c = x[m // 2]
    full = np.sqrt(((x - c) * (x - c)).sum(1))
    np.testing.assert_array_equal(kcenter_pruned.exact_distance(x, c), full)
    rows = rng.choice(m, min(m, 777), replace=False)
    np.testing.assert_array_equal(
        kcenter_pruned.exact_distance(x, c, rows), full[rows]
    )


def test_inputs_outside_the_bounds_run_the_unpruned_loop():
  x = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
  w = np.ones(50, np.float32)
  w[3] = -1.0  # negative weight: no bound applies
  big = x * np.float32(1e16)  # squares near the float32 range
  nan = x.copy()
  nan[7, 1] = np.nan
  for xi, wi in [(x, w), (big, None), (nan, None)]:
    np.testing.assert_array_equal(
        kcenter_pruned.kcenter_pruned(xi, 10, [0], wi),
        _testutil.numpy_greedy_kcenter(xi, 10, [0], wi),
    )


def test_errors():
  x = np.zeros((10, 3), np.float32)
  f = kcenter_pruned.kcenter_pruned
  with pytest.raises(ValueError, match="sampling_weight"):
    f(x, 2, np.array([0]), np.ones(9))
  with pytest.raises(ValueError, match="start_idx"):
    f(x, 2, np.array([], np.int32))
  with pytest.raises(ValueError, match="start_idx"):
    f(x, 2, np.array([10]))
  with pytest.raises(ValueError, match="start_idx must be integer"):
    f(x, 2, np.array([0.0]))
  with pytest.raises(ValueError, match="rank 2"):
    f(x[None], 2, np.array([0]))
  with pytest.raises(ValueError, match="empty"):
    f(x[:0], 2, np.array([0]))
  with pytest.raises(ValueError, match="n_select"):
    f(x, -1, np.array([0]))
  with pytest.raises(ValueError, match="first"):
    f(x, 2, np.array([0]), first=10)
  with pytest.raises(ValueError, match="first"):
    f(x, 2, np.array([0]), first=np.array([1]))
  assert f(x, 0, np.array([0])).shape == (0,)
