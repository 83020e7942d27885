"""Benchmarks softpatch_jax.kernels against the reference stack, same inputs.

  python benchmarks/bench_kernels.py              # full size (slow on 2 cores)
  python benchmarks/bench_kernels.py --scale 0.1  # quick run

"The reference" is the official SoftPatch PyTorch code (Jiang et al.,
NeurIPS 2022; see the README). Full-size shapes: LOF at [784, 230, 128]
(positions, images, dims); greedy coreset over 164,000 x 128 selecting
10 %; kNN with 49,000 queries against a 16,400 x 1,024 bank. --scale
multiplies positions / points / queries / bank rows. Baselines: sklearn
LocalOutlierFactor looped over positions, a batched torch LOF written the
way the reference computes it on GPU, a torch approximate greedy coreset in
the reference's style (distance column concatenated and re-reduced each
step), faiss-cpu IndexFlatL2 (the kNN section also times the exact pruned
host kNN, kernels.knn_pruned, on that noise and on 200 clusters). The
"pruned" section times the exact pruned k-center (kernels.kcenter_pruned,
numpy) against the dense XLA k-center on 181,000 x 128 selecting 10 %, for
a mixture of 200 Gaussians and for one Gaussian (no clusters: the worst
case for pruning).
Needs the `bench` extra (torch, scikit-learn, faiss-cpu). Prints each
comparison as a ratio and writes all numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax.kernels import kcenter
from softpatch_jax.kernels import kcenter_pruned
from softpatch_jax.kernels import knn
from softpatch_jax.kernels import knn_pruned
from softpatch_jax.kernels import lof

# The jitted internals of the public ops, AOT-compiled so that timings
# exclude compilation.
_KCENTER_XLA = kcenter._kcenter_xla  # pylint: disable=protected-access
_KNN_XLA = knn._knn_xla  # pylint: disable=protected-access


def _now():
  return time.perf_counter()


def _timed(fn, repeat=1):
  best = float("inf")
  out = None
  for _ in range(repeat):
    t = _now()
    out = fn()
    if not isinstance(out, (list, np.ndarray)):
      out = jax.block_until_ready(out)
    best = min(best, _now() - t)
  return best, out


def _aot(jitted, *args, **static):
  """Compiles ahead of time so timings exclude compilation."""
  t = _now()
  compiled = jitted.lower(*args, **static).compile()
  return compiled, _now() - t


def memory_read_bandwidth(nbytes=1 << 30):
  """GB/s of a streaming reduction over a buffer far larger than the LLC."""
  a = np.ones(nbytes // 4, np.float32)
  aj = jnp.asarray(a)
  f = jax.jit(jnp.sum)
  jax.block_until_ready(f(aj))
  t_np = min(_timed(lambda: a.sum())[0] for _ in range(3))
  t_jx = min(_timed(lambda: f(aj))[0] for _ in range(3))
  return {
      "numpy_sum_gbs": nbytes / t_np / 1e9,
      "jax_sum_gbs": nbytes / t_jx / 1e9,
      "best_gbs": nbytes / min(t_np, t_jx) / 1e9,
  }


# ----------------------------------------------------------------- baselines
def torch_batched_lof(x, k):
  """Batched LOF in torch as the reference's GPU variant computes it."""
  import torch  # pylint: disable=g-import-not-at-top

  p, n, _ = x.shape
  sq = (x * x).sum(-1, keepdim=True)
  dist = (
      sq + sq.transpose(-1, -2) - 2 * x.matmul(x.transpose(-1, -2))
  ).abs().sqrt() + 1e-6
  kd, ki = torch.topk(dist, k + 1, dim=-1, largest=False)
  kd, ki = kd[:, :, 1:], ki[:, :, 1:]
  kdist = kd[:, :, -1]
  reach = torch.maximum(dist, kdist.unsqueeze(1).expand(p, n, n))
  hot = torch.zeros_like(dist).scatter_(-1, ki, 1.0)
  lrd = k / (hot * reach).sum(-1)
  return (lrd.unsqueeze(1).expand(p, n, n) * hot).sum(-1) / k / lrd


