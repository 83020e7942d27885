"""Scaling of the sharded stages (softpatch_jax.parallel) over 1 to 8 devices.

  python benchmarks/bench_scaling.py              # about 3 min on 2 CPU cores
  python benchmarks/bench_scaling.py --scale 0.5  # smaller inputs

On a CPU the script asks XLA for 8 fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is
imported). Fake CPU devices share the machine's cores, so the table shows the
overhead of the sharded code and that its results equal one device's, not a
speed-up. On an accelerator host the mesh sizes are those available.

For every stage (features, LOF weights, weighted greedy k-center, kNN
scoring) and mesh size it reports the time of a warm call (best of
--repeat; compilation excluded), the throughput, the per-device memory of
the compiled program (arguments + outputs + temporaries, from XLA's memory
analysis) and whether the result equals the single-device code bit for bit.
It then fits the per-device memory of the kNN program, which is linear in
the bank rows a device holds, from two compiled sizes; gives the largest bank
one device holds at fixed memory budgets; and projects a 10M-patch bank on 8
accelerators from these per-device numbers (README, "Scaling out").

Writes --out (default benchmarks/results_scaling.json) and prints a markdown
table.
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8"
  ).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import platform
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from softpatch_jax import backbones
from softpatch_jax import denoise
from softpatch_jax import embedding
from softpatch_jax import features
from softpatch_jax import io_utils
from softpatch_jax import parallel
from softpatch_jax import scoring
from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import kcenter

# pylint: disable=protected-access
FAKE_NOTE = (
    "Fake CPU devices share the same {cpus} cores: the times show the "
    "overhead of the sharded code and the results show it equals one "
    "device, not a speed-up."
)
PROJECTED_PATCHES = 10_000_000
PROJECTED_DEVICES = 8


def _timed(fn, repeat):
  """(best seconds of `repeat` warm calls, last result); one warm-up call."""
  out = jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best, out


def _mem_bytes(jitted, *args):
  """Per-device bytes of a compiled program: arguments + outputs + temps."""
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def _row(stage, n, seconds, items, unit, mem, equal, **extra):
  return dict(
      stage=stage,
      devices=n,
      seconds=seconds,
      throughput=items / seconds,
      unit=unit,
      per_device_mib=None if mem is None else mem / 2**20,
      equal_to_one_device=bool(equal),
      **extra,
  )


def bench_features(meshes, args, rows):
  bb = backbones.load("efficientnet_lite0", weights="random")
  spec = features.EmbedSpec(bb.module, bb.layers)
  s = args.image_size
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.images, s, s, 3)).astype(np.float32)
  want = None
  for n, mesh in meshes:
    emb = embedding.Embedder(bb.variables, spec, args.batch_size, mesh)
    step = emb.batch_size

    def run(emb=emb, step=step):
      return np.concatenate(
          [emb(images[i : i + step]) for i in range(0, len(images), step)]
      )

    t, out = _timed(run, args.repeat)
    want = out if want is None else want
    batch = np.zeros((step, s, s, 3), np.float32)
    if mesh is None:
      mem = _mem_bytes(features.embed_jit, bb.variables, batch, spec)
    else:
      weights = jax.tree_util.tree_map(
          lambda a, m=mesh: parallel._put(a, m), bb.variables
      )
      mem = _mem_bytes(
          parallel._embed_fn(spec, mesh),
          weights,
          parallel._put(batch, mesh, P(parallel.AXIS)),
      )
    rows.append(
        _row(
            "features",
            n,
            t,
            len(images),
            "images/s",
            mem,
            np.array_equal(out, want),
            shape=[args.images, s, s, 3],
        )
    )


def bench_lof(meshes, args, rows):
  rng = np.random.default_rng(1)
  proj = rng.normal(size=(args.lof_images, 784, 128)).astype(np.float32)
  want = None
  xt = np.transpose(proj, (1, 0, 2))
  options = denoise.DenoiseOptions(lof_k=6)
  for n, mesh in meshes:
    if mesh is None:
      run = lambda: denoise.patch_weights(proj, "lof", options)
      mem = _mem_bytes(
          jax.jit(lambda x: denoise.lof(x, options)), jnp.asarray(xt)
      )
    else:
      run = lambda m=mesh: parallel.patch_weights(proj, "lof", options, mesh=m)
      rows_p = -(-49 // n) * 16 * n  # 784 positions in blocks of 16
      mem = _mem_bytes(
          parallel._positions_fn(
              mesh, "lof", options, dispatch.resolve_impl(None, "lof")
          ),
          parallel._put(xt, mesh, P(parallel.AXIS), rows_p),
      )
    t, out = _timed(run, args.repeat)
    out = np.asarray(out)
    want = out if want is None else want
    rows.append(
        _row(
            "LOF weights",
            n,
            t,
            proj.shape[0] * proj.shape[1],
            "patches/s",
            mem,
            np.array_equal(out, want),
            shape=list(proj.shape),
        )
    )


def bench_kcenter(meshes, args, rows):
  rng = np.random.default_rng(2)
  m = args.lof_images * 784
  x = rng.normal(size=(m, 128)).astype(np.float32)
  w = (rng.random(m) > 0.15).astype(np.float32)
  starts = rng.choice(m, 10, replace=False)
  k = max(1, int(m * args.coreset_fraction))
  want = None
  for n, mesh in meshes:
    if mesh is None:
      run = lambda: kcenter.kcenter(x, k, starts, w)
      mem = _mem_bytes(
          jax.jit(lambda a, s, b: kcenter._kcenter_xla(a, k, s, b, None)),
          x,
          starts.astype(np.int32),
          w,
      )
    else:
      run = lambda mh=mesh: parallel.kcenter(x, k, starts, w, mesh=mh)
      per = dispatch.round_up(-(-m // n), 8)  # parallel.kcenter's rows
      put = lambda a, mh=mesh, r=per * n: parallel._put(
          a, mh, P(parallel.AXIS), r
      )
      mem = _mem_bytes(
          parallel._kcenter_fn(mesh, per, 128, k, False, 0, False),
          put(x),
          put(w),
          parallel._put(x[starts], mesh),
          parallel._put(np.int32(0), mesh),
          parallel._put(x[0], mesh),
      )
    t, out = _timed(run, args.repeat)
    out = np.asarray(out)
    want = out if want is None else want
    rows.append(
        _row(
            "k-center",
            n,
            t,
            k,
            "picks/s",
            mem,
            np.array_equal(out, want),
            shape=[m, 128],
            n_select=k,
            bytes_read_per_s=m * 128 * 4 * k / t,
        )
    )


def _knn_mem(mesh, rows_per_device, n_queries, dim):
  """Per-device bytes of the sharded kNN program for a bank slice size."""
  bq, bn, path = parallel.knn_blocks(n_queries, rows_per_device * mesh.size)
  rows_per_device = -(-rows_per_device // bn) * bn
  fn = parallel._nearest_fn(
      mesh, rows_per_device, bq, bn, scoring._nearest, path
  )
  shard = jax.ShapeDtypeStruct(
      (rows_per_device * mesh.size, dim),
      jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, P(parallel.AXIS)),
  )
  queries = jax.ShapeDtypeStruct(
      (n_queries, dim),
      jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, P()),
  )
  return _mem_bytes(fn, shard, queries)


def bench_knn(meshes, args, rows):
  rng = np.random.default_rng(3)
  bank = scoring.make_bank(
      rng.normal(size=(args.bank, 1024)).astype(np.float32),
      rng.uniform(0.5, 2.0, args.bank).astype(np.float32),
  )
  queries = rng.normal(size=(args.query_images, 784, 1024)).astype(np.float32)
  q = queries.shape[0] * queries.shape[1]
  want = None
  for n, mesh in meshes:
    search = scoring.choose_search(bank, scoring.ScoringOptions(), mesh)
    t, out = _timed(
        lambda s=search: scoring.score(bank, queries, s), args.repeat
    )
    out = [np.asarray(o) for o in out]
    want = out if want is None else want
    if mesh is None:
      bq, bn, _ = parallel.knn_blocks(q, args.bank)
      mem = _mem_bytes(
          jax.jit(lambda a, b: scoring._nearest(b, a, block_n=bn, block_q=bq)),
          queries.reshape(q, 1024),
          np.asarray(bank.features),
      )
    else:
      mem = _knn_mem(mesh, -(-args.bank // n), q, 1024)
    rows.append(
        _row(
            "kNN scoring",
            n,
            t,
            q,
            "patches/s",
            mem,
            all(np.array_equal(a, b) for a, b in zip(out, want)),
            bank=[args.bank, 1024],
            queries=q,
            flops_per_s=2.0 * q * args.bank * 1024 / t,
        )
    )


def project(rows, args, res):
  """Largest bank per device at fixed budgets; the 10M-patch projection."""
  mesh1 = parallel.make_mesh(1)
  q, dim = 784, 1024  # one image's patches against the bank
  r1, r2 = 8192, 65536
  m1, m2 = _knn_mem(mesh1, r1, q, dim), _knn_mem(mesh1, r2, q, dim)
  per_row = (m2 - m1) / (r2 - r1)
  fixed = m1 - per_row * r1
  budgets = {
      f"{g} GiB": int((g * 2**30 - fixed) // per_row) for g in args.budgets
  }
  per_dev_rows = -(-PROJECTED_PATCHES // PROJECTED_DEVICES)
  knn1 = next(r for r in rows if r["stage"] == "kNN scoring")
  kc1 = next(r for r in rows if r["stage"] == "k-center")
  flops_img = 2.0 * q * per_dev_rows * dim  # per device, per image
  # The coreset runs on the 128-d projection: each pick reads every point.
  kc_bytes_pick = per_dev_rows * 128 * 4
  kc_picks = int(PROJECTED_PATCHES * 0.1)
  res["memory_model"] = dict(
      bytes_per_bank_row=per_row,
      fixed_bytes=fixed,
      largest_bank_rows_per_device=budgets,
  )
  res["projection_10m"] = dict(
      patches=PROJECTED_PATCHES,
      devices=PROJECTED_DEVICES,
      bank_rows_per_device=per_dev_rows,
      knn_per_device_gib=(fixed + per_row * per_dev_rows) / 2**30,
      coreset_proj_per_device_gib=per_dev_rows * 128 * 4 * 2 / 2**30,
      knn_s_per_image_at_measured_cpu_rate=flops_img / knn1["flops_per_s"],
      knn_s_per_image_at_assumed_rate=flops_img / (args.accel_tflops * 1e12),
      assumed_tflops=args.accel_tflops,
      coreset_s_at_measured_cpu_rate=kc_picks
      * kc_bytes_pick
      / kc1["bytes_read_per_s"],
      # Each pick also waits for one small all-gather.
      coreset_s_at_assumed_bandwidth=kc_picks
      * (kc_bytes_pick / (args.accel_gbs * 1e9) + args.pick_latency_us * 1e-6),
      assumed_gbs=args.accel_gbs,
      assumed_pick_latency_us=args.pick_latency_us,
      coreset_picks=kc_picks,
  )


def _table(rows):
  out = [
      (
          "| stage | devices | seconds | throughput | per-device MiB | "
          "= 1 device |"
      ),
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    mib = r["per_device_mib"]
    out.append(
        f"| {r['stage']} | {r['devices']} | {r['seconds']:.3f} | "
        f"{r['throughput']:.1f} {r['unit']} | "
        f"{'n/a' if mib is None else f'{mib:.1f}'} | "
        f"{'yes' if r['equal_to_one_device'] else 'NO'} |"
    )
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--scale", type=float, default=1.0)
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--repeat", type=int, default=2)
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=2, help="per device")
  ap.add_argument("--coreset-fraction", type=float, default=0.01)
  ap.add_argument("--budgets", default="16,80,141", help="GiB per device")
  ap.add_argument("--accel-tflops", type=float, default=50.0)
  ap.add_argument("--accel-gbs", type=float, default=3000.0)
  ap.add_argument("--pick-latency-us", type=float, default=20.0)
  ap.add_argument(
      "--out",
      default=os.path.join(os.path.dirname(__file__), "results_scaling.json"),
  )
  args = ap.parse_args(argv)
  args.budgets = [float(b) for b in args.budgets.split(",")]
  args.images = max(1, int(16 * args.scale))
  args.lof_images = max(8, int(32 * args.scale))
  args.bank = max(64, int(16384 * args.scale))
  args.query_images = max(1, int(2 * args.scale))
  have = jax.device_count()
  counts = [int(c) for c in args.devices.split(",") if int(c) <= have]
  meshes = [("1, no mesh", None)]
  meshes += [(n, parallel.make_mesh(n)) for n in counts]
  cpu = jax.default_backend() == "cpu"
  res = dict(
      backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()],
      cpus=os.cpu_count(),
      machine=platform.processor() or platform.machine(),
      jax=jax.__version__,
      scale=args.scale,
      note=FAKE_NOTE.format(cpus=os.cpu_count()) if cpu else "",
  )
  rows = []
  for name, fn in (
      ("features", bench_features),
      ("LOF", bench_lof),
      ("k-center", bench_kcenter),
      ("kNN", bench_knn),
  ):
    t0 = time.perf_counter()
    fn(meshes, args, rows)
    print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  project(rows, args, res)
  res["rows"] = rows
  io_utils.write_json(args.out, res)
  print(_table(rows))
  if cpu:
    print("\n" + res["note"])
  m, p = res["memory_model"], res["projection_10m"]
  print(
      f"\nkNN memory per device: {m['fixed_bytes'] / 2**20:.1f} MiB + "
      f"{m['bytes_per_bank_row']:.0f} B per bank row; largest bank per "
      "device: "
      + ", ".join(
          f"{k}: {v:,} rows"
          for k, v in m["largest_bank_rows_per_device"].items()
      )
  )
  print(
      f"10M patches on {p['devices']} devices: {p['bank_rows_per_device']:,} "
      f"bank rows and {p['knn_per_device_gib']:.2f} GiB per device for "
      f"scoring; {p['knn_s_per_image_at_measured_cpu_rate']:.1f} s per image "
      "at the measured CPU rate, "
      f"{p['knn_s_per_image_at_assumed_rate'] * 1e3:.1f} ms at an assumed "
      f"{p['assumed_tflops']:g} TFLOP/s; coreset ({p['coreset_picks']:,} "
      f"picks): {p['coreset_s_at_measured_cpu_rate'] / 3600:.1f} h at the "
      "measured CPU read rate, "
      f"{p['coreset_s_at_assumed_bandwidth'] / 60:.1f} min at an assumed "
      f"{p['assumed_gbs']:g} GB/s and {p['assumed_pick_latency_us']:g} us "
      "per all-gather"
  )
  print(f"results written to {args.out}")


if __name__ == "__main__":
  main()
