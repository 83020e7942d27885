"""Cross-platform lowering of the Pallas kernels, without the hardware.

``lower(op, platform, **shape)`` runs ``jax.export`` of one kernel for
``'cuda'`` (Triton) or ``'tpu'`` (Mosaic TPU) on any machine, CPU included.
It proves that the kernel traces, that every operation has a lowering on
that backend and that the block shapes obey the backend's rules (powers of
two for Triton; (8, 128) tiles for Mosaic TPU). It does not compile: Triton
turns its IR into GPU code, and Mosaic checks VMEM, only on the device. The
static budgets (``plan(...).nbytes`` of each kernel, checked against
``dispatch.GPU_SMEM_BYTES`` and ``TPU_VMEM_BYTES``) stand in for that.

``PIPELINE_SHAPES`` are the shapes the pipeline gives the kernels: the
default job's (ELPV, 132 training images of a 28 x 28 grid, 1024-d
features, 128-d projection), the end-to-end benchmark's (231 training and
112 test images) and those of the first accelerator run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import export

from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import kcenter_pallas
from softpatch_jax.kernels import knn_pallas
from softpatch_jax.kernels import lof_pallas

PLATFORMS = ("cuda", "tpu")

PIPELINE_SHAPES = {
    "knn": (
        dict(m=333, n=777, d=128, k=5),  # first accelerator run
        dict(m=64, n=17, d=96, k=3),
        dict(m=1000, n=5000, d=1024, k=1),
        dict(m=6272, n=8797, d=1024, k=1),  # default job: 8 images / batch
        dict(m=87808, n=18110, d=1024, k=1),  # benchmark: 112 test images
        dict(m=49000, n=16400, d=1024, k=1),  # the H200 timing
        dict(m=784, n=132, d=128, k=6),  # the 'nearest' discriminator
    ),
    "lof": (
        dict(p=784, n=132, d=128, k=6),  # default job
        dict(p=784, n=231, d=128, k=6),  # benchmark
        dict(p=784, n=230, d=128, k=6),  # first accelerator run
        dict(p=10, n=17, d=24, k=5),
    ),
    "kcenter": (
        dict(m=103488, d=128, n_select=10348),  # default job
        dict(m=181104, d=128, n_select=18110),  # benchmark
        dict(m=164000, d=128, n_select=16400),  # the H200 timing
        dict(m=20000, d=128, n_select=2000),
        dict(m=1000, d=24, n_select=50),
    ),
}

_TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for(fn, specs, platform: str) -> export.Exported:
  """``jax.export`` of ``jax.jit(fn)`` for one platform.

  Triton calls carry no serialisation-compatibility guarantee, so that
  check is waived for 'cuda': the export is a lowering test, not an
  artifact to keep.
  """
  checks = []
  if platform == "cuda":
    checks = [export.DisabledSafetyCheck.custom_call(_TRITON_CALL)]
  return export.export(
      jax.jit(fn), platforms=[platform], disabled_checks=checks
  )(*specs)


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def kernel_fn(op: str, platform: str, **shape):
  """(fn, specs): the op's Pallas kernel for `platform`, at `shape`."""
  backend = dispatch.pallas_backend(platform)
  if op == "knn":
    k = shape["k"]
    fn = lambda q, b: knn_pallas.knn_pallas(q, b, k, backend=backend)
    return fn, (_f32(shape["m"], shape["d"]), _f32(shape["n"], shape["d"]))
  if op == "lof":
    k = shape["k"]
    fn = lambda x: lof_pallas.lof_pallas(x, k, backend=backend)
    return fn, (_f32(shape["p"], shape["n"], shape["d"]),)
  if op == "kcenter":
    m, n_select = shape["m"], shape["n_select"]
    fn = lambda x, s, w: kcenter_pallas.kcenter_pallas(
        x, n_select, s, w, backend=backend
    )
    starts = jax.ShapeDtypeStruct((10,), jnp.int32)
    return fn, (_f32(m, shape["d"]), starts, _f32(m))
  raise ValueError(f"unknown op {op!r}; one of {dispatch.OPS}")


def lower(op: str, platform: str, **shape) -> export.Exported:
  """Exports the op's Pallas kernel for `platform` ('cuda' or 'tpu')."""
  fn, specs = kernel_fn(op, platform, **shape)
  return export_for(fn, specs, platform)


def plan(op: str, platform: str, **shape):
  """The kernel's block plan (with its static ``nbytes``) at `shape`."""
  backend = dispatch.pallas_backend(platform)
  if op == "knn":
    return knn_pallas.plan(
        shape["m"], shape["n"], shape["d"], shape["k"], backend
    )
  if op == "lof":
    return lof_pallas.plan(shape["n"], shape["d"], shape["k"], backend)
  if op == "kcenter":
    return kcenter_pallas.plan(shape["m"], shape["d"], backend)
  raise ValueError(f"unknown op {op!r}; one of {dispatch.OPS}")