def torch_greedy_coreset(feats, n_select, starts, weight):
  """Approximate greedy coreset in the reference's style (torch, CPU)."""
  import torch  # pylint: disable=g-import-not-at-top

  def dists(a, b):
    aa = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
    bb = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
    return (-2 * a.mm(b.T) + aa + bb).clamp(0, None).sqrt()

  w = weight.reshape(-1, 1)
  with torch.no_grad():
    anchor = dists(feats, feats[starts]).mean(-1, keepdim=True) * w
    picked = []
    for _ in range(n_select):
      i = int(torch.argmax(anchor).item())
      picked.append(i)
      new = dists(feats, feats[i : i + 1]) * w
      anchor = torch.cat([anchor, new], dim=-1)
      anchor = torch.min(anchor, dim=1).values.reshape(-1, 1)
  return np.asarray(picked)


# ---------------------------------------------------------------- sections
def bench_lof(rng, scale, k, res):
  from sklearn.neighbors import LocalOutlierFactor  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  p = max(1, round(784 * scale))
  x = rng.normal(size=(p, 230, 128)).astype(np.float32)
  xj = jnp.asarray(x)
  keff = lof.effective_k(k, x.shape[1])
  # The public op (position slices in parallel threads on CPU); the first
  # call compiles, the timed calls reuse the compiled programs.
  comp, _ = _timed(lambda: lof.lof(xj, keff))
  t_ours, ours = _timed(lambda: lof.lof(xj, keff), repeat=3)

  def sk_loop():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return np.stack([
          -LocalOutlierFactor(n_neighbors=k).fit(x[i]).negative_outlier_factor_
          for i in range(p)
      ])

  t_sk, sk = _timed(sk_loop, repeat=2)
  xt = torch.from_numpy(x)
  t_tb, tb = _timed(lambda: torch_batched_lof(xt, keff).numpy(), repeat=3)
  res["lof"] = {
      "shape": list(x.shape),
      "k": k,
      "ours_s": t_ours,
      "ours_compile_s": comp,
      "sklearn_loop_s": t_sk,
      "torch_batched_s": t_tb,
      "speedup_vs_sklearn": t_sk / t_ours,
      "speedup_vs_torch": t_tb / t_ours,
      "max_abs_diff_vs_sklearn": float(np.abs(np.asarray(ours) - sk).max()),
      "max_abs_diff_torch_vs_sklearn": float(np.abs(tb - sk).max()),
      "targets": {"vs_sklearn": 20.0, "vs_torch": 2.0},
  }


def bench_coreset(rng, scale, res, bandwidth, with_bf16):
  import torch  # pylint: disable=g-import-not-at-top

  m = max(1000, round(164_000 * scale))
  n_sel = m // 10
  x = rng.normal(size=(m, 128)).astype(np.float32)
  w = (rng.random(m) >= 0.15).astype(np.float32)
  starts = rng.choice(m, 10, replace=False).astype(np.int32)
  xj, wj, sj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(starts)
  comp_f, comp = _aot(
      _KCENTER_XLA, x=xj, start_idx=sj, w=wj, n_select=n_sel, storage_dtype=None
  )
  t_ours, sel = _timed(lambda: comp_f(x=xj, start_idx=sj, w=wj))
  sel = np.asarray(sel)
  t_torch, sel_t = _timed(
      lambda: torch_greedy_coreset(
          torch.from_numpy(x),
          n_sel,
          torch.from_numpy(starts).long(),
          torch.from_numpy(w),
      )
  )
  bytes_per_iter = m * 128 * 4 + m * 4 * 4  # x once + (M,) vectors
  gbs = bytes_per_iter * n_sel / t_ours / 1e9
  out = {
      "shape": [m, 128],
      "n_select": n_sel,
      "ours_s": t_ours,
      "ours_compile_s": comp,
      "torch_greedy_s": t_torch,
      "speedup_vs_torch": t_torch / t_ours,
      "ours_gbs": gbs,
      "machine_read_gbs": bandwidth["best_gbs"],
      "fraction_of_bandwidth": gbs / bandwidth["best_gbs"],
      "same_selection_as_torch": float(np.mean(sel == sel_t)),
      "targets": {"vs_torch": 3.0},
  }
  if with_bf16:
    comp_b, _ = _aot(
        _KCENTER_XLA,
        x=xj,
        start_idx=sj,
        w=wj,
        n_select=n_sel,
        storage_dtype=jnp.dtype(jnp.bfloat16),
    )
    t_b, sel_b = _timed(lambda: comp_b(x=xj, start_idx=sj, w=wj))
    sel_b = np.asarray(sel_b)
    first_diff = int(np.argmax(sel_b != sel)) if np.any(sel_b != sel) else n_sel
    out.update({
        "ours_bf16_s": t_b,
        "bf16_same_position_fraction": float(np.mean(sel_b == sel)),
        "bf16_set_overlap": len(set(sel_b) & set(sel)) / n_sel,
        "bf16_first_divergence_step": first_diff,
    })
  res["coreset"] = out


