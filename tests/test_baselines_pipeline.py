"""baselines.pipeline: PaDiM, CFLOW and PaDiM* through the evaluate mode."""

import csv
import os

import jax
import numpy as np
import pytest

from softpatch_jax import backbones
from softpatch_jax import data
from softpatch_jax import defaults
from softpatch_jax import engine
from softpatch_jax import experiment
from softpatch_jax import methods
from softpatch_jax.baselines import padim
from softpatch_jax.baselines import pipeline

NAMES = ["padim", "cflow", "padim_filter+patchcore", "patchcore"]


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
    result = experiment.run(_config(), workdir)
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
    assert rows[name]["n_noise_patches"] is None
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


def test_padim_scores_equal_one_fit_on_all_training_images(run):
  workdir, _ = run
  c = _config()
  train, test = data.load_dataset(c, "synth", workdir)
  train, test, _ = data.apply_noise(c, "synth", train, test)
  bb = engine.build_backbone(c)
  pre = engine.build_preprocess(c, bb, train)
  ex = pipeline.MapExtractor(bb.name, bb.variables, 8)
  key = jax.random.fold_in(jax.random.PRNGKey(c.seed), pipeline._PADIM_SEED)
  channels = padim.select_channels(key, 176, 100)

  def embed(samples):
    images = np.stack([
        pre.load_sample(s, with_mask=False, augment=data.build_augment(c))[0]
        for s in samples
    ])
    return np.concatenate([
        np.asarray(padim.embed_maps(ex(images[i : i + 8]), channels))[
            : len(images[i : i + 8])
        ]
        for i in range(0, len(images), 8)
    ])

  model = padim.fit_arrays(
      embed(train), channels=channels, grid=(16, 16), image_size=(64, 64)
  )
  ref = np.asarray(padim.score(model, embed(test))[0])
  got = [
      float(r["score_padim"])
      for r in _csv(os.path.join(workdir, "scores", "synth.csv"))
  ]
  np.testing.assert_allclose(got, ref, rtol=1e-3)


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
