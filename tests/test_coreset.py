"""softpatch_jax.coreset vs a plain numpy weighted greedy k-center."""

import logging

import jax
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import coreset


def _numpy_greedy(x, n, starts, w=None):
  return _testutil.numpy_greedy_kcenter(x, n, starts, w, dtype=np.float64)


def _compact_np(selection):
  return np.asarray(coreset.compact(selection))


def _greedy(*args, **kwargs):
  """The valid picks of coreset.greedy, as numpy."""
  return np.asarray(coreset.compact(coreset.greedy(*args, **kwargs)))


@pytest.mark.parametrize(
    "seed,m,d,n,starts",
    [
        (0, 60, 8, 12, 10),
        (1, 150, 16, 30, 10),
        (2, 40, 3, 39, 5),
        (3, 7, 4, 3, 10),
        (4, 200, 32, 20, 128),
    ],
)
def test_greedy_matches_numpy(seed, m, d, n, starts):
  x = np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)
  key = jax.random.PRNGKey(seed)
  got = _greedy(x, n, key, num_starts=starts)
  s = np.asarray(coreset.start_indices(m, starts, key))
  assert len(s) == min(starts, m) and len(set(s.tolist())) == len(s)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, _numpy_greedy(x, n, s))


@pytest.mark.parametrize(
    "seed,m,d,n", [(0, 80, 8, 15), (1, 120, 4, 30), (2, 50, 6, 10)]
)
def test_weighted_greedy_matches_numpy_and_skips_outliers(seed, m, d, n):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, d)).astype(np.float32)
  x[
      rng.choice(m, 10, replace=False)
  ] *= 10.0  # far outliers, which plain greedy would love
  w = (rng.random(m) > 0.3).astype(np.float32)
  w[np.argmax(np.linalg.norm(x, axis=1))] = (
      0.0  # the farthest point: an outlier
  )
  key = jax.random.PRNGKey(seed + 10)
  got = _greedy(x, n, key, sampling_weight=w)
  s = np.asarray(coreset.start_indices(m, 10, key))
  np.testing.assert_array_equal(got, _numpy_greedy(x, n, s, w))
  assert np.all(w[got] > 0)


def test_greedy_more_than_selectable(caplog):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((30, 5)).astype(np.float32)
  w = np.zeros(30, np.float32)
  w[[2, 5, 7, 11]] = 1.0
  with caplog.at_level(logging.WARNING):
    got = _greedy(x, 10, jax.random.PRNGKey(0), sampling_weight=w)
  assert "only 4 are selectable" in caplog.text
  np.testing.assert_array_equal(got, [2, 5, 7, 11])
  # Fraction 1.0 without weights keeps everything.
  np.testing.assert_array_equal(
      _greedy(x, 1.0, jax.random.PRNGKey(0)), np.arange(30)
  )


def test_greedy_duplicates_exhaust_distances(caplog):
  # 6 distinct clean points, each repeated; index 0 is an outlier. Asking for 10 picks
  # exhausts all positive distances after 6: no repeats, no outlier point.
  rng = np.random.default_rng(4)
  base = rng.standard_normal((6, 3)).astype(np.float32)
  x = np.concatenate([base[:1], base, base, base])  # 19 points
  w = np.ones(len(x), np.float32)
  w[0] = 0.0
  with caplog.at_level(logging.WARNING):
    got = _greedy(x, 10, jax.random.PRNGKey(1), sampling_weight=w)
  assert len(got) == len(set(got.tolist())) and np.all(w[got] > 0)
  rows = {tuple(r) for r in x[got]}
  assert len(rows) == 6 and len(got) >= 6  # every distinct clean point covered
  s = np.asarray(coreset.start_indices(len(x), 10, jax.random.PRNGKey(1)))
  ref = _numpy_greedy(x, 10, s, w)
  np.testing.assert_array_equal(got[:6], ref[:6])


