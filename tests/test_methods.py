"""methods and banks: the registry, and build_bank against a plain numpy
re-implementation (projection, LOF weights, outlier threshold, weighted
greedy), jit vs eager, the jittable fit_core."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import banks
from softpatch_jax import coreset
from softpatch_jax import denoise
from softpatch_jax import methods
from softpatch_jax import scoring

_DENOISE = {"lof_k": "lof_k", "noise_fraction": "noise_fraction"}
_CORESET = {
    "coreset_fraction": "fraction",
    "num_starts": "num_starts",
    "projection_dim": "projection_dim",
    "reference_quirks": "reference_quirks",
    "coreset_impl": "impl",
}
_DRAWS = ("projection", "starts", "coreset_projection")


def _records(grid=None, **kw):
  """(BankOptions, BankGeometry, Draws) of build_bank's old flat keywords."""
  pick = lambda names: {v: kw.pop(k) for k, v in names.items() if k in kw}
  options = methods.BankOptions(
      denoise.DenoiseOptions(**pick(_DENOISE)),
      coreset.CoresetOptions(**pick(_CORESET)),
      scoring.ScoringOptions(**pick({"soft_weight": "soft_weight"})),
  )
  draws = methods.Draws(**pick({k: k for k in _DRAWS}))
  assert not kw, kw
  return options, methods.BankGeometry(grid), draws


def _build(feats, key, method, progress=None, **kw):
  options, geometry, draws = _records(**kw)
  return banks.build_bank(
      feats, key, method, options, geometry, draws=draws, progress=progress
  )


def _core(feats, key, method, **kw):
  """The jittable core with the default (device) placement."""
  options, geometry, draws = _records(**kw)
  return banks.fit_core(feats, key, method, options, geometry, draws)


def _feats(seed, n=8, p=9, d=12):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, p, d)).astype(np.float32)
  x[-1] += 4.0 * rng.normal(size=(p, d)).astype(np.float32)  # a noisy image
  return x


def test_registry_and_parsing():
  assert methods.get_method("softpatch") is methods.METHODS.get("softpatch_lof")
  m = methods.get_method("patchcore_random")
  assert (m.discriminator, m.subsampler, m.soft_weight) == (
      None,
      "random",
      False,
  )
  assert methods.parse_methods(" softpatch_lof, patchcore ") == [
      "softpatch_lof",
      "patchcore",
  ]
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.parse_methods("softpatch_lof,nope")
  with pytest.raises(ValueError, match="empty"):
    methods.parse_methods("")
  # The baselines are entries of their own families, refused for fitting.
  assert methods.get_method("padim", bank_only=False).family == "padim"
  with pytest.raises(ValueError, match="evaluate mode only"):
    methods.get_method("cflow")
  assert (
      "cflow" in methods.baselines() and "padim" not in methods.bank_methods()
  )
  assert methods.parse_methods("cflow,padim_filter+softpatch") == [
      "cflow",
      "padim_filter+softpatch_lof",
  ]
  with pytest.raises(ValueError, match="unknown discriminator"):
    methods.register_method(methods.Method("x", "median", "greedy", True))
  with pytest.raises(ValueError, match="unknown subsampler"):
    methods.register_method(methods.Method("x", None, "kmeans", True))


def test_register_method_is_one_place():
  m = methods.register_method(
      methods.Method("test_nearest_random", "nearest", "random", True)
  )
  try:
    bank, fit = _build(
        _feats(0), jax.random.PRNGKey(0), "test_nearest_random", grid=(3, 3)
    )
    assert bank.soft_weight and fit.outliers is not None
    assert methods.parse_methods("test_nearest_random") == [m.name]
  finally:
    methods.METHODS.unregister("test_nearest_random")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("impl", ["dense", "pruned"])