def bench_knn(rng, scale, res, with_bf16):
  import faiss  # pylint: disable=g-import-not-at-top

  mq = max(100, round(49_000 * scale))
  nb = max(100, round(16_400 * scale))
  q = rng.normal(size=(mq, 1024)).astype(np.float32)
  b = rng.normal(size=(nb, 1024)).astype(np.float32)
  qj, bj = jnp.asarray(q), jnp.asarray(b)
  # The public op's own tile sizes (knn.default_blocks).
  bq, bn = knn.default_blocks(mq, nb, 1)
  comp_f, comp = _aot(
      _KNN_XLA, qj, bj, k=1, block_q=bq, block_n=bn, compute_dtype=None
  )
  t_ours, (d, i) = _timed(lambda: comp_f(qj, bj), repeat=2)
  faiss.omp_set_num_threads(os.cpu_count() or 1)
  index = faiss.IndexFlatL2(1024)
  index.add(b)
  t_faiss, (fd, fi) = _timed(lambda: list(index.search(q, 1)), repeat=2)
  i = np.asarray(i)
  out = {
      "queries": mq,
      "bank": nb,
      "dim": 1024,
      "ours_s": t_ours,
      "ours_compile_s": comp,
      "faiss_s": t_faiss,
      "ratio_ours_over_faiss": t_ours / t_faiss,
      "index_agreement_vs_faiss": float(np.mean(i[:, 0] == fi[:, 0])),
      "max_rel_dist_diff_vs_faiss": float(
          np.max(
              np.abs(np.asarray(d)[:, 0] - fd[:, 0])
              / np.maximum(fd[:, 0], 1e-6)
          )
      ),
      "targets": {"ours_over_faiss_at_most": 1.2},
  }
  if with_bf16:
    # bf16 inputs, f32 accumulation. Timed on a query subset: XLA:CPU has
    # no native bf16 GEMM on this machine, so this is about exactness.
    sub = min(mq, 4_900)
    comp_b, _ = _aot(
        _KNN_XLA,
        qj[:sub],
        bj,
        k=1,
        block_q=bq,
        block_n=min(bn, nb),
        compute_dtype=jnp.dtype(jnp.bfloat16),
    )
    t_b, (_, ib) = _timed(lambda: comp_b(qj[:sub], bj))
    out.update({
        "bf16_queries": sub,
        "bf16_s": t_b,
        "bf16_exact_index_agreement": float(
            np.mean(np.asarray(ib)[:, 0] == i[:sub, 0])
        ),
    })
  # The exact pruned host search (kernels.knn_pruned, what scoring runs on
  # CPU): on this isotropic noise (its worst case, where it falls back to
  # the dense search) and on a mixture of 200 Gaussians, each against faiss.
  t_build, index = _timed(lambda: knn_pruned.build_index(b))
  t_pg, (pd_, pi_) = _timed(lambda: knn_pruned.nearest(index, q), repeat=2)
  # Bank and queries from one mixture (the same 200 centres).
  both = clustered_points(rng, nb + mq, 1024)
  bc, qc = both[:nb], both[nb:]
  index_c = knn_pruned.build_index(bc)
  t_pc, (_, pic) = _timed(lambda: knn_pruned.nearest(index_c, qc), repeat=2)
  index = faiss.IndexFlatL2(1024)
  index.add(bc)
  t_fc, (_, fic) = _timed(lambda: list(index.search(qc, 1)), repeat=2)
  out.update({
      "pruned_build_s": t_build,
      "pruned_gauss_s": t_pg,
      "pruned_gauss_over_faiss": t_pg / t_faiss,
      "pruned_gauss_index_agreement_vs_faiss": float(np.mean(pi_ == fi[:, 0])),
      "pruned_clustered_s": t_pc,
      "faiss_clustered_s": t_fc,
      "pruned_clustered_over_faiss": t_pc / t_fc,
      "pruned_clustered_index_agreement_vs_faiss": float(
          np.mean(pic == fic[:, 0])
      ),
  })
  res["knn"] = out


