"""kernels.kcenter: every path against a plain numpy weighted greedy."""
import numpy as np
import pytest
import jax.numpy as jnp

from softpatch_jax import kernels


def _np_greedy(x, n_select, starts, w):
  """The contract, written directly in float32 numpy."""
  x = np.asarray(x, np.float32)
  w = np.ones(len(x), np.float32) if w is None else np.asarray(w, np.float32)

  def dist_to(i):
    diff = x - x[i]
    return np.sqrt((diff * diff).sum(1))

  acc = np.zeros(len(x), np.float32)
  for s in starts:
    acc = acc + dist_to(s)
  dist = acc / np.float32(len(starts)) * w
  sel = []
  for _ in range(n_select):
    i = int(np.argmax(dist))
    sel.append(i)
    dist = np.minimum(dist, dist_to(i) * w)
  return np.array(sel, np.int32)


def _data(seed, m, d, noise_frac, n_dup):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, d)).astype(np.float32)
  if n_dup:
    src = rng.choice(m, n_dup, replace=False)
    dst = rng.choice(m, n_dup, replace=False)
    x[dst] = x[src]
  w = None
  if noise_frac is not None:
    w = (rng.random(m) >= noise_frac).astype(np.float32)
  starts = rng.choice(m, size=min(m, 5), replace=False)
  return x, w, starts


@pytest.mark.parametrize("seed,m,d,n_sel,noise,dup", [
    (0, 500, 16, 60, None, 0),
    (1, 777, 32, 100, 0.15, 20),
    (2, 300, 8, 80, 0.5, 50),
    (3, 40, 5, 40, 0.3, 5),     # selects past the clean points
    (4, 1, 3, 3, None, 0),
])
def test_xla_and_reference_match_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _np_greedy(x, n_sel, starts, w)
  for impl in ("xla", "reference"):
    got = np.asarray(kernels.kcenter(x, n_sel, starts, w, impl=impl))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want, err_msg=impl)
  if w is not None:
    # Noise patches are never chosen while a clean point is still away
    # (n_clean - 1: duplicated clean points can reach distance 0 early).
    n_clean = int((w > 0).sum())
    assert np.all(w[got[:min(n_sel, n_clean - 1)]] > 0) or n_clean == 0


@pytest.mark.parametrize("seed,m,d,n_sel,noise,dup", [
    (5, 200, 8, 12, 0.2, 10),
    (6, 70, 4, 9, None, 0),
])
def test_pallas_interpret_matches_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _np_greedy(x, n_sel, starts, w)
  got = np.asarray(kernels.kcenter(x, n_sel, starts, w,
                                   impl="pallas_interpret"))
  np.testing.assert_array_equal(got, want)


def test_duplicates_are_not_reselected():
  x, _, starts = _data(7, 100, 6, None, 0)
  x = np.concatenate([x, x[:30]])  # 30 exact copies
  sel = np.asarray(kernels.kcenter(x, 90, starts))
  np.testing.assert_array_equal(sel, _np_greedy(x, 90, starts, None))
  # A copy of a picked point has distance 0: never picked while others remain.
  rows = {tuple(r) for r in x[sel]}
  assert len(rows) == len(sel)


def test_bf16_storage_runs_and_mostly_agrees():
  x, w, starts = _data(8, 600, 32, 0.1, 0)
  a = np.asarray(kernels.kcenter(x, 50, starts, w, impl="xla"))
  b = np.asarray(kernels.kcenter(x, 50, starts, w, impl="xla",
                                 storage_dtype=jnp.bfloat16))
  assert len(set(b.tolist())) == 50 and np.all(w[b] > 0)
  assert len(set(a.tolist()) & set(b.tolist())) >= 25


def test_errors():
  x = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="sampling_weight"):
    kernels.kcenter(x, 2, np.array([0]), np.ones(9))
  with pytest.raises(ValueError, match="start_idx"):
    kernels.kcenter(x, 2, np.array([], np.int32))
  with pytest.raises(ValueError, match="rank 2"):
    kernels.kcenter(x[None], 2, np.array([0]))
  assert kernels.kcenter(x, 0, np.array([0])).shape == (0,)
