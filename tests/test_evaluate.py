"""End to end on generated data: SoftPatch-LOF beats PatchCore under noise.

Injects 20 % anomalous images into training with overlap (the injected images
stay in the test set). PatchCore memorises their defects and then scores the
same defects as normal; SoftPatch's LOF flags those patches as outliers and
keeps them out of the memory bank.
"""

import csv
import json
import os

import numpy as np
import pytest

from softpatch_jax import defaults
from softpatch_jax import data
from softpatch_jax import evaluate
from softpatch_jax import methods
from softpatch_jax import options


def _config(seed, size=96):
  c = defaults.base_config()
  c.seed = seed
  c.data.dataset = "synthetic"
  c.data.categories = "synth"
  c.data.resize = size
  c.data.crop = size
  c.data.batch_size = 16
  c.data.num_workers = 2
  c.data.synthetic.n_train = 25
  c.data.synthetic.n_test_good = 10
  c.data.synthetic.n_test_defect = 8
  c.data.synthetic.size = size
  c.data.synthetic.seed = seed
  c.backbone.name = "efficientnet_lite0"
  c.backbone.layers = ("stage3", "stage5")
  c.noise.ratio = 0.2
  c.noise.overlap = True
  c.noise.seed = seed
  c.methods = "softpatch_lof,patchcore"
  c.output.num_heatmaps = 2
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for seed in (0, 1, 2):
    workdir = str(tmp_path_factory.mktemp(f"run{seed}"))
    out[seed] = (workdir, evaluate.run(_config(seed), workdir))
  return out


def _metric(result, method, key):
  rows = [
      r
      for r in result["results"]
      if r["method"] == method and r["category"] == "synth"
  ]
  assert len(rows) == 1
  return rows[0][key]


def test_softpatch_beats_patchcore_with_injected_noise(runs):
  sp = [_metric(r, "softpatch_lof", "image_auroc") for _, r in runs.values()]
  pc = [_metric(r, "patchcore", "image_auroc") for _, r in runs.values()]
  print("softpatch_lof image AUROC", sp, "patchcore", pc)
  assert np.mean(sp) > np.mean(pc) + 0.02, (sp, pc)
  # Pixel level too: PatchCore's maps go blind on the memorised defects.
  sp_px = [_metric(r, "softpatch_lof", "pixel_auroc") for _, r in runs.values()]
  pc_px = [_metric(r, "patchcore", "pixel_auroc") for _, r in runs.values()]
  print("softpatch_lof pixel AUROC", sp_px, "patchcore", pc_px)
  assert np.mean(sp_px) > np.mean(pc_px), (sp_px, pc_px)


def test_lof_flags_injected_images(runs):
  for _, r in runs.values():
    inj = _metric(r, "softpatch_lof", "outlier_frac_injected")
    clean = _metric(r, "softpatch_lof", "outlier_frac_clean")
    assert inj > 2 * clean, (inj, clean)


def test_result_files(runs):
  workdir, result = runs[0]
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert {r["method"] for r in rows} == {"softpatch_lof", "patchcore"}
  assert {r["category"] for r in rows} == {"synth", "mean"}
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["results"] == json.loads(json.dumps(result["results"]))
  assert saved["noise"]["synth"]["n_injected"] == 5
  assert os.path.getsize(os.path.join(workdir, "heatmaps", "synth.png")) > 0
  # The per-category files that explain the result.
  with open(os.path.join(workdir, "scores", "synth.csv")) as f:
    scores = list(csv.DictReader(f))
  assert len(scores) == _metric(result, "patchcore", "n_test")
  assert sum(r["injected_into_train"] == "True" for r in scores) == 5
  with open(os.path.join(workdir, "train", "synth.csv")) as f:
    train = list(csv.DictReader(f))
  bank = sum(int(r["bank_entries_softpatch_lof"]) for r in train)
  assert bank == _metric(result, "softpatch_lof", "bank_size")
  from_injected = sum(
      int(r["bank_entries_softpatch_lof"])
      for r in train
      if r["injected"] == "True"
  )
  assert from_injected == _metric(result, "softpatch_lof", "bank_from_injected")
  # SoftPatch keeps fewer injected patches than PatchCore.
  assert from_injected < _metric(result, "patchcore", "bank_from_injected")
  assert _metric(result, "softpatch_lof", "image_auroc_by_defect")
  # No temp files left behind.
  assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]


def test_patchcore_random_and_gaussian_run(tmp_path):
  c = _config(0, size=64)
  c.methods = "patchcore_random,softpatch_gaussian,softpatch_nearest"
  c.output.num_heatmaps = 0
  # Also exercise augmentation of the injected copies.
  c.noise.augment = True
  c.noise.augment_blur = True
  c.noise.augment_noise = True
  result = evaluate.run(c, str(tmp_path))
  assert result["noise"]["synth"]["augment"] is True
  for m in ("patchcore_random", "softpatch_gaussian", "softpatch_nearest"):
    assert _metric(result, m, "image_auroc") > 0.8, m
  for m in ("softpatch_gaussian", "softpatch_nearest"):
    # The other discriminators also single out the injected images.
    assert _metric(result, m, "outlier_frac_injected") > _metric(
        result, m, "outlier_frac_clean"
    ), m


def test_synthetic_data_follows_its_parameters(tmp_path):
  c = _config(0, size=64)
  c.data.synthetic.n_train = 4
  load = lambda: data.load_dataset(
      options.from_config(c).data, "synth", str(tmp_path)
  )
  assert len(load()[0]) == 4
  c.data.synthetic.n_train = 6  # other parameters: generated anew
  assert len(load()[0]) == 6
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_unknown_method_is_rejected():
  with pytest.raises(ValueError, match="unknown method"):
    methods.parse_methods("softpatch_lof,nope")


def test_inject_list_round_trips_through_results_json(tmp_path):
  c = _config(0, size=64)
  c.methods = "patchcore"
  c.output.num_heatmaps = 0
  listed = ["scratch/003.png", "synth/test/blob/001.png"]
  c.noise.inject_list = ",".join(listed)
  evaluate.run(c, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    noise = json.load(f)["noise"]["synth"]
  assert noise["draw"] == "list"
  assert noise["inject_list"] == ",".join(listed)
  got = ["/".join(p.split(os.sep)[-2:]) for p in noise["injected_paths"]]
  assert got == ["scratch/003.png", "blob/001.png"]  # in the given order
  with open(tmp_path / "scores" / "synth.csv") as f:
    seen = [
        r["path"]
        for r in csv.DictReader(f)
        if r["injected_into_train"] == "True"
    ]
  assert sorted(seen) == sorted(noise["injected_paths"])


def test_consensus_and_mutual_run_under_overlap(tmp_path):
  # The robust candidates in evaluate mode, beside PatchCore, with overlap.
  c = _config(0, size=64)
  c.methods = "patchcore,consensus,padim_filter+consensus,softpatch_mutual"
  c.output.num_heatmaps = 0
  result = evaluate.run(c, str(tmp_path))
  for m in ("consensus", "padim_filter+consensus", "softpatch_mutual"):
    assert _metric(result, m, "image_auroc") > 0.8, m
  # The memorised defects stay visible to consensus scoring.
  assert _metric(result, "consensus", "pixel_auroc") > _metric(
      result, "patchcore", "pixel_auroc"
  )
  n_train = _metric(result, "consensus", "n_train")
  assert _metric(result, "consensus", "bank_size") == n_train * 64
  assert _metric(result, "softpatch_mutual", "outlier_frac_injected") > (
      _metric(result, "softpatch_mutual", "outlier_frac_clean")
  )