def clustered_points(rng, m, d, n_clusters=200, spread=0.5):
  """A mixture of isotropic Gaussians: centres 3 N(0, I), std `spread`."""
  centres = rng.normal(size=(n_clusters, d)) * 3.0
  lab = rng.integers(0, n_clusters, m)
  return (centres[lab] + rng.normal(size=(m, d)) * spread).astype(np.float32)


def numpy_greedy_prefix(x, n, starts, w):
  """The first n picks of the float32 numpy greedy (as tests/_testutil)."""

  def dist_to(i):
    return np.sqrt(((x - x[i]) * (x - x[i])).sum(1))

  acc = np.zeros(len(x), np.float32)
  for s in starts:
    acc = acc + dist_to(int(s))
  dist = acc / np.asarray(len(starts), np.float32) * w
  picks = []
  for _ in range(n):
    picks.append(int(np.argmax(dist)))
    dist = np.minimum(dist, dist_to(picks[-1]) * w)
  return np.array(picks, np.int32)


def bench_kcenter_pruned(rng, scale, res, datasets, spread, check):
  """Exact pruned k-center (numpy) against the dense XLA path, same process.

  Full size: 181,000 x 128 selecting 10 %. 'clustered' is a mixture of 200
  Gaussians (clustered_points), 'gaussian' one Gaussian (the worst case
  for pruning); a path ending in .npy loads (M, d) features (e.g. real
  projected patch features), used whole. The first `check` pruned picks
  are compared with the float32 numpy greedy; the XLA path rounds its
  expanded-form distances differently, so its picks may part from both.
  """
  out = {"spread": spread}
  for name in datasets:
    m = max(1000, round(181_000 * scale))
    if name.endswith(".npy"):
      x = np.ascontiguousarray(np.load(name), np.float32)
      m = len(x)
    elif name == "gaussian":
      x = rng.normal(size=(m, 128)).astype(np.float32)
    else:
      x = clustered_points(rng, m, 128, spread=spread)
    n_sel = m // 10
    w = (rng.random(m) >= 0.15).astype(np.float32)
    starts = rng.choice(m, 10, replace=False).astype(np.int32)
    xj, wj, sj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(starts)
    comp_f, _ = _aot(
        _KCENTER_XLA,
        x=xj,
        start_idx=sj,
        w=wj,
        n_select=n_sel,
        storage_dtype=None,
    )
    t_xla, sel_x = _timed(lambda: comp_f(x=xj, start_idx=sj, w=wj))
    t_pr, sel_p = _timed(
        lambda: kcenter_pruned.kcenter_pruned(x, n_sel, starts, w)
    )
    sel_x = np.asarray(sel_x)
    k = min(check, n_sel)
    differ = np.flatnonzero(sel_x != sel_p)
    out[name] = {
        "shape": list(x.shape),
        "n_select": n_sel,
        "xla_s": t_xla,
        "pruned_s": t_pr,
        "speedup_vs_xla": t_xla / t_pr,
        "same_step_as_xla": float(np.mean(sel_x == sel_p)),
        "first_difference_from_xla": int(differ[0]) if len(differ) else n_sel,
        "checked_picks": k,
        "checked_picks_equal_numpy": bool(
            np.array_equal(sel_p[:k], numpy_greedy_prefix(x, k, starts, w))
        ),
    }
  res["kcenter_pruned"] = out


