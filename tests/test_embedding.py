"""embedding: the Embedder and the tap maps over padded batches, and
extract_features (errors collected, feature stores, empty input)."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import features
from softpatch_jax.data import synthetic

EMBED = features.EmbedOptions(pretrain_embed_dim=64, target_embed_dim=32)


@pytest.fixture(scope="module")
def bb():
  return backbones.load(
      "efficientnet_lite0", weights="random", layers=("stage3", "stage5")
  )


@pytest.fixture(scope="module")
def train(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  synthetic.make_mvtec_like(
      root, n_train=5, n_test_good=1, n_test_defect=1, size=32, seed=0
  )
  return data.mvtec.load_category(str(root), "synth")[0]


def test_embedder_pads_and_matches_embed(bb):
  emb = embedding.for_backbone(bb, EMBED, batch_size=4)
  assert emb.spec == features.EmbedSpec(
      bb.module, bb.layers, pretrain_embed_dim=64, target_embed_dim=32
  )
  assert emb.batch_size == 4 and emb.mesh is None
  assert emb.grid((64, 64)) == (8, 8)
  x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  got = np.asarray(emb(x))
  assert got.shape == (3, 64, 32)
  ref, grid = features.embed(bb.variables, x, emb.spec)
  assert grid == (8, 8)
  np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-4, atol=1e-4)
  # A short batch is padded: the same rows as in a full batch.
  np.testing.assert_array_equal(np.asarray(emb(x[:1])), got[:1])
  with pytest.raises(ValueError, match="exceeds batch_size 4"):
    emb(np.zeros((5, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
    embedding.Embedder(bb.variables, emb.spec, batch_size=0)


def test_pad_batch():
  x = np.ones((2, 3), np.float32)
  got = embedding.pad_batch(x, 4)
  assert got.dtype == np.float32 and got.shape == (4, 3)
  np.testing.assert_array_equal(got, [[1] * 3] * 2 + [[0] * 3] * 2)
  assert embedding.pad_batch(x, 2) is x


def test_map_extractor_pads_and_shares_the_backbone_apply(bb):
  ex = embedding.MapExtractor(bb.name, bb.variables, 4)
  assert ex.taps == ("stage2", "stage3", "stage5")  # layer1-3 analogues
  assert ex.shapes((64, 64)) == [
      (1, 16, 16, 24),
      (1, 8, 8, 40),
      (1, 4, 4, 112),
  ]
  assert ex.channels((64, 64)) == 176
  x = np.random.default_rng(1).normal(size=(3, 64, 64, 3)).astype(np.float32)
  maps = ex(x)
  assert [m.shape[0] for m in maps] == [4, 4, 4]  # the padding stays
  # The one jitted apply per module: equal modules share it.
  module = backbones.tap_module(bb.name, ex.taps)
  assert backbones.jitted_apply(module) is backbones.jitted_apply(ex.module)
  ref = jax.jit(module.apply)(bb.variables, x)
  for tap, m in zip(ex.taps, maps):
    np.testing.assert_array_equal(np.asarray(m)[:3], np.asarray(ref[tap]))


def test_loader_options_check_their_fields():
  assert embedding.LoaderOptions() == embedding.LoaderOptions(
      4, None, "memory", "raise"
  )
  with pytest.raises(ValueError, match="config.data.num_workers"):
    embedding.LoaderOptions(num_workers=0)
  with pytest.raises(ValueError, match="config.data.feature_store"):
    embedding.LoaderOptions(feature_store="cloud")


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_extract_features_fills_one_array(bb, train, store):
  emb = embedding.for_backbone(bb, EMBED, batch_size=2)
  pre = data.Preprocess(resize=32, crop=32, mean=bb.mean, std=bb.std)
  loader = embedding.LoaderOptions(num_workers=1, feature_store=store)
  got = embedding.extract_features(emb, train, pre, loader, desc="t")
  assert got.shape == (5, 16, 32) and got.dtype == np.float32
  images = np.stack([pre.load_sample(s, with_mask=False)[0] for s in train])
  np.testing.assert_array_equal(
      np.asarray(got[:2]), np.asarray(emb(images[:2]))
  )
  with pytest.raises(
      ValueError, match=r"no images to extract features from \(t\)"
  ):
    embedding.extract_features(emb, [], pre, loader, desc="t")


def test_extract_features_collects_every_unreadable_file(bb, train, tmp_path):
  bad = []
  for i in range(3):
    path = os.path.join(tmp_path, f"broken{i}.png")
    with open(path, "wb") as f:
      f.write(b"not a png")
    bad.append(data.Sample(path, 0, "good"))
  samples = [bad[0], *train[:3], bad[1], bad[2]]
  emb = embedding.for_backbone(bb, EMBED, batch_size=2)
  pre = data.Preprocess(resize=32, crop=32, mean=bb.mean, std=bb.std)
  loader = embedding.LoaderOptions(num_workers=1)
  with pytest.raises(ValueError) as e:
    embedding.extract_features(
        emb,
        samples,
        pre,
        dataclasses.replace(loader, errors="collect"),
        what="training image",
    )
  msg = str(e.value)
  assert msg.startswith("3 training image(s) cannot be read:")
  for s in bad:
    assert os.path.basename(s.path) in msg
  with pytest.raises(ValueError) as e:  # 'raise': the first one only
    embedding.extract_features(emb, samples, pre, loader)
  assert "broken0.png" in str(e.value) and "broken1" not in str(e.value)


def test_extract_features_refuses_nonfinite_features(bb, train):
  spec = EMBED.spec(bb.module, bb.layers)
  broken = jax.tree_util.tree_map(lambda a: a * np.nan, bb.variables)
  emb = embedding.Embedder(broken, spec, batch_size=2)
  pre = data.Preprocess(resize=32, crop=32, mean=bb.mean, std=bb.std)
  loader = embedding.LoaderOptions(num_workers=1)
  with pytest.raises(ValueError, match=embedding.BROKEN_HINT):
    embedding.extract_features(emb, train, pre, loader, desc="t")
