"""baselines.fitters: PaDiM and CFLOW fitted over one training stream and
scored in the one prediction loop; PaDiM* through the evaluate mode."""

import csv
import os
import types

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import defaults
from softpatch_jax import embedding
from softpatch_jax import evaluate
from softpatch_jax import features
from softpatch_jax import inference
from softpatch_jax import methods
from softpatch_jax import options
from softpatch_jax import scoring
from softpatch_jax.baselines import fitters
from softpatch_jax.baselines import padim
from softpatch_jax.data import synthetic

NAMES = ["padim", "cflow", "padim_filter+patchcore", "patchcore"]
BASELINES = ["padim", "cflow", "padim_filter+padim"]


def _config():
  c = defaults.base_config()
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = c.data.crop = 64
  c.data.batch_size = 8
  c.data.num_workers = 1
  s = c.data.synthetic
  s.n_train, s.n_test_good, s.n_test_defect, s.size = 13, 6, 4, 64
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.25  # 13 clean + 3 injected = 16 training images
  c.methods = ",".join(NAMES)
  c.output.num_heatmaps = 2
  # The small CFLOW of tests/test_baselines_cflow.py (same compiled shapes).
  f = c.baselines.cflow
  f.coupling_blocks, f.condition_dim, f.hidden_ratio = 2, 16, 1.0
  f.batch_positions, f.epochs, f.learning_rate = 256, 4, 2e-3
  return c


def _fit_options(opts):
  loader = embedding.LoaderOptions(
      opts.data.num_workers,
      data.build_augment(opts.noise),
      opts.data.feature_store,
  )
  return fitters.FitOptions(opts.baselines, opts.scoring, opts.seed, loader)


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
  """fitters.fit and the prediction loop on generated images (no injected
  noise), a subset fit."""
  root = tmp_path_factory.mktemp("data")
  synthetic.make_mvtec_like(
      root, n_train=13, n_test_good=6, n_test_defect=4, size=64, seed=0
  )
  train, test = data.mvtec.load_category(str(root), "synth")
  opts = options.from_config(_config())
  bb = opts.backbone.load(opts.seed)
  pre = data.Preprocess(resize=64, crop=64, mean=bb.mean, std=bb.std)
  ex = embedding.MapExtractor(bb.name, bb.variables, 8)
  subsets = {"padim_filter+padim": np.arange(2, 13)}
  fitted = fitters.fit(
      train,
      ex,
      pre,
      BASELINES + ["patchcore"],
      _fit_options(opts),
      subsets=subsets,
      label="t",
  )
  preds = inference.predict_samples(
      fitted.models,
      inference.Inputs(maps=ex),
      test,
      pre,
      num_workers=1,
      with_masks=True,
  )
  res = types.SimpleNamespace(
      preds=preds, infos=fitted.infos, extract_s=fitted.extract_s
  )
  return dict(train=train, test=test, bb=bb, pre=pre, ex=ex, opts=opts, res=res)


def test_run_fits_every_baseline_and_scores_the_test_images(direct):
  res, test = direct["res"], direct["test"]
  assert list(res.preds) == BASELINES  # patchcore: not a baseline
  labels, n = np.array([s.label for s in test]), len(test)
  for name, pred in res.preds.items():
    assert pred.image_scores.shape == (n,) and pred.maps.shape == (n, 64, 64)
    assert pred.masks.shape == (n, 64, 64)
    np.testing.assert_array_equal(pred.labels, labels)
    np.testing.assert_array_equal(pred.indices, np.arange(n))
    info = res.infos[name]
    assert info.method == name and info.bank_size is None
    assert info.n_outlier_patches is None
    assert np.isfinite(info.fit_s) and info.fit_s >= 0  # recorded
  assert res.infos["padim"].n_images == 13
  assert res.infos["padim"].n_patches == 13 * 16 * 16  # the stage2 grid
  assert res.infos["padim"].train_images is None
  sub = res.infos["padim_filter+padim"]
  assert sub.n_images == 11
  np.testing.assert_array_equal(sub.train_images, np.arange(2, 13))
  auroc = inference.evaluate(res.preds["cflow"])["image_auroc"]
  print("CFLOW image AUROC", auroc)
  assert auroc > 0.8
  assert np.isfinite(res.extract_s) and res.extract_s >= 0  # recorded


def _padim_embeddings(ex, pre, samples, channels):
  images = np.stack([pre.load_sample(s, with_mask=False)[0] for s in samples])
  return np.concatenate([
      np.asarray(padim.embed_maps(ex(images[i : i + 8]), channels))[
          : len(images[i : i + 8])
      ]
      for i in range(0, len(images), 8)
  ])


def test_padim_scores_equal_one_fit_on_the_training_images(direct):
  ex, pre, opts = direct["ex"], direct["pre"], direct["opts"]
  key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), fitters.PADIM_SEED)
  channels = padim.select_channels(key, 176, 100)
  train = _padim_embeddings(ex, pre, direct["train"], channels)
  test = _padim_embeddings(ex, pre, direct["test"], channels)
  kw = dict(channels=channels, grid=(16, 16), image_size=(64, 64))
  for name, rows in (
      ("padim", slice(None)),
      ("padim_filter+padim", [*range(2, 13)]),
  ):
    model = padim.fit_arrays(train[rows], **kw)
    ref = np.asarray(padim.score(model, test)[0])
    got = direct["res"].preds[name].image_scores
    np.testing.assert_allclose(got, ref, rtol=1e-3, err_msg=name)


