"""Backend dispatch shared by the kernel wrappers.

The default path of every op on every platform is in ``DEFAULT_IMPL``,
with the reason in ``WHY`` (README, "Kernel paths per backend"). A Pallas
kernel becomes a platform's default only after it passed the tests and won
the timing on real hardware of that platform (``benchmarks/device_check.py``);
until then XLA is the default there, so a default run never depends on a
kernel that has only been lowered, not run.
"""

from __future__ import annotations

import os

import jax

IMPLS = ("xla", "pallas", "pallas_interpret", "reference")
OPS = ("knn", "lof", "kcenter")
PLATFORMS = ("cpu", "gpu", "tpu")

DEFAULT_IMPL = {
    "cpu": {"knn": "xla", "lof": "xla", "kcenter": "xla"},
    "gpu": {"knn": "xla", "lof": "xla", "kcenter": "xla"},
    "tpu": {"knn": "xla", "lof": "xla", "kcenter": "xla"},
}

WHY = {
    "cpu": (
        "Pallas only runs interpreted on a CPU (slow); the blocked XLA paths "
        "are the fast ones, and the host greedy / host kNN of coreset.impl="
        "'auto' and MemoryBank.search='auto' take over for large eager fits"
    ),
    "gpu": (
        "no Pallas kernel has passed on a GPU yet (the first H200 run of the "
        "old kernels failed to compile or hung); the rewritten kernels lower "
        "for Triton and fit the shared-memory budget, but stay opt-in "
        "(SOFTPATCH_JAX_IMPL=pallas) until benchmarks/device_check.py passes "
        "them on real hardware"
    ),
    "tpu": (
        "no Pallas kernel has run on a TPU; they lower for Mosaic TPU and fit "
        "the VMEM budget, but stay opt-in (SOFTPATCH_JAX_IMPL=pallas) until "
        "they pass on real hardware"
    ),
}

# Pallas kernel designs: Triton on NVIDIA GPUs (pallas_call's Mosaic GPU
# route is deprecated for grid kernels), Mosaic on TPUs. On a CPU either
# design runs in the Pallas interpreter (impl='pallas_interpret').
PALLAS_BACKENDS = ("triton", "mosaic_tpu")

# Hopper (H100 / H200): 227 KiB of shared memory per block (opt-in maximum).
GPU_SMEM_BYTES = 232448
# The default scoped VMEM limit of the smallest current TPU (v5e: 16 MiB);
# every kernel here asks for no more, so no vmem_limit_bytes is needed.
TPU_VMEM_BYTES = 16 * 2**20


def platform(backend: str | None = None) -> str:
  """'cpu', 'gpu' or 'tpu' for a jax backend / export platform name."""
  name = (backend or jax.default_backend()).lower()
  if name in ("cuda", "rocm", "gpu"):
    return "gpu"
  if name == "tpu":
    return "tpu"
  return "cpu"


def resolve_impl(impl: str | None, op: str) -> str:
  """Maps ``impl=None`` to ``DEFAULT_IMPL`` of the default backend.

  ``SOFTPATCH_JAX_IMPL`` (one of ``IMPLS``) overrides the default of every
  op, e.g. ``SOFTPATCH_JAX_IMPL=pallas`` to run the Pallas kernels.
  """
  if impl is None:
    forced = os.environ.get("SOFTPATCH_JAX_IMPL", "").strip()
    if forced:
      if forced not in IMPLS:
        raise ValueError(f"SOFTPATCH_JAX_IMPL={forced!r} is not one of {IMPLS}")
      return forced
    return DEFAULT_IMPL[platform()].get(op, "xla")
  if impl not in IMPLS:
    raise ValueError(f"kernels.{op}: impl={impl!r} is not one of {IMPLS}")
  return impl


def pallas_backend(backend: str | None = None) -> str:
  """The Pallas kernel design for a jax backend (default: the current one).

  A CPU gets the Triton design, run by the Pallas interpreter
  (``SOFTPATCH_JAX_PALLAS_BACKEND=mosaic_tpu`` interprets the TPU one).
  """
  if backend in PALLAS_BACKENDS:
    return backend
  plat = platform(backend)
  if plat == "cpu":
    forced = os.environ.get("SOFTPATCH_JAX_PALLAS_BACKEND", "").strip()
    if forced:
      if forced not in PALLAS_BACKENDS:
        raise ValueError(
            f"SOFTPATCH_JAX_PALLAS_BACKEND={forced!r} is not one of "
            f"{PALLAS_BACKENDS}"
        )
      return forced
  return {"gpu": "triton", "tpu": "mosaic_tpu", "cpu": "triton"}[plat]


def check_budget(op: str, backend: str, nbytes: int, what: str) -> None:
  """Raises ValueError when a block configuration overflows on-chip memory.

  `nbytes` is the kernel's own static estimate for `backend`: shared memory
  per block on a GPU, VMEM (double-buffered blocks + live values) on a TPU.
  """
  limit = {"triton": GPU_SMEM_BYTES, "mosaic_tpu": TPU_VMEM_BYTES}.get(backend)
  if limit is not None and nbytes > limit:
    kind = "shared memory" if backend == "triton" else "VMEM"
    raise ValueError(
        f"kernels.{op}: block configuration {what} needs {nbytes:,} bytes of "
        f"{kind} on {backend}, over the {limit:,}-byte budget; use smaller "
        "blocks"
    )


def check_rank(name: str, op: str, x, rank: int) -> None:
  """Raises ValueError unless `x` has rank `rank`."""
  if x.ndim != rank:
    raise ValueError(
        f"kernels.{op}: {name} must have rank {rank}, got shape "
        f"{tuple(x.shape)}"
    )


def round_up(n: int, m: int) -> int:
  """The smallest multiple of m that is >= n."""
  return -(-n // m) * m


def next_pow2(n: int) -> int:
  """The smallest power of two >= max(n, 1)."""
  return 1 << max(0, (int(n) - 1).bit_length())
