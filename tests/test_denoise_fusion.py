"""softpatch_jax.denoise fusion: normalisations and the fused discriminator
against numpy / scipy / sklearn references, and its invariances."""

import jax
import numpy as np
import pytest
from scipy import special
from scipy import stats

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import banks
from softpatch_jax import denoise
from softpatch_jax import methods

SHAPES = [(0, (7, 5)), (1, (40,)), (2, (3, 4, 6))]


def _scores(seed, shape, ties=True):
  rng = np.random.default_rng(seed)
  s = rng.gamma(2.0, 1.0, size=shape).astype(np.float32) + 1.0
  if ties:
    flat = s.reshape(-1)
    flat[: flat.size // 4] = np.round(flat[: flat.size // 4])  # many ties
  return s


def _np_rank(s):
  return (
      stats.rankdata(s.astype(np.float64), method="average").reshape(s.shape)
      / s.size
  )


def _np_zscore(s):
  s = s.astype(np.float64)
  med = np.median(s)
  mad = 1.4826 * np.median(np.abs(s - med))
  scale = mad if mad > 0 else s.std()
  return (s - med) / scale if scale > 0 else np.zeros_like(s)


def _np_fuse(scores, mode, noise_fraction=0.15):
  if mode == "zscore":
    return special.ndtr(np.mean([_np_zscore(s) for s in scores], 0))
  ranks = np.stack([_np_rank(s) for s in scores])
  if mode == "rank":
    return ranks.mean(0)
  votes = (ranks > 1 - noise_fraction).sum(0)
  return (votes + ranks.mean(0)) / (len(scores) + 1)


@pytest.mark.parametrize("seed,shape", SHAPES)
def test_rank_normalize_matches_scipy(seed, shape):
  s = _scores(seed, shape)
  got = np.asarray(denoise.rank_normalize(s))
  np.testing.assert_allclose(got, _np_rank(s), rtol=1e-6)
  assert got.min() > 0 and got.max() == 1.0


@pytest.mark.parametrize("seed,shape", SHAPES)
def test_robust_zscore_matches_numpy(seed, shape):
  s = _scores(seed, shape, ties=False)
  np.testing.assert_allclose(
      np.asarray(denoise.robust_zscore(s)), _np_zscore(s), rtol=1e-4, atol=1e-5
  )
  # The MAD is scipy's normal-consistent one.
  mad = stats.median_abs_deviation(s.astype(np.float64), None, scale="normal")
  np.testing.assert_allclose(
      np.asarray(denoise.robust_zscore(s)),
      (s - np.median(s)) / mad,
      rtol=1e-3,
      atol=1e-4,
  )


def test_robust_zscore_degenerate():
  # More than half tied: the MAD is 0, the standard deviation takes over.
  s = np.array([1, 1, 1, 1, 1, 2, 5], np.float32)
  np.testing.assert_allclose(
      np.asarray(denoise.robust_zscore(s)), (s - 1) / s.std(), rtol=1e-5
  )
  np.testing.assert_array_equal(
      np.asarray(denoise.robust_zscore(np.full((3, 4), 2.5, np.float32))), 0.0
  )


@pytest.mark.parametrize("mode", denoise.FUSION_MODES)
@pytest.mark.parametrize("seed,shape", SHAPES)
def test_fuse_scores_matches_numpy(mode, seed, shape):
  scores = [
      _scores(seed + 10 * i, shape, ties=mode != "zscore") for i in range(3)
  ]
  got = np.asarray(denoise.fuse_scores(scores, mode, noise_fraction=0.2))
  ref = _np_fuse(scores, mode, noise_fraction=0.2)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert got.min() >= 0 and got.max() <= 1


_MONOTONE = [
    lambda s: np.exp(s / 3.0),
    lambda s: s**3 - 7.0,
    lambda s: np.log(s) * 0.01,
]


@pytest.mark.parametrize("mode", ["rank", "vote"])
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_and_vote_invariant_to_monotone_maps(mode, which, seed):
  scores = [_scores(seed + 10 * i, (9, 17)) for i in range(3)]
  base = np.asarray(denoise.fuse_scores(scores, mode, 0.15))
  for g in _MONOTONE:
    changed = list(scores)
    changed[which] = g(scores[which].astype(np.float64)).astype(np.float32)
    # Strictly increasing maps keep the order (float32 keeps it here).
    assert np.array_equal(_np_rank(changed[which]), _np_rank(scores[which]))
    np.testing.assert_array_equal(
        np.asarray(denoise.fuse_scores(changed, mode, 0.15)), base
    )


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_zscore_invariant_to_positive_affine_maps_only(which, seed):
  scores = [_scores(seed + 10 * i, (9, 17), ties=False) for i in range(3)]
  base = np.asarray(denoise.fuse_scores(scores, "zscore", 0.15))
  for a, b in [(3.0, -2.0), (0.01, 5.0), (250.0, 0.0)]:
    changed = list(scores)
    changed[which] = (a * scores[which].astype(np.float64) + b).astype(
        np.float32
    )
    np.testing.assert_allclose(
        np.asarray(denoise.fuse_scores(changed, "zscore", 0.15)),
        base,
        rtol=1e-4,
        atol=1e-5,
    )
  # A nonlinear monotone map changes the z-scores, hence the fused score.
  changed = list(scores)
  changed[which] = np.exp(scores[which])
  assert (
      np.abs(
          np.asarray(denoise.fuse_scores(changed, "zscore", 0.15)) - base
      ).max()
      > 1e-3
  )


def _np_components(x, k):
  """(N, P, d) -> [lof, nearest + 1, gaussian + 1] as (N, P), references."""
  n, p, d = x.shape
  xp = np.transpose(x, (1, 0, 2)).astype(np.float64)  # (P, N, d)
  lof = _testutil.sklearn_lof(xp, k, fit_dtype=np.float64)
  dist = np.sqrt(((xp[:, :, None] - xp[:, None]) ** 2).sum(-1))
  dist[:, np.arange(n), np.arange(n)] = np.inf
  nearest = dist.min(-1) + 1.0
  # The Gaussian is leave-one-out with a shrunk covariance (denoise_gaussian).
  gauss = np.stack([_testutil.gaussian_loo(xp[j]) for j in range(p)])
  return [np.asarray(lof).T, nearest.T, gauss.T + 1.0]


@pytest.mark.parametrize(
    "mode,seed", [("rank", 0), ("zscore", 1), ("vote", 2), ("rank", 3)]
)
def test_fusion_discriminator_matches_references(mode, seed):
  n, p, d = 12, 5, 4
  x = np.random.default_rng(seed).standard_normal((n, p, d)).astype(np.float32)
  got = np.asarray(
      denoise.patch_weights(
          x, "fusion", denoise.DenoiseOptions(lof_k=4, fusion=mode)
      )
  )
  assert got.shape == (n, p)
  ref = 1.0 + _np_fuse(_np_components(x, 4), mode)
  # Float differences between implementations may swap near-equal scores:
  # one swap moves a normalised rank by 1 / (N P).
  np.testing.assert_allclose(got, ref, atol=1.5 / (n * p), rtol=0)
  named = denoise.patch_weights(
      x, f"fusion_{mode}", denoise.DenoiseOptions(lof_k=4, fusion="rank")
  )
  np.testing.assert_array_equal(np.asarray(named), got)


def test_fusion_is_jittable_and_flags_outliers():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((12, 5, 4)).astype(np.float32) * 0.1
  x[3] += 3.0  # one outlying image at every position
  f = jax.jit(
      lambda a: denoise.patch_weights(
          a, "fusion", denoise.DenoiseOptions(lof_k=5)
      )
  )
  got = np.asarray(f(x))
  np.testing.assert_allclose(
      got,
      np.asarray(
          denoise.patch_weights(x, "fusion", denoise.DenoiseOptions(lof_k=5))
      ),
      atol=1e-6,
  )
  assert np.all(got[3] > np.delete(got, 3, axis=0).max(0))
  assert got.min() >= 1.0 and got.max() <= 2.0


def test_softpatch_fusion_method():
  for mode in denoise.FUSION_MODES:
    m = methods.get_method(f"softpatch_fusion_{mode}")
    assert m.discriminator == f"fusion_{mode}" and m.soft_weight
  assert methods.get_method("softpatch_fusion").discriminator == "fusion"
  # build_bank passes its fusion mode to the discriminator (on the full
  # bank, which skips the coreset's compilation).
  test_method = methods.Method("test_fusion_full", "fusion", "identity", True)
  methods.register_method(test_method)
  try:
    # 12 x 5 patches projected to 4-d: the shapes of the tests above, so
    # their compiled discriminators serve here too.
    feats = np.random.default_rng(5).standard_normal((12, 5, 10))
    proj = denoise.make_projection(jax.random.PRNGKey(0), 10, 4)
    options = methods.BankOptions(
        denoise=denoise.DenoiseOptions(lof_k=4, fusion="vote")
    )
    bank, fit = banks.build_bank(
        feats.astype(np.float32),
        jax.random.PRNGKey(0),
        test_method,
        options,
        methods.BankGeometry((5, 1)),
        draws=methods.Draws(projection=proj),
    )
  finally:
    methods.METHODS.unregister("test_fusion_full")
  w = np.asarray(fit.weights)
  want = denoise.patch_weights(
      denoise.project(feats.astype(np.float32), proj),
      "fusion_vote",
      denoise.DenoiseOptions(lof_k=4),
  )
  np.testing.assert_array_equal(w, np.asarray(want))
  np.testing.assert_array_equal(
      np.asarray(fit.outliers), w > np.quantile(w, 0.85).astype(np.float32)
  )
  # The full bank holds every patch but the outliers, with its soft weight.
  kept = ~np.asarray(fit.outliers).reshape(-1)
  np.testing.assert_array_equal(np.asarray(bank.weights), w.reshape(-1)[kept])


def test_bad_fusion_mode():
  x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="denoise.fusion must be one of"):
    denoise.DenoiseOptions(fusion="mean")
  with pytest.raises(ValueError, match="fusion mode"):
    denoise.fuse_scores([x], "max", 0.15)
  with pytest.raises(ValueError, match="one shape"):
    denoise.fuse_scores([x, x[:2]], "rank", 0.15)
