"""baselines.cflow: invertible couplings with the right log-determinant,
training that lowers the NLL, and anomaly scores that find defects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax.baselines import cflow
from softpatch_jax.baselines import options
from softpatch_jax.data import synthetic

# Small settings shared with tests/test_baselines_fitters.py, so the
# compiled training programs are reused within one test session.
SMALL = options.CflowOptions(
    coupling_blocks=2,
    condition_dim=16,
    hidden_ratio=1.0,
    batch_positions=256,
    epochs=4,
    learning_rate=2e-3,
)


def _random_params(params, seed, scale=0.4):
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [scale * rng.normal(size=np.shape(l)) for l in leaves]
  )


@pytest.mark.parametrize("dim,cond,blocks,seed", [(5, 8, 3, 1)])
def test_flow_is_invertible_with_the_numerical_log_det(dim, cond, blocks, seed):
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    flow = cflow.ConditionalFlow(dim, cond, blocks, 1.5, clamp=1.9)
    x = jnp.asarray(rng.normal(size=(4, dim)))
    c = jnp.asarray(rng.normal(size=(4, cond)))
    params = jax.jit(flow.init)(jax.random.PRNGKey(0), x, c)
    params = _random_params(params, seed)
    fwd = jax.jit(flow.apply)
    z, logdet = fwd(params, x, c)
    back = jax.jit(lambda p, z, c: flow.apply(p, z, c, method=flow.inverse))(
        params, z, c
    )
    np.testing.assert_allclose(back, x, atol=1e-10)
    assert not np.allclose(z, x)  # the random parameters do something
    h = 1e-6
    for i in range(4):
      # Central differences of all columns at once: (2 * dim, dim) inputs.
      steps = np.concatenate([np.eye(dim), -np.eye(dim)]) * h
      out = np.asarray(
          fwd(params, x[i] + steps, jnp.tile(c[i], (2 * dim, 1)))[0]
      )
      jac = (out[:dim] - out[dim:]).T / (2 * h)
      sign, ref = np.linalg.slogdet(jac)
      assert sign > 0
      np.testing.assert_allclose(float(logdet[i]), ref, atol=1e-6)
    # log_likelihood is the standard-normal density of z plus the log-det.
    ll = np.asarray(cflow.log_likelihood(z, logdet))
    zz = np.asarray(z)
    ref = (
        -0.5 * (zz**2).sum(-1) - 0.5 * dim * np.log(2 * np.pi) + logdet
    ) / dim
    np.testing.assert_allclose(ll, ref, rtol=1e-12)


def test_new_flow_is_the_identity():
  flow = cflow.ConditionalFlow(6, 8, 2)
  x = jnp.ones((3, 6))
  params = jax.jit(flow.init)(jax.random.PRNGKey(0), x, jnp.ones((3, 8)))
  z, logdet = jax.jit(flow.apply)(params, x, jnp.ones((3, 8)))
  np.testing.assert_allclose(z, x)
  np.testing.assert_allclose(logdet, 0.0)


def test_positional_encoding():
  pe = cflow.positional_encoding(8, 3, 5).reshape(3, 5, 8)
  row, col = np.mgrid[0:3, 0:5]
  freq = 1e4 ** (-np.arange(0, 4, 2) / 4)  # dims per axis: 4
  np.testing.assert_allclose(pe[..., 0], np.sin(col * freq[0]), atol=1e-6)
  np.testing.assert_allclose(pe[..., 3], np.cos(col * freq[1]), atol=1e-6)
  np.testing.assert_allclose(pe[..., 4], np.sin(row * freq[0]), atol=1e-6)
  np.testing.assert_allclose(pe[..., 7], np.cos(row * freq[1]), atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    cflow.positional_encoding(6, 2, 2)


def test_bad_settings_are_one_clear_error():
  with pytest.raises(ValueError, match="cflow.epochs must be .* got 0"):
    options.CflowOptions(epochs=0)
  with pytest.raises(ValueError, match="condition_dim must be a multiple of 4"):
    options.CflowOptions(condition_dim=6)
  with pytest.raises(ValueError, match="learning_rate must be"):
    options.CflowOptions(learning_rate=0.0)
  with pytest.raises(ValueError, match="cflow.min_steps must be .* got 0"):
    options.CflowOptions(min_steps=0)
  with pytest.raises(ValueError, match="cflow.objective must be"):
    options.CflowOptions(objective="kl")
  with pytest.raises(ValueError, match="at least one feature map"):
    cflow.fit(jax.random.PRNGKey(0), [], SMALL, image_size=(8, 8), blur_sigma=4)


def test_training_loss_matches_a_numpy_reference():
  ll = np.array([-40.0, -3.0, -0.5, 0.0, 0.7, 6.0, 40.0])
  # -log sigmoid(v) = log(1 + exp(-v)), CFLOW-AD's objective.
  ref = np.mean(np.logaddexp(0.0, -ll))
  got = float(cflow.training_loss(jnp.asarray(ll), "logsigmoid"))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(
      float(cflow.training_loss(jnp.asarray(ll), "nll")), -ll.mean(), rtol=1e-6
  )
  # Saturates for likely positions, linear for unlikely ones.
  g = jax.grad(lambda v: cflow.training_loss(v, "logsigmoid"))(jnp.asarray(ll))
  assert abs(float(g[-1])) < 1e-12 < abs(float(g[0]))
  with pytest.raises(ValueError, match="unknown CFLOW objective"):
    cflow.training_loss(jnp.asarray(ll), "kl")


def test_coarse_scales_get_at_least_min_steps():
  o = options.CflowOptions(epochs=3, min_steps=200)
  assert cflow.epochs_for(o, 1000) == 3  # fine grid: the epochs decide
  assert cflow.epochs_for(o, 2) == 100  # coarse grid: the step floor
  assert cflow.epochs_for(o, 7) == 29  # rounded up: 29 * 7 >= 200


def test_global_affine_enters_the_log_det():
  # Only the learnt per-dimension scale differs from the identity.
  flow = cflow.ConditionalFlow(4, 4, 1)
  x, c = jnp.ones((2, 4)), jnp.zeros((2, 4))
  params = jax.jit(flow.init)(jax.random.PRNGKey(0), x, c)
  blk = params["params"]["blocks_0"]
  g = np.array([0.3, -2.0, 1.0, 7.0])
  blk["global_scale"] = jnp.asarray(g)
  scale = 0.1 * 2.0 * np.log1p(np.exp(0.5 * g))  # 0.1 softplus, beta 1/2
  z, logdet = jax.jit(flow.apply)(params, x, c)
  np.testing.assert_allclose(np.sort(np.asarray(z[0])), np.sort(scale), 1e-5)
  np.testing.assert_allclose(logdet, np.log(scale).sum(), rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """CFLOW fitted on generated normal textures, with its training losses."""
  root = tmp_path_factory.mktemp("data")
  synthetic.make_mvtec_like(
      root, n_train=16, n_test_good=8, n_test_defect=6, size=64, seed=0
  )
  train, test = data.mvtec.load_category(str(root), "synth")
  bb = backbones.load("efficientnet_lite0")
  pre = data.Preprocess(resize=64, crop=64, mean=bb.mean, std=bb.std)
  ex = embedding.MapExtractor(bb.name, bb.variables, batch_size=8)
  # Padded batches of 8, as the prediction loop scores them.
  batches = lambda samples: [
      (len(b.indices), ex(b.images))
      for b in data.stream_batches(samples, pre, 8, 1, with_masks=False)
  ]
  train_maps = [
      np.concatenate(p)
      for p in zip(
          *[[np.asarray(m)[:k] for m in ms] for k, ms in batches(train)]
      )
  ]
  model, losses = cflow.fit(
      jax.random.PRNGKey(0),
      train_maps,
      SMALL,
      image_size=(64, 64),
      blur_sigma=4.0,
  )
  return model, losses, batches(test), test


def test_training_lowers_the_nll(trained):
  _, losses, _, _ = trained
  assert len(losses) == 3  # one decoder per scale
  # Every scale, the coarse one too, gets at least min_steps Adam steps.
  assert min(len(loss) for loss in losses) >= SMALL.min_steps
  for s, loss in enumerate(losses):
    assert np.isfinite(loss).all()
    steps = len(loss) // 4
    first, last = loss[:steps].mean(), loss[-steps:].mean()
    print(f"scale {s}: NLL/dim first epoch {first:.3f}, last {last:.3f}")
    assert last < first - 0.05, (s, first, last)


def test_auroc_well_above_chance_on_generated_defects(trained):
  model, _, test_batches, test = trained
  scores, pix = [], []
  for k, ms in test_batches:
    s, p = cflow.score(model, ms)
    scores.append(np.asarray(s)[:k])
    pix.append(np.asarray(p)[:k])
  assert np.concatenate(pix).shape == (len(test), 64, 64)
  labels = np.array([s.label for s in test])
  auroc = roc_auc_score(labels, np.concatenate(scores))
  print("CFLOW image AUROC on generated defects", auroc)
  assert auroc > 0.8, auroc