def _write_json(path, obj):
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", type=float, default=1.0)
  ap.add_argument("--lof-k", type=int, default=6)
  ap.add_argument(
      "--only", choices=["lof", "coreset", "knn", "pruned"], default=None
  )
  ap.add_argument(
      "--pruned-data",
      default="clustered,gaussian",
      help=(
          "comma-separated data sets of the pruned k-center section: "
          "clustered, gaussian or the path of an (M, d) .npy feature file"
      ),
  )
  ap.add_argument("--pruned-spread", type=float, default=0.5)
  ap.add_argument(
      "--pruned-check",
      type=int,
      default=100,
      help="pruned picks checked against the numpy greedy",
  )
  ap.add_argument("--no-bf16", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
      "--out",
      default=None,
      help="JSON path (default benchmarks/results_scale<s>.json)",
  )
  args = ap.parse_args()
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(args.seed)
  res = {
      "scale": args.scale,
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "cpus": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
  }
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)),
      f"results_scale{args.scale:g}.json",
  )
  bw = memory_read_bandwidth()
  res["memory_read_bandwidth"] = bw
  print(f"memory read bandwidth: {bw['best_gbs']:.1f} GB/s")
  sections = [args.only] if args.only else ["lof", "coreset", "knn", "pruned"]
  for s in sections:
    if s == "lof":
      bench_lof(rng, args.scale, args.lof_k, res)
      r = res["lof"]
      print(
          f"LOF {r['shape']} k={r['k']}: ours {r['ours_s']:.3f}s | sklearn "
          f"loop {r['sklearn_loop_s']:.3f}s ({r['speedup_vs_sklearn']:.1f}x, "
          f"target 20x) | torch batched {r['torch_batched_s']:.3f}s "
          f"({r['speedup_vs_torch']:.2f}x, target 2x) | max|diff| vs "
          f"sklearn {r['max_abs_diff_vs_sklearn']:.2e}"
      )
    elif s == "coreset":
      bench_coreset(rng, args.scale, res, bw, not args.no_bf16)
      r = res["coreset"]
      print(
          f"coreset {r['shape']} -> {r['n_select']}: ours {r['ours_s']:.2f}s"
          f" | torch greedy {r['torch_greedy_s']:.2f}s "
          f"({r['speedup_vs_torch']:.2f}x, target 3x) | {r['ours_gbs']:.1f} "
          f"GB/s = {100 * r['fraction_of_bandwidth']:.0f}% of measured read "
          "bandwidth | same picks as torch: "
          f"{100 * r['same_selection_as_torch']:.1f}%"
      )
      if "ours_bf16_s" in r:
        print(
            f"  bf16 storage: {r['ours_bf16_s']:.2f}s, same pick at same "
            f"step {100 * r['bf16_same_position_fraction']:.1f}%, set "
            f"overlap {100 * r['bf16_set_overlap']:.1f}%, first divergence "
            f"at step {r['bf16_first_divergence_step']}"
        )
    elif s == "pruned":
      bench_kcenter_pruned(
          rng,
          args.scale,
          res,
          args.pruned_data.split(","),
          args.pruned_spread,
          args.pruned_check,
      )
      r = res["kcenter_pruned"]
      for name in args.pruned_data.split(","):
        p = r[name]
        print(
            f"k-center {name} {p['shape']} -> {p['n_select']}: pruned "
            f"{p['pruned_s']:.2f}s | dense XLA {p['xla_s']:.2f}s "
            f"({p['speedup_vs_xla']:.2f}x) | first "
            f"{p['checked_picks']} picks equal the numpy greedy: "
            f"{p['checked_picks_equal_numpy']} | same pick as XLA at "
            f"{100 * p['same_step_as_xla']:.1f}% of steps"
        )
    else:
      bench_knn(rng, args.scale, res, not args.no_bf16)
      r = res["knn"]
      print(
          f"kNN {r['queries']}x{r['bank']}x{r['dim']}: ours "
          f"{r['ours_s']:.2f}s | faiss IndexFlatL2 {r['faiss_s']:.2f}s "
          f"(ours/faiss {r['ratio_ours_over_faiss']:.2f}, target <= 1.2) | "
          "nn index "
          f"agreement {100 * r['index_agreement_vs_faiss']:.3f}%"
      )
      print(
          f"  pruned host kNN: {r['pruned_gauss_over_faiss']:.2f}x faiss's time"
          " on that noise (agreement"
          f" {100 * r['pruned_gauss_index_agreement_vs_faiss']:.3f}%),"
          f" {r['pruned_clustered_over_faiss']:.2f}x on 200 clusters (agreement"
          f" {100 * r['pruned_clustered_index_agreement_vs_faiss']:.3f}%)"
      )
      if "bf16_s" in r:
        print(
            f"  bf16 inputs ({r['bf16_queries']} queries): "
            f"{r['bf16_s']:.2f}s, exact nn index agreement with f32 "
            f"{100 * r['bf16_exact_index_agreement']:.2f}%"
        )
    _write_json(out, res)
  print(f"results written to {out}")


if __name__ == "__main__":
  main()
