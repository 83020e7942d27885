"""PaDiM of softpatch_jax against anomalib's PaDiM torch modules, same taps.

Both fit on the same EfficientNet-Lite0 stage2/3/5 maps of ELPV cells
(defaults.study_base('elpv'), computed by softpatch_jax; see
compare_cflow_reference.py) with the same random channel subset (100 of
176, our `fitters.padim_channels`). Ours: `padim.embed_maps` (bilinear
upsampling to the stage2 grid), `padim.fit_arrays`, `padim.score`.
Reference: anomalib's embedding rule (nearest upsampling, concatenation,
channel selection), its MultiVariateGaussian (covariance + 0.01 I, inverse)
and its anomaly-map generator (Mahalanobis distance, bilinear upsampling,
Gaussian blur sigma 4); image score = map maximum. Image AUROC per category.

Run from the benchmark venv (see compare_cflow_reference.py):
  nice -n 10 /work/refenv/bin/python benchmarks/compare_padim_reference.py

Measured (2-core x86-64 CPU, no GPU), clean: mono ours 0.948 vs reference
0.940; poly ours 0.835 vs 0.875 (results_reference_baselines.json, "padim").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
from sklearn.metrics import roc_auc_score
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_cflow_reference as common  # noqa: E402  (a sibling script)

from softpatch_jax.baselines import options as baseline_options  # noqa: E402
from softpatch_jax.baselines import padim  # noqa: E402


def channels(total):
  key = jax.random.fold_in(jax.random.PRNGKey(0), 1)
  n = baseline_options.PadimOptions().channels_for("efficientnet_lite0")
  return padim.select_channels(key, total, min(n, total))


def ours(train, test, y, idx):
  xtr = padim.embed_maps([np.asarray(m) for m in train], idx)
  grid = train[0].shape[1:3]
  model = padim.fit_arrays(
      np.asarray(xtr), channels=idx, grid=grid, image_size=(128, 128)
  )
  img, _, _ = padim.score(model, padim.embed_maps(test, idx))
  return float(roc_auc_score(y, np.asarray(img)))


def ref_embed(maps, idx):
  t = [
      torch.from_numpy(np.ascontiguousarray(m)).permute(0, 3, 1, 2)
      for m in maps
  ]
  e = t[0]
  for m in t[1:]:
    e = torch.cat([e, F.interpolate(m, size=e.shape[-2:], mode="nearest")], 1)
  return e[:, list(idx)]


def reference(mods, train, test, y, idx):
  mvg = mods["models/components/stats/multi_variate_gaussian.py"]
  amap = mods["models/image/padim/anomaly_map.py"]
  gauss = mvg.MultiVariateGaussian()
  mean, inv = gauss.fit(ref_embed(train, idx))
  gen = amap.AnomalyMapGenerator(sigma=4)
  m = gen.compute_anomaly_map(
      ref_embed(test, idx), mean, inv, image_size=(128, 128)
  )
  score = torch.amax(m.reshape(len(y), -1), dim=1).numpy()
  return float(roc_auc_score(y, score))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--categories", default="mono,poly")
  ap.add_argument("--noise", default="0.0")
  args = ap.parse_args()
  mods = common.load_anomalib(
      "models/components/base/dynamic_buffer.py",
      "models/components/stats/multi_variate_gaussian.py",
      "models/components/filters/blur.py",
      "models/image/padim/anomaly_map.py",
  )
  rows = []
  for noise in [float(v) for v in args.noise.split(",")]:
    for cat in args.categories.split(","):
      train, test, y, n_inj = common.cell_maps(cat, noise)
      idx = channels(sum(m.shape[-1] for m in train))
      row = dict(category=cat, noise=noise, injected=n_inj)
      row["ours"] = ours(train, test, y, idx)
      row["reference"] = reference(mods, train, test, y, idx)
      print(json.dumps(row), flush=True)
      rows.append(row)
  common.save("padim", rows)


if __name__ == "__main__":
  main()
