"""softpatch_jax.coreset vs a plain numpy weighted greedy k-center."""
import logging

import jax
import numpy as np
import pytest

from softpatch_jax import coreset


def _numpy_greedy(x, n, starts, w=None):
    x = x.astype(np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    dist = np.stack([np.linalg.norm(x - x[s], axis=1) for s in starts], 1).mean(1) * w
    out = []
    for _ in range(n):
        i = int(np.argmax(dist))
        out.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1) * w)
    return np.array(out)


@pytest.mark.parametrize("seed,m,d,n,starts", [(0, 60, 8, 12, 10), (1, 150, 16, 30, 10),
                                               (2, 40, 3, 39, 5), (3, 7, 4, 3, 10),
                                               (4, 200, 32, 20, 128)])
def test_greedy_matches_numpy(seed, m, d, n, starts):
    x = np.random.default_rng(seed).standard_normal((m, d)).astype(np.float32)
    key = jax.random.PRNGKey(seed)
    got = np.asarray(coreset.greedy(x, n, key, num_starts=starts))
    s = np.asarray(coreset.start_indices(m, starts, key))
    assert len(s) == min(starts, m) and len(set(s.tolist())) == len(s)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _numpy_greedy(x, n, s))


@pytest.mark.parametrize("seed,m,d,n", [(0, 80, 8, 15), (1, 120, 4, 30), (2, 50, 6, 10)])
def test_weighted_greedy_matches_numpy_and_skips_noise(seed, m, d, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32)
    x[rng.choice(m, 10, replace=False)] *= 10.0  # far outliers, which plain greedy would love
    w = (rng.random(m) > 0.3).astype(np.float32)
    w[np.argmax(np.linalg.norm(x, axis=1))] = 0.0  # the farthest point is noise
    key = jax.random.PRNGKey(seed + 10)
    got = np.asarray(coreset.greedy(x, n, key, sampling_weight=w))
    s = np.asarray(coreset.start_indices(m, 10, key))
    np.testing.assert_array_equal(got, _numpy_greedy(x, n, s, w))
    assert np.all(w[got] > 0)


def test_greedy_more_than_selectable(caplog):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    w = np.zeros(30, np.float32)
    w[[2, 5, 7, 11]] = 1.0
    with caplog.at_level(logging.WARNING, logger="softpatch_jax.coreset"):
        got = np.asarray(coreset.greedy(x, 10, jax.random.PRNGKey(0), sampling_weight=w))
    assert "only 4 are selectable" in caplog.text
    np.testing.assert_array_equal(got, [2, 5, 7, 11])
    # Fraction 1.0 without weights keeps everything.
    np.testing.assert_array_equal(np.asarray(coreset.greedy(x, 1.0, jax.random.PRNGKey(0))),
                                  np.arange(30))


def test_greedy_duplicates_exhaust_distances(caplog):
    # 6 distinct clean points, each repeated; index 0 is noise. Asking for 10 picks
    # exhausts all positive distances after 6: no repeats, no noise point.
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 3)).astype(np.float32)
    x = np.concatenate([base[:1], base, base, base])  # 19 points
    w = np.ones(len(x), np.float32)
    w[0] = 0.0
    with caplog.at_level(logging.WARNING, logger="softpatch_jax.coreset"):
        got = np.asarray(coreset.greedy(x, 10, jax.random.PRNGKey(1), sampling_weight=w))
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
    idx = np.asarray(coreset.random(50, 12, key))
    assert idx.dtype == np.int32 and len(idx) == 12 and len(set(idx.tolist())) == 12
    assert idx.min() >= 0 and idx.max() < 50
    np.testing.assert_array_equal(idx, np.asarray(coreset.random(50, 12, key)))
    assert len(np.asarray(coreset.random(50, 0.1, key))) == 5
    w = np.zeros(50, np.float32)
    w[::3] = 1
    idx = np.asarray(coreset.random(50, 10, key, sampling_weight=w))
    assert len(set(idx.tolist())) == 10 and np.all(w[idx] > 0)
    with pytest.raises(ValueError):
        coreset.random(5, 6, key)
    np.testing.assert_array_equal(np.asarray(coreset.identity(4)), [0, 1, 2, 3])