def test_softpatch_bank_matches_numpy(seed, impl):
  feats = _feats(seed)
  n, p, d = feats.shape
  key = jax.random.PRNGKey(seed)
  bank, fit = _build(
      feats,
      key,
      "softpatch_lof",
      grid=(3, 3),
      lof_k=3,
      coreset_fraction=0.2,
      num_starts=4,
      projection_dim=5,
      noise_fraction=0.15,
      coreset_impl=impl,
  )
  # The same steps in numpy, from the same key.
  proj_key, coreset_key = jax.random.split(key)
  w_proj = np.asarray(denoise.make_projection(proj_key, d, 5)[0], np.float64)
  reduced = feats.reshape(n * p, d).astype(np.float64) @ w_proj
  lof = _testutil.sklearn_lof(np.swapaxes(reduced.reshape(n, p, 5), 0, 1), 3)
  weights = lof.T  # (N, P)
  np.testing.assert_allclose(
      np.asarray(fit.weights), weights, rtol=1e-3, atol=1e-3
  )
  t = np.quantile(np.asarray(fit.weights), 0.85)
  outliers = np.asarray(fit.weights) > t
  np.testing.assert_array_equal(np.asarray(fit.outliers), outliers)
  starts = np.asarray(coreset.start_indices(n * p, 4, coreset_key))
  picks = _testutil.numpy_greedy_kcenter(
      reduced.astype(np.float32),
      int(n * p * 0.2),
      starts,
      (~outliers).reshape(-1).astype(np.float32),
  )
  np.testing.assert_array_equal(np.asarray(fit.indices), picks)
  assert not outliers.reshape(-1)[picks].any()  # outliers never enter the bank
  np.testing.assert_array_equal(
      np.asarray(bank.features), feats.reshape(n * p, d)[picks]
  )
  np.testing.assert_allclose(
      np.asarray(bank.weights),
      np.maximum(np.asarray(fit.weights), 0).reshape(-1)[picks],
  )


def test_pruned_coreset_host_and_device_inputs_and_errors():
  feats = _feats(4)
  key = jax.random.PRNGKey(4)
  kw = dict(grid=(3, 3), coreset_fraction=0.3, num_starts=3, projection_dim=6)
  dense, _ = _build(feats, key, "patchcore", **kw)
  for f in (feats, jnp.asarray(feats)):
    pruned, _ = _build(f, key, "patchcore", coreset_impl="pruned", **kw)
    np.testing.assert_array_equal(
        np.asarray(pruned.features), np.asarray(dense.features)
    )
  with pytest.raises(ValueError, match="coreset.impl must be one of"):
    _build(feats, key, "patchcore", coreset_impl="fast", **kw)
  # 'auto' goes pruned from PRUNED_MIN_POINTS on, and dense under jit.
  orig = banks._pruned_kcenter  # pylint: disable=protected-access
  with mock.patch.object(coreset, "PRUNED_MIN_POINTS", 1):
    with mock.patch.object(
        banks, "_pruned_kcenter", side_effect=orig
    ) as pruned_fn:
      auto, _ = _build(feats, key, "patchcore", **kw)
      assert pruned_fn.call_count == 1
      jax.jit(lambda f: _build(f, key, "patchcore", **kw)[0].features)(
          jnp.asarray(feats)
      )
      assert pruned_fn.call_count == 1
  np.testing.assert_array_equal(
      np.asarray(auto.features), np.asarray(dense.features)
  )
  with pytest.raises(ValueError, match="not under jit"):
    jax.jit(
        lambda f: _build(f, key, "patchcore", coreset_impl="pruned", **kw)[
            0
        ].features
    )(jnp.asarray(feats))


@pytest.mark.parametrize(
    "name",
    ["softpatch_nearest", "patchcore", "patchcore_random", "patchcore_full"],
)
def test_build_bank_jit_equals_eager(name):
  feats = jnp.asarray(_feats(3))
  key = jax.random.PRNGKey(3)
  kw = dict(grid=(3, 3), coreset_fraction=0.25, num_starts=3, projection_dim=6)
  eager, efit = _build(feats, key, name, **kw)
  jitted, jfit = jax.jit(lambda f, k: _core(f, k, name, **kw))(feats, key)
  valid = np.asarray(jfit.valid)
  np.testing.assert_array_equal(
      np.asarray(jfit.indices)[valid],
      np.asarray(efit.indices)[np.asarray(efit.valid)],
  )
  np.testing.assert_allclose(
      np.asarray(jitted.features)[valid], np.asarray(eager.features), rtol=1e-6
  )
  assert jitted.soft_weight == eager.soft_weight


def test_explicit_projection_and_starts():
  feats = _feats(4)
  key = jax.random.PRNGKey(4)
  w = jax.random.normal(jax.random.PRNGKey(9), (12, 4))
  a, afit = _build(
      feats,
      key,
      "patchcore",
      grid=(3, 3),
      projection=w,
      starts=jnp.array([0, 5]),
      coreset_fraction=0.2,
  )
  reduced = np.asarray(feats.reshape(-1, 12) @ np.asarray(w), np.float32)
  ref = _testutil.numpy_greedy_kcenter(reduced, int(72 * 0.2), np.array([0, 5]))
  np.testing.assert_array_equal(np.asarray(afit.indices), ref)
  assert a.size == len(ref)