def test_num_samples_and_errors():
  assert coreset.num_samples(1000, 0.1) == 100
  assert coreset.num_samples(784 * 3, 0.1) == int(784 * 3 * 0.1)
  assert coreset.num_samples(5, 0.01) == 1
  assert coreset.num_samples(7, 1.0) == 7
  for bad in (0.0, -0.1, 1.5, "0.1", None):
    with pytest.raises(ValueError, match="fraction"):
      coreset.num_samples(10, bad)
  x = np.zeros((10, 2), np.float32)
  with pytest.raises(ValueError, match="shape"):
    coreset.greedy(x[0], 2, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="nothing can be selected"):
    coreset.greedy(x, 2, jax.random.PRNGKey(0), sampling_weight=np.zeros(10))
  with pytest.raises(ValueError, match="sampling_weight"):
    coreset.greedy(x, 2, jax.random.PRNGKey(0), sampling_weight=np.ones(9))
  with pytest.raises(ValueError, match="n_select"):
    coreset.greedy(x, 0, jax.random.PRNGKey(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_and_identity(seed):
  key = jax.random.PRNGKey(seed)
  idx = _compact_np(coreset.random(50, 12, key))
  assert (
      idx.dtype == np.int32 and len(idx) == 12 and len(set(idx.tolist())) == 12
  )
  assert idx.min() >= 0 and idx.max() < 50
  np.testing.assert_array_equal(idx, _compact_np(coreset.random(50, 12, key)))
  assert len(_compact_np(coreset.random(50, 0.1, key))) == 5
  w = np.zeros(50, np.float32)
  w[::3] = 1
  idx = _compact_np(coreset.random(50, 10, key, sampling_weight=w))
  assert len(set(idx.tolist())) == 10 and np.all(w[idx] > 0)
  with pytest.raises(ValueError):
    coreset.random(5, 6, key)
  np.testing.assert_array_equal(_compact_np(coreset.identity(4)), [0, 1, 2, 3])


@pytest.mark.parametrize("case", ["plain", "weighted", "duplicates", "all"])
def test_greedy_jit_fixed_length_matches_eager(case):
  """Under jit: fixed length n, the same valid picks, invalid ones masked."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((40, 4)).astype(np.float32)
  w, n = None, 8
  if case == "weighted":
    w = (rng.random(40) > 0.4).astype(np.float32)
  elif case == "duplicates":
    x = np.concatenate([x[:3]] * 10 + [x[:1]])  # 3 distinct points
    w, n = np.ones(len(x), np.float32), 8
    w[-1] = 0.0
  elif case == "all":
    w = np.zeros(40, np.float32)
    w[[1, 4, 9]] = 1.0
  key = jax.random.PRNGKey(3)
  eager = _greedy(x, n, key, sampling_weight=w)
  idx, valid = jax.jit(
      lambda a, ww: coreset.greedy(a, n, key, sampling_weight=ww)
  )(x, w)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == valid.shape == (n,)
  np.testing.assert_array_equal(idx[valid], eager)
  if w is not None:
    assert np.all(w[idx] > 0)  # invalid slots repeat a valid pick


def test_greedy_explicit_starts_and_registry():
  rng = np.random.default_rng(12)
  x = rng.standard_normal((30, 3)).astype(np.float32)
  starts = np.array([4, 17], np.int32)
  got = _greedy(x, 6, starts=starts)
  np.testing.assert_array_equal(got, _numpy_greedy(x, 6, starts))
  assert coreset.get_subsampler("greedy") is coreset.greedy
  assert set(coreset.SUBSAMPLERS) >= {"greedy", "random", "identity"}
  with pytest.raises(ValueError, match="unknown subsampler 'nope'"):
    coreset.get_subsampler("nope")
  with pytest.raises(ValueError, match="PRNG key or explicit starts"):
    coreset.greedy(x, 3)


def test_identity_with_weights_keeps_positive_in_order():
  w = np.array([0, 1, 1, 0, 1], np.float32)
  idx, valid = coreset.identity(5, sampling_weight=w)
  assert np.asarray(idx).shape == (5,)
  np.testing.assert_array_equal(
      np.asarray(coreset.compact((idx, valid))), [1, 2, 4]
  )


def _quirk_case(seed, m=60, d=5, n_dup=8):
  """Points whose farthest-from-the-starts point has weight 0, duplicates."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, d)).astype(np.float32)
  x[rng.choice(m, 6, replace=False)] *= 6.0  # far outliers
  src = rng.choice(m, n_dup, replace=False)
  dst = rng.choice(m, n_dup, replace=False)
  x[dst] = x[src]  # exact duplicates: exact ties
  w = (rng.random(m) > 0.3).astype(np.float32)
  starts = rng.choice(m, 4, replace=False).astype(np.int32)
  d0 = _testutil.numpy_reference_sampler(x, 1, starts, np.ones(m))[0][0]
  w[d0] = 0.0  # the unweighted first pick is an outlier
  return x, w, starts, int(d0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unweighted_first_picks_the_far_outlier(seed):
  x, w, starts, far = _quirk_case(seed)
  idx, valid = coreset.greedy(
      x, 15, starts=starts, sampling_weight=w, unweighted_first=True
  )
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx[0] == far and valid[0] and w[far] == 0
  assert np.all(w[idx[1:][valid[1:]]] > 0)  # only the first can be an outlier
  # Without the flag the zero-weight point is never picked.
  plain, pvalid = coreset.greedy(x, 15, starts=starts, sampling_weight=w)
  assert far not in np.asarray(plain).tolist() and np.all(w[plain] > 0)
  assert np.asarray(pvalid).all()


@pytest.mark.parametrize(
    "seed,m,n,n_dup", [(0, 60, 15, 8), (1, 80, 30, 20), (2, 25, 24, 10)]
)
def test_unweighted_first_matches_numpy_reference_sampler(seed, m, n, n_dup):
  x, w, starts, _ = _quirk_case(seed, m=m, n_dup=n_dup)
  want, want_valid = _testutil.numpy_reference_sampler(x, n, starts, w)
  idx, valid = coreset.greedy(
      x, n, starts=starts, sampling_weight=w, unweighted_first=True
  )
  idx, valid = np.asarray(idx), np.asarray(valid)
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(idx[valid], want[want_valid])
  assert np.all(idx[~valid] == idx[0])  # invalid entries repeat the first
  # The same under jit (the first pick traced).
  jidx, jvalid = jax.jit(
      lambda a, ww: coreset.greedy(
          a, n, starts=starts, sampling_weight=ww, unweighted_first=True
      )
  )(x, w)
  np.testing.assert_array_equal(np.asarray(jidx), idx)
  np.testing.assert_array_equal(np.asarray(jvalid), valid)


def test_unweighted_first_tie_picks_the_outlier_copy():
  # The farthest point has an exact copy: the lower index (outlier) wins the
  # unweighted tie, and its clean copy then sits at distance 0.
  rng = np.random.default_rng(5)
  x = rng.standard_normal((30, 3)).astype(np.float32)
  x[4] = x[20] = 9.0
  w = np.ones(30, np.float32)
  w[4] = 0.0
  starts = np.array([0, 1, 2], np.int32)
  got = _greedy(x, 8, starts=starts, sampling_weight=w, unweighted_first=True)
  assert got[0] == 4 and 20 not in got.tolist()
  want, want_valid = _testutil.numpy_reference_sampler(x, 8, starts, w)
  np.testing.assert_array_equal(got, want[want_valid])
  plain = _greedy(x, 8, starts=starts, sampling_weight=w)
  assert plain[0] == 20 and 4 not in plain.tolist()


def test_unweighted_first_short_cut_and_no_weights():
  x, w, starts, far = _quirk_case(7, m=20, n_dup=0)
  # Every point requested: all clean points plus the first pick.
  got = _greedy(x, 20, starts=starts, sampling_weight=w, unweighted_first=True)
  np.testing.assert_array_equal(
      got, np.flatnonzero((w > 0) | (np.arange(20) == far))
  )
  # More than the clean points but not all: the loop runs, as the reference.
  n = int((w > 0).sum()) + 1
  idx, valid = coreset.greedy(
      x, n, starts=starts, sampling_weight=w, unweighted_first=True
  )
  want, want_valid = _testutil.numpy_reference_sampler(x, n, starts, w)
  np.testing.assert_array_equal(np.asarray(valid), want_valid)
  np.testing.assert_array_equal(np.asarray(idx)[want_valid], want[want_valid])
  # Without weights the flag changes nothing.
  np.testing.assert_array_equal(
      _greedy(x, 6, starts=starts, unweighted_first=True),
      _greedy(x, 6, starts=starts),
  )


def test_resolve_impl(monkeypatch):
  big = coreset.PRUNED_MIN_POINTS
  small = big - 1
  on_cpu = jax.default_backend() == "cpu"
  resolve = coreset.resolve_impl
  assert resolve("auto", big, True) == ("pruned" if on_cpu else "dense")
  assert resolve("auto", small, True) == "dense"
  assert resolve("auto", big, True, mesh=object()) == "dense"
  assert resolve("auto", big, False) == "dense"  # traced (under jit)
  assert resolve("dense", big, True) == "dense"
  assert resolve("pruned", small, True) == "pruned"
  monkeypatch.setattr(coreset.jax, "default_backend", lambda: "gpu")
  assert resolve("auto", big, True) == "dense"
  with pytest.raises(ValueError, match="coreset_impl must be one of"):
    resolve("fast", big, True)
  with pytest.raises(ValueError, match="one device"):
    resolve("pruned", big, True, mesh=object())