def test_one_loop_scores_banks_and_baselines_alike(direct):
  """Banks ('features') and baselines ('maps') in one stream: each scores
  bit for bit what it scores in a loop of its own."""
  bb, ex, pre = direct["bb"], direct["ex"], direct["pre"]
  embed = features.EmbedOptions(pretrain_embed_dim=64, target_embed_dim=32)
  emb = embedding.for_backbone(bb, embed, 8)
  loader = embedding.LoaderOptions(num_workers=1)
  feats = embedding.extract_features(emb, direct["train"], pre, loader)
  bank = scoring.make_bank(
      feats.reshape(-1, 32), grid=emb.grid((64, 64)), image_size=(64, 64)
  )
  fit_options = _fit_options(direct["opts"])
  fitted = fitters.fit(direct["train"], ex, pre, ["padim"], fit_options)
  banks = inference.bank_scorers({"bank": bank})
  both = inference.predict_samples(
      {**banks, **fitted.models},
      inference.Inputs(emb, ex),
      direct["test"],
      pre,
      num_workers=1,
      with_masks=True,
  )
  alone = inference.predict_samples(
      banks, inference.Inputs(emb), direct["test"], pre, num_workers=1
  )
  np.testing.assert_array_equal(
      both["bank"].image_scores, alone["bank"].image_scores
  )
  np.testing.assert_array_equal(both["bank"].maps, alone["bank"].maps)
  np.testing.assert_array_equal(
      both["padim"].image_scores, direct["res"].preds["padim"].image_scores
  )


def test_fitter_registry_and_empty_fits(direct):
  assert fitters.FITTERS.names() == ["cflow", "padim"]
  assert methods.family("padim_filter+cflow") == "cflow"
  with pytest.raises(ValueError, match="unknown baseline fitter 'nope'"):
    fitters.FITTERS.get("nope")
  fit_options = _fit_options(direct["opts"])
  args = (direct["train"], direct["ex"], direct["pre"])
  assert fitters.fit(*args, ["patchcore"], fit_options).models == {}
  with pytest.raises(ValueError, match="PaDiM: no training images"):
    fitters.fit(*args, ["padim"], fit_options, subsets={"padim": []})


def test_method_names():
  assert methods.parse_methods(
      "padim, cflow,padim_filter+softpatch,padim_filter+padim"
  ) == ["padim", "cflow", "padim_filter+softpatch_lof", "padim_filter+padim"]
  assert methods.is_baseline("padim_filter+cflow")
  assert not methods.is_baseline("padim_filter+patchcore")
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.parse_methods("padim_filter+nope")
  with pytest.raises(ValueError, match="one image filter per method"):
    methods.parse_methods("padim_filter+padim_filter+patchcore")
  # Fit mode and saved models need a memory bank: one clear error.
  for name in ("padim", "cflow", "padim_filter+patchcore"):
    with pytest.raises(ValueError, match="evaluate mode only"):
      methods.get_method(name)


# --------------------------------------------------------------------------
# Through the evaluate mode.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  load = backbones.load

  def offline(name, *args, **kwargs):
    # No ResNet-18 weights, whether or not this machine has a network.
    if name == "resnet18":
      raise backbones.WeightsUnavailableError("no network")
    return load(name, *args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setattr(backbones, "load", offline)
  workdir = str(tmp_path_factory.mktemp("run"))
  try:
    result = evaluate.run(_config(), workdir)
  finally:
    mp.undo()
  return workdir, {r["method"]: r for r in result["results"][: len(NAMES)]}


def _csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_every_baseline_gives_a_results_row(run):
  workdir, rows = run
  assert list(rows) == NAMES
  for name, row in rows.items():
    assert 0.0 <= row["image_auroc"] <= 1.0, (name, row)
    assert row["pixel_auroc"] is not None and row["n_train"] == 16
  print({n: round(r["image_auroc"], 3) for n, r in rows.items()})
  assert rows["cflow"]["image_auroc"] > 0.8
  for name in ("padim", "cflow"):
    assert rows[name]["bank_size"] is None
    assert rows[name]["n_outlier_patches"] is None
  assert (
      rows["patchcore"]["bank_size"]
      > rows["padim_filter+patchcore"]["bank_size"]
  )  # 16 images against 14
  assert rows["patchcore"].get("n_filtered_out") is None
  f = rows["padim_filter+patchcore"]
  assert f["image_filter_backbone"] == "efficientnet_lite0"  # the fallback
  assert f["n_filtered_out"] == 2  # int(0.15 * 16)
  assert f["bank_from_injected"] + f["bank_from_clean"] == f["bank_size"]
  table = {
      r["method"]: r
      for r in _csv(os.path.join(workdir, "results.csv"))
      if r["category"] == "synth"
  }
  assert table["padim"]["bank_size"] == "n/a"
  assert table["padim_filter+patchcore"]["n_filtered_out"] == "2"
  train = _csv(os.path.join(workdir, "train", "synth.csv"))
  kept = [r["fitted_on_padim_filter+patchcore"] == "True" for r in train]
  assert len(kept) == 16 and sum(kept) == 14
  assert os.path.isfile(os.path.join(workdir, "heatmaps", "synth.png"))