def test_bad_inputs():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"\(N, P, D\)"):
    _build(np.zeros((4, 5)), key, "patchcore")
  with pytest.raises(ValueError, match="not square"):
    _build(_feats(0, p=6), key, "patchcore")
  with pytest.raises(ValueError, match="grid"):
    _build(_feats(0), key, "patchcore", grid=(2, 2))
  with pytest.raises(ValueError, match="at least 2 training images"):
    _build(_feats(0)[:1], key, "softpatch_lof", grid=(3, 3))
  with pytest.raises(ValueError, match="only with reference_quirks"):
    _build(_feats(0), key, "patchcore", coreset_projection=np.ones((12, 4)))
  bad = _feats(0)
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    _build(bad, key, "patchcore", grid=(3, 3))


def _quirk_bank(feats, key, **kw):
  return _build(
      feats,
      key,
      "softpatch_lof",
      grid=(3, 3),
      lof_k=3,
      coreset_fraction=0.2,
      noise_fraction=0.15,
      **kw,
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_quirks_bank_matches_numpy(seed):
  feats = _feats(seed)
  n, p, d = feats.shape
  rng = np.random.default_rng(seed + 50)
  w1 = rng.uniform(-0.3, 0.3, size=(d, 5)).astype(np.float32)
  w2 = rng.uniform(-0.3, 0.3, size=(d, 5)).astype(np.float32)
  starts = rng.choice(n * p, 4, replace=False).astype(np.int32)
  kw = dict(projection=w1, coreset_projection=w2, starts=starts)
  bank, fit = _quirk_bank(
      feats, jax.random.PRNGKey(seed), reference_quirks=True, **kw
  )
  # Deterministic, and the key plays no part with everything explicit.
  bank2, fit2 = _quirk_bank(
      feats, jax.random.PRNGKey(seed + 1), reference_quirks=True, **kw
  )
  np.testing.assert_array_equal(
      np.asarray(fit.indices), np.asarray(fit2.indices)
  )
  np.testing.assert_array_equal(
      np.asarray(bank.features), np.asarray(bank2.features)
  )
  # The same steps in numpy: LOF on the first projection, greedy (the
  # reference sampler) on the second.
  flat = feats.reshape(n * p, d).astype(np.float64)
  lof = _testutil.sklearn_lof(
      np.swapaxes((flat @ w1).reshape(n, p, 5), 0, 1), 3
  )
  np.testing.assert_allclose(
      np.asarray(fit.weights), lof.T, rtol=1e-3, atol=1e-3
  )
  outliers = np.asarray(fit.weights) > np.quantile(
      np.asarray(fit.weights), 0.85
  )
  np.testing.assert_array_equal(np.asarray(fit.outliers), outliers)
  picks, valid = _testutil.numpy_reference_sampler(
      (flat @ w2).astype(np.float32),
      int(n * p * 0.2),
      starts,
      (~outliers).reshape(-1).astype(np.float32),
  )
  np.testing.assert_array_equal(np.asarray(fit.valid), valid)
  np.testing.assert_array_equal(np.asarray(fit.indices)[valid], picks[valid])
  np.testing.assert_array_equal(
      np.asarray(bank.features), feats.reshape(n * p, d)[picks[valid]]
  )
  np.testing.assert_allclose(
      np.asarray(bank.weights),
      np.maximum(np.asarray(fit.weights), 0).reshape(-1)[picks[valid]],
  )
  # The first pick is the noisy image's patch, kept in the bank as in the
  # official code; without the quirks outliers never enter the bank.
  assert outliers.reshape(-1)[picks[0]]
  _, plain = _quirk_bank(
      feats, jax.random.PRNGKey(seed), projection=w1, starts=starts
  )
  assert not outliers.reshape(-1)[np.asarray(plain.indices)].any()


@pytest.mark.parametrize(
    "name",
    ["softpatch_lof", "softpatch_nearest", "patchcore", "patchcore_random"],
)
def test_reference_quirks_off_is_the_default_and_keys_are_own(name):
  feats = _feats(5)
  key = jax.random.PRNGKey(5)
  kw = dict(grid=(3, 3), coreset_fraction=0.2, num_starts=3, projection_dim=6)
  bank, fit = _build(feats, key, name, **kw)
  off, offfit = _build(feats, key, name, reference_quirks=False, **kw)
  np.testing.assert_array_equal(
      np.asarray(fit.indices), np.asarray(offfit.indices)
  )
  np.testing.assert_array_equal(
      np.asarray(bank.features), np.asarray(off.features)
  )
  # With the quirks on, the discriminator still sees the default projection
  # (same key split), and the second projection comes from its own key.
  # Methods without a discriminator are unchanged.
  on, onfit = _build(feats, key, name, reference_quirks=True, **kw)
  if fit.weights is None:
    np.testing.assert_array_equal(
        np.asarray(onfit.indices), np.asarray(fit.indices)
    )
    return
  np.testing.assert_array_equal(
      np.asarray(onfit.weights), np.asarray(fit.weights)
  )
  proj_key = jax.random.split(key)[0]
  second = denoise.make_projection(jax.random.fold_in(proj_key, 1), 12, 6)
  again, againfit = _build(
      feats, key, name, reference_quirks=True, coreset_projection=second, **kw
  )
  np.testing.assert_array_equal(
      np.asarray(onfit.indices), np.asarray(againfit.indices)
  )
  np.testing.assert_array_equal(
      np.asarray(on.features), np.asarray(again.features)
  )
  assert not np.array_equal(np.asarray(onfit.indices), np.asarray(fit.indices))


def test_reference_quirks_jit_equals_eager():
  feats = jnp.asarray(_feats(6))
  key = jax.random.PRNGKey(6)
  kw = dict(grid=(3, 3), coreset_fraction=0.25, num_starts=3, lof_k=3)
  kw.update(projection_dim=6, reference_quirks=True)
  eager, efit = _build(feats, key, "softpatch_lof", **kw)
  jitted, jfit = jax.jit(lambda f, k: _core(f, k, "softpatch_lof", **kw))(
      feats, key
  )
  valid = np.asarray(jfit.valid)
  np.testing.assert_array_equal(
      np.asarray(jfit.indices)[valid],
      np.asarray(efit.indices)[np.asarray(efit.valid)],
  )
  np.testing.assert_allclose(
      np.asarray(jitted.features)[valid], np.asarray(eager.features), rtol=1e-6
  )


def test_progress_callback_eager_only():
  feats = _feats(7)
  key = jax.random.PRNGKey(7)
  kw = dict(grid=(3, 3), lof_k=3, projection_dim=6)
  calls = []
  bank, _ = _build(feats, key, "softpatch_lof", progress=calls.append, **kw)
  assert calls == ["LOF weights"]
  ref, _ = _build(feats, key, "softpatch_lof", **kw)
  np.testing.assert_array_equal(
      np.asarray(bank.features), np.asarray(ref.features)
  )
  _build(feats, key, "patchcore", progress=calls.append, **kw)
  jax.jit(
      lambda f: _build(f, key, "softpatch_lof", progress=calls.append, **kw)
  )(feats)
  assert calls == ["LOF weights"]  # no discriminator, or under jit: no call


def test_describe_fit():
  frac = coreset.CoresetOptions(fraction=0.1)
  assert methods.describe_fit("softpatch", 10, 784, frac) == (
      "LOF weights over 784 positions x 10 images, then a greedy coreset of "
      "784 of 7840 patches"
  )
  assert methods.describe_fit("patchcore_full", 2, 9) == (
      "a bank of all 18 patches"
  )


# Picks of the default build_bank, recorded before reference_quirks existed.
_DEFAULT_PICKS = {
    "softpatch_lof": [28, 55, 49, 12, 9, 59, 42, 48, 7, 61, 25, 45, 18, 24],
    # Re-recorded in 0.3.0: the Gaussian discriminator scores each image
    # leave-one-out with a shrunk covariance (README, "Deliberate
    # differences").
    "softpatch_gaussian": [
        22,
        38,
        49,
        7,
        12,
        29,
        36,
        28,
        55,
        52,
        42,
        48,
        45,
        24,
    ],
    "patchcore": [67, 65, 64, 69, 70, 71, 66, 22, 27, 49, 68, 7, 24, 29],
}


@pytest.mark.parametrize("name", sorted(_DEFAULT_PICKS))
@pytest.mark.parametrize("quirks", [None, False])
def test_default_bank_unchanged(name, quirks):
  kw = dict(grid=(3, 3), coreset_fraction=0.2, num_starts=3, projection_dim=6)
  if quirks is not None:
    kw["reference_quirks"] = quirks
  _, fit = _build(_feats(11), jax.random.PRNGKey(11), name, lof_k=3, **kw)
  np.testing.assert_array_equal(np.asarray(fit.indices), _DEFAULT_PICKS[name])


def test_host_projection_chunks_share_one_program(monkeypatch):
  # A GPU autotunes every new matmul shape while compiling: the chunks,
  # the short last one included, must reuse one program.
  monkeypatch.setattr(banks, "PROJECT_ROWS", 64)
  denoise._project_chunk.cache_clear()  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  x = rng.normal(size=(150, 32)).astype(np.float32)
  proj = denoise.make_projection(jax.random.PRNGKey(1), 32, 8)
  out = banks._project(x, proj)  # pylint: disable=protected-access
  assert out.shape == (150, 8)
  # pylint: disable-next=protected-access
  assert denoise._project_chunk()._cache_size() == 1
  np.testing.assert_allclose(
      np.asarray(out),
      x @ np.asarray(proj[0]) + np.asarray(proj[1]),
      rtol=1e-5,
      atol=1e-5,
  )
