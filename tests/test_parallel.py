"""parallel: every sharded stage equals one device, bit for bit.

One child process sees 8 fake CPU devices (XLA_FLAGS=
--xla_force_host_platform_device_count=8, set before it imports jax; this
process keeps its one device). It runs each stage with the single-device
code and sharded over meshes of 1, 2, 3 and 8 devices; the sharded results
must equal the single-device ones exactly (no tolerance), and the
single-device ones match plain numpy / sklearn references here (to float32
rounding: those run in float64). No device count divides the sizes: 245
points and patches, 35 positions, banks of 333 and 5 rows (fewer rows than
devices), 7 images; the data hold exact ties and zero sampling weights.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import _testutil  # pylint: disable=g-bad-import-order
from softpatch_jax import defaults
from softpatch_jax import denoise
from softpatch_jax import main
from softpatch_jax import parallel

N_DEVICES = (1, 2, 3, 8)
N_IMG, GRID, DIM, PROJ = 7, (5, 7), 24, 16  # 7 * 35 = 245 patches
N_SEL = 24  # coreset.num_samples(245, 0.1): the bank's program is reused
# A small block bound, so 'nearest' and 'gaussian' map over several blocks
# plus a remainder (30 + 5 and 8 * 4 + 3 of the 35 positions).
BLOCK_ELEMS = 1500

_CHILD = r"""
import os
import sys
import numpy as np
import jax
from softpatch_jax import backbones, banks, coreset, denoise, embedding
from softpatch_jax import features, methods, parallel, scoring
from softpatch_jax.kernels import kcenter
inp = dict(np.load(sys.argv[1]))
geometry = methods.BankGeometry((5, 7), (20, 28))
def bank_options(quirks):
  return methods.BankOptions(
      denoise=denoise.DenoiseOptions(lof_k=6),
      coreset=coreset.CoresetOptions(projection_dim=16, reference_quirks=quirks))
key = jax.random.PRNGKey(3)
bb = backbones.load("efficientnet_lite0", weights="random",
                    layers=("stage2", "stage3"))
spec = features.EmbedSpec(bb.module, bb.layers, pretrain_embed_dim=16,
                          target_embed_dim=16)
out = {"auto_devices": np.int32(parallel.resolve_mesh("auto").size)}
proj = denoise.make_projection(jax.random.split(key)[0], 24, 16)
out["train_proj"] = denoise.project(inp["train"], proj)
def kc(mesh, *args, **kw):
  if mesh is None:
    return kcenter.kcenter(*args, **kw)
  return parallel.kcenter(*args, mesh=mesh, **kw)
def weights(mesh, x, name, **kw):
  options = denoise.DenoiseOptions(**kw)
  if mesh is None:
    return denoise.patch_weights(x, name, options)
  return parallel.patch_weights(x, name, options, mesh=mesh)
for n in (0, 1, 2, 3, 8):  # 0: one device, the single-device code
  mesh = parallel.make_mesh(n) if n else None
  x, w, starts = inp["kc_x"], inp["kc_w"], inp["kc_starts"]
  out[f"kc_{n}"] = kc(mesh, x, 24, starts, w)
  out[f"kc_first_{n}"] = kc(mesh, x, 24, starts, w, first=int(inp["kc_first"]))
  if n in (0, 3):
    out[f"kc_pallas_{n}"] = kc(mesh, inp["pl_x"], 9, inp["pl_starts"],
                               inp["pl_w"], impl="pallas_interpret")
  for quirks in (0, 1) if n in (0, 3) else (0,):
    bank, fit = banks.build_bank(inp["train"], key, "softpatch_lof",
                                 bank_options(bool(quirks)), geometry,
                                 mesh=mesh)
    for k, v in dict(feat=bank.features, bw=bank.weights, idx=fit.indices,
                          valid=fit.valid, w=fit.weights).items():
      out[f"bank{quirks}_{k}_{n}"] = v
  denoise._BLOCK_ELEMS = int(inp["block_elems"])
  for name in ("nearest", "gaussian", "fusion_vote"):
    out[f"{name}_{n}"] = weights(mesh, inp["proj"], name, lof_k=6,
                                 noise_fraction=0.15)
  denoise._BLOCK_ELEMS = 1 << 24
  for b, soft in (("big", True), ("tiny", False)):
    bk = scoring.make_bank(inp[f"{b}_bank"], inp[f"{b}_w"], grid=(5, 7),
                           image_size=(20, 28), blur_sigma=1.5,
                           soft_weight=soft)
    search = scoring.choose_search(bk, scoring.ScoringOptions(), mesh)
    for k, v in zip(("img", "maps", "scores"),
                    scoring.score(bk, inp["queries"], search)):
      out[f"{b}_{k}_{n}"] = v
  if n in (0, 3, 8):  # the backbone compiles slowly: two meshes
    emb = embedding.Embedder(bb.variables, spec, batch_size=2, mesh=mesh)
    step = emb.batch_size
    out[f"embed_{n}"] = np.concatenate(
        [emb(inp["images"][i:i + step]) for i in range(0, 7, step)])
