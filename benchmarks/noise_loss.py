r"""What noise costs each method, on the same test images.

The no-overlap protocol removes the injected images from the test set, so
its AUROC at ratio r and the clean AUROC are measured on different test
sets. This script reads a finished noise sweep (`softpatch_jax.experiments
--config=experiments/noise_sweep`, which keeps every test image's score per
cell in cells/<cell>/scores/<category>.csv) and scores, for every method,
seed and category:
  clean_same   the clean model (ratio 0) on the test images of the noisy
               no-overlap cell;
  noisy        the noisy no-overlap model on those images;
  overlap      the noisy overlap model on its own (full) test set;
  clean        the clean model on the full test set.
Means over the categories, then mean +- std over seeds.

  python benchmarks/noise_loss.py --sweep out/noise_sweep --ratio 0.4 \
      --out docs/results/noise_loss.md
"""

import argparse
import csv
import glob
import os

import numpy as np
from sklearn.metrics import roc_auc_score


def read_scores(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def auroc(rows, method, paths=None):
  rows = [r for r in rows if paths is None or r["path"] in paths]
  y = [int(r["label"]) for r in rows]
  s = [float(r[f"score_{method}"]) for r in rows]
  return roc_auc_score(y, s)


def cell(sweep, overlap, ratio, seed, cat):
  name = f"noise.overlap={overlap}__noise.ratio={ratio}__seed={seed}"
  hits = glob.glob(
      os.path.join(sweep, "cells", f"{name}__category={cat}", "scores", "*")
  )
  if len(hits) != 1:
    raise SystemExit(f"{sweep}: no finished cell {name} / {cat}")
  return read_scores(hits[0])


def losses(sweep, ratio, seeds, cats):
  out = {}
  for seed in seeds:
    per = {}
    for cat in cats:
      clean = cell(sweep, True, 0, seed, cat)
      noisy = cell(sweep, False, ratio, seed, cat)
      over = cell(sweep, True, ratio, seed, cat)
      paths = {r["path"] for r in noisy}
      methods = [k[6:] for k in noisy[0] if k.startswith("score_")]
      for m in methods:
        vals = (
            auroc(clean, m),
            auroc(clean, m, paths),
            auroc(noisy, m),
            auroc(over, m),
        )
        per.setdefault(m, []).append(vals)
    for m, vals in per.items():
      out.setdefault(m, []).append(np.mean(vals, axis=0))
  return out


def table(out, ratio) -> str:
  head = (
      f"| method | clean | overlap {ratio:g} | clean, no-overlap test set |"
      f" no overlap {ratio:g} | loss without overlap | loss with overlap |"
  )
  lines = [head, "|" + "---|" * 7]
  fmt = lambda a: f"{a.mean():.3f} ± {a.std(ddof=1):.3f}"
  for m, vals in out.items():
    v = np.array(vals)  # (seeds, 4)
    lines.append(
        f"| {m} | {fmt(v[:, 0])} | {fmt(v[:, 3])} | {fmt(v[:, 1])} | "
        f"{fmt(v[:, 2])} | {fmt(v[:, 1] - v[:, 2])} | "
        f"{fmt(v[:, 0] - v[:, 3])} |"
    )
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sweep", required=True)
  ap.add_argument("--ratio", type=float, default=0.4)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--categories", default="mono,poly")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  out = losses(a.sweep, a.ratio, seeds, a.categories.split(","))
  text = table(out, a.ratio)
  print(text)
  if a.out:
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, a.out)


if __name__ == "__main__":
  main()
