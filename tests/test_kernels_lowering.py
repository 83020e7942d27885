"""Every Pallas kernel lowers for CUDA (Triton) and TPU (Mosaic), on a CPU.

``jax.export`` for another platform traces the kernel and runs that
backend's lowering, so an operation without a lowering there, a block
shape the backend rejects (Triton: powers of two; Mosaic TPU: (8, 128)
tiles) or a shared-memory overflow of a Mosaic GPU kernel fails here.
Compilation is not checked: Triton's own smem use and Mosaic's VMEM checks
happen on the device, so each kernel's static budget (``plan().nbytes``)
is held to the hardware limits instead. What ran on real hardware is in the
README ("Kernel paths per backend").
"""

from unittest import mock

import jax
import pytest

from softpatch_jax.kernels import dispatch
from softpatch_jax.kernels import lowering

CASES = [
    (op, platform, shape)
    for op, shapes in lowering.PIPELINE_SHAPES.items()
    for shape in shapes
    for platform in lowering.PLATFORMS
]


def _id(case):
  op, platform, shape = case
  return f"{op}-{platform}-" + "x".join(f"{k}{v}" for k, v in shape.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_lowers(case):
  op, platform, shape = case
  exp = lowering.lower(op, platform, **shape)
  text = exp.mlir_module()
  call = "xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  assert call in text, f"{op} on {platform}: no {call} in the lowered module"
  assert exp.platforms == (platform,)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_block_plan_fits_on_chip_memory(case):
  op, platform, shape = case
  plan = lowering.plan(op, platform, **shape)
  limit = (
      dispatch.GPU_SMEM_BYTES if platform == "cuda" else dispatch.TPU_VMEM_BYTES
  )
  assert 0 < plan.nbytes <= limit, (op, platform, shape, plan)


def test_budget_check_names_op_and_sizes():
  with pytest.raises(
      ValueError, match=r"kernels.knn.*300,000 bytes of shared memory on triton"
  ):
    dispatch.check_budget("knn", "triton", 300_000, "smem")
  with pytest.raises(ValueError, match="VMEM"):
    dispatch.check_budget("lof", "mosaic_tpu", 2**30, "(784, 4096)")
  dispatch.check_budget("lof", "mosaic_tpu", 2**20, "small")


@pytest.mark.parametrize("backend", ["gpu", "cuda", "tpu", "cpu"])
@pytest.mark.parametrize("op", dispatch.OPS)
def test_default_is_xla_until_a_kernel_ran_on_the_hardware(
    backend, op, monkeypatch
):
  # No Pallas kernel has passed on real accelerator hardware yet, so every
  # platform defaults to XLA with no environment variable set.
  monkeypatch.delenv("SOFTPATCH_JAX_IMPL", raising=False)
  with mock.patch.object(jax, "default_backend", return_value=backend):
    assert dispatch.resolve_impl(None, op) == "xla"
    assert dispatch.platform() in dispatch.PLATFORMS


def test_override_and_bad_override(monkeypatch):
  monkeypatch.setenv("SOFTPATCH_JAX_IMPL", "pallas")
  assert dispatch.resolve_impl(None, "knn") == "pallas"
  monkeypatch.setenv("SOFTPATCH_JAX_IMPL", "cuda")
  with pytest.raises(ValueError, match="SOFTPATCH_JAX_IMPL='cuda'"):
    dispatch.resolve_impl(None, "knn")


def test_pallas_backend_per_platform(monkeypatch):
  monkeypatch.delenv("SOFTPATCH_JAX_PALLAS_BACKEND", raising=False)
  assert dispatch.pallas_backend("cuda") == "triton"
  assert dispatch.pallas_backend("tpu") == "mosaic_tpu"
  assert dispatch.pallas_backend("cpu") == "triton"
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", "mosaic_tpu")
  assert dispatch.pallas_backend("cpu") == "mosaic_tpu"
  monkeypatch.setenv("SOFTPATCH_JAX_PALLAS_BACKEND", "mosaic_gpu")
  with pytest.raises(ValueError, match="mosaic_gpu"):
    dispatch.pallas_backend("cpu")
