"""baselines.image_filter: PaDiM* drops exactly the intended training images."""

import dataclasses
import fractions
import logging

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import defaults
from softpatch_jax import embedding
from softpatch_jax import fitting
from softpatch_jax import methods
from softpatch_jax import options
from softpatch_jax import thresholds
from softpatch_jax.baselines import fitters
from softpatch_jax.baselines import image_filter
from softpatch_jax.baselines import padim
from softpatch_jax.data import preprocess
from softpatch_jax.data import synthetic


def _reference_keep(scores, fraction):
  """Drop floor(fraction * N) images (fraction read as the exact decimal),
  highest score first, the earlier image first among equal scores."""
  n = len(scores)
  k = int(fractions.Fraction(str(fraction)) * n)
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  keep = np.ones(n, bool)
  keep[order[:k]] = False
  return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_mask_drops_exactly_the_top_fraction(seed):
  rng = np.random.default_rng(seed)
  for n in [1, 7, 20, 33, 100]:
    for fraction in [0.0, 0.1, 0.15, 0.29, 0.5, 0.99]:
      scores = rng.normal(size=n)
      if seed:  # many exact ties
        scores = np.round(scores, 0)
      got = image_filter.keep_mask(scores, fraction)
      ref = _reference_keep(list(scores), fraction)
      np.testing.assert_array_equal(got, ref, err_msg=f"{n} {fraction}")


def test_keep_mask_ties_and_bad_input():
  # All equal: the first images in the list go first.
  np.testing.assert_array_equal(
      image_filter.keep_mask(np.ones(10), 0.2), [False] * 2 + [True] * 8
  )
  np.testing.assert_array_equal(
      image_filter.keep_mask([1.0, 5.0, 5.0, 2.0], 0.5),
      [True, False, False, True],
  )
  assert image_filter.num_dropped(100, 0.29) == 29
  assert image_filter.num_dropped(132, 0.15) == 19
  with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
    image_filter.keep_mask(np.ones(4), 1.0)
  with pytest.raises(ValueError, match="1 of 3 image scores are not finite"):
    image_filter.keep_mask([0.0, np.nan, 1.0], 0.1)
  with pytest.raises(ValueError, match=r"\(N,\)"):
    image_filter.keep_mask(np.ones((2, 2)), 0.1)