# The accelerator paths (Pallas kNN and LOF kernels), interpreted on CPU.
os.environ["SOFTPATCH_JAX_IMPL"] = "pallas_interpret"
bk = scoring.make_bank(inp["big_bank"], inp["big_w"], grid=(5, 7),
                       image_size=(20, 28), blur_sigma=1.5)
for n in (0, 3):
  mesh = parallel.make_mesh(n) if n else None
  out[f"pl_lof_{n}"] = weights(mesh, inp["proj"], "lof", lof_k=6)
  search = scoring.choose_search(bk, scoring.ScoringOptions(), mesh)
  out[f"pl_scores_{n}"] = scoring.score(bk, inp["queries"], search)[2]
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
"""


def _inputs():
  rng = np.random.default_rng(0)
  m = N_IMG * GRID[0] * GRID[1]
  x = rng.normal(size=(m, PROJ)).astype(np.float32)
  x[rng.choice(m, 40, replace=False)] = x[rng.choice(m, 40, replace=False)]
  w = (rng.random(m) > 0.2).astype(np.float32)  # zero weights: never picked
  px = rng.normal(size=(150, 8)).astype(np.float32)
  train = rng.normal(size=(N_IMG, 35, DIM)).astype(np.float32)
  train[2, :6] += 4.0  # an anomalous corner in one image
  big = rng.normal(size=(333, DIM)).astype(np.float32)
  big[rng.integers(333, size=60)] = big[7]  # exact ties on bank rows
  queries = rng.normal(size=(3, 35, DIM)).astype(np.float32)
  queries[0, :4] = big[7]  # distance 0 to tied rows: lowest index wins
  return dict(
      kc_x=x,
      kc_w=w,
      kc_starts=rng.choice(m, 10, replace=False),
      kc_first=np.int32(np.flatnonzero(w == 0)[3]),  # a zero-weight point
      pl_x=px,
      pl_w=(rng.random(150) > 0.3).astype(np.float32),
      pl_starts=np.array([3, 77, 149]),
      train=train,
      proj=rng.normal(size=(N_IMG, 35, PROJ)).astype(np.float32),
      block_elems=np.int32(BLOCK_ELEMS),
      big_bank=big,
      big_w=rng.uniform(0.5, 2.0, 333).astype(np.float32),
      tiny_bank=rng.normal(size=(5, DIM)).astype(np.float32),
      tiny_w=np.ones(5, np.float32),
      queries=queries,
      images=rng.normal(size=(7, 32, 32, 3)).astype(np.float32),
  )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(inputs, sharded outputs of the child process)."""
  tmp = tmp_path_factory.mktemp("parallel")
  inp = _inputs()
  np.savez(tmp / "in.npz", **inp)
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  res = subprocess.run(
      [sys.executable, "-c", _CHILD, str(tmp / "in.npz"), str(tmp / "o.npz")],
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  assert res.returncode == 0, res.stderr[-4000:]
  return inp, dict(np.load(tmp / "o.npz"))


def _same_as_one_device(out, key, devices=N_DEVICES):
  """Asserts that every sharded `key` equals the single-device one."""
  want = out[f"{key}_0"]
  for n in devices:
    np.testing.assert_array_equal(
        out[f"{key}_{n}"], want, err_msg=f"{key} on {n} devices"
    )
  return want


def test_auto_mode_shards_over_every_visible_device(run):
  assert int(run[1]["auto_devices"]) == 8
  assert jax.device_count() == 1  # this process kept one device
  assert parallel.resolve_mesh("auto") is None
  assert parallel.ParallelOptions().mesh() is None
  assert parallel.resolve_mesh("on").size == 1
  assert parallel.resolve_mesh("off") is None


def test_kcenter_picks_equal_one_device_and_numpy(run):
  inp, out = run
  x, w, starts = inp["kc_x"], inp["kc_w"], inp["kc_starts"]
  want = _testutil.numpy_greedy_kcenter(x, N_SEL, starts, w)
  np.testing.assert_array_equal(_same_as_one_device(out, "kc"), want)
  assert np.all(w[want] > 0)
  first = int(inp["kc_first"])
  np.testing.assert_array_equal(
      _same_as_one_device(out, "kc_first"),
      _testutil.numpy_greedy_kcenter(x, N_SEL, starts, w, first=first),
  )


def test_kcenter_pallas_step_equals_one_device_pallas(run):
  inp, out = run
  np.testing.assert_array_equal(
      _same_as_one_device(out, "kc_pallas", (3,)),
      _testutil.numpy_greedy_kcenter(
          inp["pl_x"], 9, inp["pl_starts"], inp["pl_w"]
      ),
  )


@pytest.mark.parametrize("quirks", [0, 1])
def test_build_bank_lof_and_coreset_equal_one_device(run, quirks):
  inp, out = run
  devices = (3,) if quirks else N_DEVICES
  for k in ("feat", "bw", "idx", "valid"):
    _same_as_one_device(out, f"bank{quirks}_{k}", devices)
  # The LOF weights themselves, against sklearn.
  xt = out["train_proj"].transpose(1, 0, 2)  # (P, N, d)
  np.testing.assert_allclose(
      _same_as_one_device(out, f"bank{quirks}_w", devices),
      _testutil.sklearn_lof(xt, 6).T,
      rtol=2e-4,
      atol=2e-4,
  )
  # The bank rows are the selected training patches with their weights.
  idx = out[f"bank{quirks}_idx_0"][out[f"bank{quirks}_valid_0"]]
  np.testing.assert_array_equal(
      out[f"bank{quirks}_feat_0"], inp["train"].reshape(-1, DIM)[idx]
  )


def test_other_discriminators_equal_one_device(run):
  inp, out = run
  for name in ("nearest", "fusion_vote"):
    _same_as_one_device(out, name)
  # The leave-one-out Gaussian's rounding follows the per-shard batch.
  for n in N_DEVICES:
    np.testing.assert_allclose(
        out[f"gaussian_{n}"], out["gaussian_0"], rtol=1e-5, err_msg=str(n)
    )
  # 'nearest' in plain numpy: distance to the closest other image's patch.
  proj = inp["proj"]
  d = np.linalg.norm(proj[:, None] - proj[None], axis=-1)  # (N, N, P)
  d[np.arange(N_IMG), np.arange(N_IMG)] = np.inf
  np.testing.assert_allclose(
      out["nearest_0"], d.min(axis=1) + 1, rtol=1e-4, atol=1e-4
  )
  # 'gaussian': the leave-one-out Mahalanobis distance + 1.
  for p in (0, 34):
    ref = _testutil.gaussian_loo(proj[:, p].astype(np.float64))
    np.testing.assert_allclose(
        out["gaussian_0"][:, p], ref + 1, rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("which,soft", [("big", True), ("tiny", False)])
def test_scores_equal_one_device_and_numpy(run, which, soft):
  inp, out = run
  for k in ("img", "maps"):
    _same_as_one_device(out, f"{which}_{k}")
  scores = _same_as_one_device(out, f"{which}_scores")
  q = inp["queries"].reshape(-1, DIM).astype(np.float64)
  b = inp[f"{which}_bank"].astype(np.float64)
  d2 = ((q[:, None] - b[None]) ** 2).sum(-1)
  ref = d2.min(1) * (inp[f"{which}_w"][d2.argmin(1)] if soft else 1.0)
  np.testing.assert_allclose(scores.ravel(), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(
      out[f"{which}_img_0"], scores.reshape(3, -1).max(1)
  )


def test_pallas_paths_equal_one_device(run):
  # SOFTPATCH_JAX_IMPL=pallas_interpret: the kernels GPUs and TPUs run.
  inp, out = run
  np.testing.assert_allclose(
      _same_as_one_device(out, "pl_lof", (3,)),
      _testutil.sklearn_lof(inp["proj"].transpose(1, 0, 2), 6).T,
      rtol=2e-4,
      atol=2e-4,
  )
  # Tolerance: interpreted, the kNN kernel body is inlined into the
  # surrounding XLA program, whose fusion (multiply-add contraction) differs
  # between the sharded and the one-device program, so ||q - b||^2 can
  # differ by float32 rounding of ||q||^2 (1e-5 for exact duplicates). A
  # compiled kernel is one program of its own on every device.
  for got in (out["pl_scores_3"], out["big_scores_0"]):
    np.testing.assert_allclose(got, out["pl_scores_0"], rtol=1e-5, atol=1e-4)


def test_features_equal_one_device(run):
  want = _same_as_one_device(run[1], "embed", (3, 8))
  assert want.shape == (7, 64, 16)  # an 8 x 8 grid of 16-d features
  assert np.all(np.isfinite(want)) and want.std() > 0


def test_bad_input_is_one_value_error():
  mesh = parallel.make_mesh(1)
  options = denoise.DenoiseOptions()
  with pytest.raises(ValueError, match="must be one of"):
    parallel.resolve_mesh("always")
  with pytest.raises(ValueError, match="2 devices requested, 1 visible"):
    parallel.make_mesh(2)
  with pytest.raises(ValueError, match="start_idx"):
    parallel.kcenter(np.zeros((4, 2)), 2, np.array([7]), mesh=mesh)
  with pytest.raises(ValueError, match="sampling_weight"):
    parallel.kcenter(np.zeros((4, 2)), 2, np.array([0]), np.ones(3), mesh=mesh)
  with pytest.raises(ValueError, match=r"\(N >= 2, P, d\)"):
    parallel.patch_weights(np.zeros((1, 4, 2)), "lof", options, mesh=mesh)
  with pytest.raises(ValueError, match="unknown discriminator"):
    parallel.patch_weights(np.zeros((3, 4, 2)), "median", options, mesh=mesh)
  with pytest.raises(ValueError, match="tracer"):
    jax.jit(lambda x: parallel.kcenter(x, 1, np.array([0]), mesh=mesh))(
        np.zeros((4, 2), np.float32)
    )


def test_distributed_config_initializes_first(monkeypatch):
  calls = []

  def fake_initialize():
    calls.append("initialize")

  monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
  c = defaults.base_config()
  assert c.distributed is False and c.parallel.mode == "auto"
  c.mode = "train"  # refused with the other settings, before any work
  c.distributed = True
  with pytest.raises(ValueError, match="config.mode"):
    main.run_mode(c, "unused")
  assert not calls
  c.mode = "evaluate"
  c.data.root = "/nonexistent/mvtec"  # fails right after the initialisation
  c.distributed = False
  with pytest.raises(ValueError, match="nonexistent"):
    main.run_mode(c, "unused")
  assert not calls
  c.distributed = True
  with pytest.raises(ValueError, match="nonexistent"):
    main.run_mode(c, "unused")
  assert calls == ["initialize"]
