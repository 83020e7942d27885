"""kernels.kcenter: every path against a plain numpy weighted greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax.kernels import kcenter


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


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (0, 500, 16, 60, None, 0),
        (1, 777, 32, 100, 0.15, 20),
        (2, 300, 8, 80, 0.5, 50),
        (3, 40, 5, 40, 0.3, 5),  # selects past the clean points
        (4, 1, 3, 3, None, 0),
    ],
)
def test_xla_and_reference_match_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  for impl in ("xla", "reference"):
    got = np.asarray(kcenter.kcenter(x, n_sel, starts, w, impl=impl))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want, err_msg=impl)
  if w is not None:
    # Noise patches are never chosen while a clean point is still away
    # (n_clean - 1: duplicated clean points can reach distance 0 early).
    n_clean = int((w > 0).sum())
    assert np.all(w[got[: min(n_sel, n_clean - 1)]] > 0) or n_clean == 0


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (5, 200, 8, 12, 0.2, 10),
        (6, 70, 4, 9, None, 0),
    ],
)
def test_pallas_interpret_matches_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w)
  got = np.asarray(
      kcenter.kcenter(x, n_sel, starts, w, impl="pallas_interpret")
  )
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "seed,m,d,n_sel,noise,dup",
    [
        (10, 200, 8, 30, 0.3, 20),
        (11, 333, 16, 50, None, 0),
        (12, 57, 3, 57, 0.5, 10),  # selects past the clean points
        (13, 90, 5, 1, 0.2, 0),
        (14, 1, 2, 2, None, 0),
    ],
)
def test_forced_first_matches_numpy(seed, m, d, n_sel, noise, dup):
  x, w, starts = _data(seed, m, d, noise, dup)
  rng = np.random.default_rng(seed + 100)
  firsts = rng.choice(m, size=min(m, 3), replace=False).tolist()
  if w is not None and (w == 0).any():
    firsts.append(int(np.flatnonzero(w == 0)[0]))  # a zero-weight point
  for first in firsts:
    want = _testutil.numpy_greedy_kcenter(x, n_sel, starts, w, first=first)
    assert want[0] == first
    for impl in ("xla", "reference", "pallas_interpret"):
      got = np.asarray(
          kcenter.kcenter(x, n_sel, starts, w, impl=impl, first=first)
      )
      np.testing.assert_array_equal(got, want, err_msg=f"{impl} {first}")
    got = np.asarray(
        kcenter.kcenter_reference(x, n_sel, starts, w, first=first)
    )
    np.testing.assert_array_equal(got, want)


def test_forced_first_traced_and_default_unchanged():
  x, w, starts = _data(15, 150, 6, 0.2, 10)
  run = jax.jit(
      lambda f: kcenter.kcenter(x, 20, starts, w, impl="xla", first=f)
  )
  for first in (0, 7, 149):
    np.testing.assert_array_equal(
        np.asarray(run(jnp.int32(first))),
        _testutil.numpy_greedy_kcenter(x, 20, starts, w, first=first),
    )
  # first = the default first pick gives the default sequence.
  default = np.asarray(kcenter.kcenter(x, 20, starts, w))
  same = np.asarray(kcenter.kcenter(x, 20, starts, w, first=int(default[0])))
  np.testing.assert_array_equal(same, default)
  np.testing.assert_array_equal(
      default, _testutil.numpy_greedy_kcenter(x, 20, starts, w)
  )


def test_duplicates_are_not_reselected():
  x, _, starts = _data(7, 100, 6, None, 0)
  x = np.concatenate([x, x[:30]])  # 30 exact copies
  sel = np.asarray(kcenter.kcenter(x, 90, starts))
  np.testing.assert_array_equal(
      sel, _testutil.numpy_greedy_kcenter(x, 90, starts, None)
  )
  # A copy of a picked point has distance 0: never picked while others remain.
  rows = {tuple(r) for r in x[sel]}
  assert len(rows) == len(sel)


def test_bf16_storage_runs_and_mostly_agrees():
  x, w, starts = _data(8, 600, 32, 0.1, 0)
  a = np.asarray(kcenter.kcenter(x, 50, starts, w, impl="xla"))
  b = np.asarray(
      kcenter.kcenter(x, 50, starts, w, impl="xla", storage_dtype=jnp.bfloat16)
  )
  assert len(set(b.tolist())) == 50 and np.all(w[b] > 0)
  assert len(set(a.tolist()) & set(b.tolist())) >= 25


def test_errors():
  x = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="sampling_weight"):
    kcenter.kcenter(x, 2, np.array([0]), np.ones(9))
  with pytest.raises(ValueError, match="start_idx"):
    kcenter.kcenter(x, 2, np.array([], np.int32))
  with pytest.raises(ValueError, match="rank 2"):
    kcenter.kcenter(x[None], 2, np.array([0]))
  assert kcenter.kcenter(x, 0, np.array([0])).shape == (0,)
  assert kcenter.kcenter(x, 0, np.array([0]), first=3).shape == (0,)
  with pytest.raises(ValueError, match="first=10"):
    kcenter.kcenter(x, 2, np.array([0]), first=10)
  with pytest.raises(ValueError, match="first=-1"):
    kcenter.kcenter_reference(x, 2, np.array([0]), first=-1)
  with pytest.raises(ValueError, match="scalar integer"):
    kcenter.kcenter(x, 2, np.array([0]), first=np.array([1, 2]))
  with pytest.raises(ValueError, match="scalar integer"):
    kcenter.kcenter(x, 2, np.array([0]), first=1.0)