def test_subset_info_maps_back_to_all_images():
  info = fitting.FitInfo("patchcore", 3, 12, 4)
  info.bank_images = np.array([0, 2, 2, 1])
  image_filter.subset_info(info, "padim_filter+patchcore", [0, 3, 4], 5)
  np.testing.assert_array_equal(info.bank_images, [0, 4, 4, 3])
  np.testing.assert_array_equal(info.image_outlier_fraction, [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(info.train_images, [0, 3, 4])
  assert info.method == "padim_filter+patchcore"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  synthetic.make_mvtec_like(
      root, n_train=11, n_test_good=1, n_test_defect=1, size=32, seed=0
  )
  train, _ = data.mvtec.load_category(str(root), "synth")
  c = defaults.base_config()
  c.data.resize = c.data.crop = 32
  c.data.batch_size = 4
  c.data.num_workers = 1
  c.baselines.padim.channels.resnet18 = 12
  c.baselines.padim.channels.efficientnet_lite0 = 12
  return c, train


def _fit_options(c):
  opts = options.from_config(c)
  loader = embedding.LoaderOptions(num_workers=opts.data.num_workers)
  return opts, fitters.FitOptions(
      opts.baselines, opts.scoring, opts.seed, loader
  )


def test_held_out_scores_match_per_fold_fits(setup):
  c, train = setup
  opts, fit_options = _fit_options(c)
  bb = backbones.load("resnet18", weights="random")
  pre = preprocess.preprocess_for(opts.data, bb.mean, bb.std)
  ex = embedding.MapExtractor("resnet18", bb.variables, 4)
  channels = padim.select_channels(jax.random.PRNGKey(3), 448, 12)
  images = np.stack([pre.load_sample(s, with_mask=False)[0] for s in train])
  emb = np.concatenate([
      np.asarray(padim.embed_maps(ex(images[i : i + 4]), channels))[
          : len(images[i : i + 4])
      ]
      for i in range(0, len(images), 4)
  ])
  kw = dict(channels=channels, grid=(8, 8), image_size=(32, 32))
  for folds in (3, 1):
    b = dataclasses.replace(fit_options.baselines, filter_folds=folds)
    o = dataclasses.replace(fit_options, baselines=b)
    got = image_filter.filter_scores(train, ex, pre, channels, o, "t")
    ref = np.zeros(len(train))
    splits = [np.arange(len(train))]
    if folds > 1:
      splits = thresholds.fold_split(len(train), folds, c.seed)
    for held in splits:
      rest = np.setdiff1d(np.arange(len(train)), held) if folds > 1 else held
      model = padim.fit_arrays(emb[rest], **kw)
      ref[held] = np.asarray(padim.score(model, emb[held])[0])
    np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_missing_filter_weights_fall_back_with_a_warning(
    setup, monkeypatch, caplog
):
  c, train = setup
  c = c.copy_and_resolve_references()
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.backbone.weights = "random"
  c.baselines.filter_fraction = 0.2
  load = backbones.load

  def offline(name, *args, **kwargs):
    if name == "resnet18":
      raise backbones.WeightsUnavailableError("no network")
    return load(name, *args, **kwargs)

  monkeypatch.setattr(backbones, "load", offline)
  opts, fit_options = _fit_options(c)
  bb = opts.backbone.load(opts.seed)
  pre = preprocess.preprocess_for(opts.data, bb.mean, bb.std)
  ex = embedding.MapExtractor(bb.name, bb.variables, opts.data.batch_size)
  names = ["padim_filter+patchcore", "patchcore", "padim_filter+padim"]
  with caplog.at_level(logging.WARNING):
    res = image_filter.image_filter(
        train, ex, pre, names, fit_options, label="synth"
    )
  assert "no resnet18 weights" in caplog.text
  assert "efficientnet_lite0 instead" in caplog.text
  assert res.fields["image_filter_backbone"] == "efficientnet_lite0"
  assert res.fields["n_filtered_out"] == 2  # int(0.2 * 11)
  assert set(res.subsets) == {"padim_filter+patchcore", "padim_filter+padim"}
  kept = res.subsets["padim_filter+patchcore"]
  np.testing.assert_array_equal(
      kept, np.flatnonzero(image_filter.keep_mask(res.scores, 0.2))
  )
  none = image_filter.image_filter(train, ex, pre, ["patchcore"], fit_options)
  assert none == image_filter.FilterResult({}, {})


def test_filter_extractor_takes_the_filter_backbone(setup):
  c, _ = setup
  c = c.copy_and_resolve_references()
  c.backbone.name = "efficientnet_lite0"
  c.baselines.filter_weights = "random"
  opts, fit_options = _fit_options(c)
  lite = backbones.load("efficientnet_lite0", weights="random")
  pre = preprocess.preprocess_for(opts.data, lite.mean, lite.std)
  ex = embedding.MapExtractor(lite.name, lite.variables, 4)
  fex, fpre = image_filter.filter_extractor(ex, pre, fit_options, "t")
  assert fex.name == "resnet18" and fex.batch_size == 4
  assert fex.taps == ("layer1", "layer2", "layer3")
  resnet = backbones.load("resnet18", weights="random")
  assert fpre == preprocess.preprocess_for(opts.data, resnet.mean, resnet.std)
  assert fpre != pre


def test_fit_filtered_banks_fits_on_the_kept_rows():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(6, 4, 8)).astype(np.float32)
  fitted = fitting.Fitted({}, {}, feats, (2, 2), (8, 8), 0.0)
  options = fitting.BankOptions(
      coreset=coreset.CoresetOptions(projection_dim=4)
  )
  rows = np.array([0, 2, 3, 5])
  names = ["padim_filter+patchcore", "patchcore", "padim_filter+padim"]
  subsets = {n: rows for n in names if n.startswith("padim_filter")}
  image_filter.fit_filtered_banks(fitted, names, subsets, options, seed=3)
  assert list(fitted.banks) == ["padim_filter+patchcore"]
  geometry = methods.BankGeometry((2, 2), (8, 8))
  key = jax.random.PRNGKey(3)
  bank, _ = fitting.fit_bank(feats[rows], "patchcore", key, options, geometry)
  got = fitted.banks["padim_filter+patchcore"]
  np.testing.assert_array_equal(got.features, bank.features)
  info = fitted.infos["padim_filter+patchcore"]
  assert info.method == "padim_filter+patchcore"
  np.testing.assert_array_equal(info.train_images, rows)
  assert set(info.bank_images) <= set(rows)
  np.testing.assert_array_equal(info.image_outlier_fraction, [0, 1, 0, 0, 1, 0])
