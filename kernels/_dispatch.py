"""Backend dispatch shared by the kernel wrappers."""

from __future__ import annotations

import os

import jax

IMPLS = ("xla", "pallas", "pallas_interpret", "reference")


def resolve_impl(impl: str | None, op: str) -> str:
  """Maps ``impl=None`` to the fastest path for the default backend.

  CPU -> the blocked XLA path (Pallas only runs interpreted there, which is
  slow); GPU/TPU -> the Pallas kernel.
  """
  if impl is None:
    # An escape hatch for accelerators where a Pallas kernel fails to lower
    # or is slower: SOFTPATCH_JAX_IMPL=xla (or another path) for every op.
    forced = os.environ.get("SOFTPATCH_JAX_IMPL", "").strip()
    if forced:
      if forced not in IMPLS:
        raise ValueError(f"SOFTPATCH_JAX_IMPL={forced!r} is not one of {IMPLS}")
      return forced
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  if impl not in IMPLS:
    raise ValueError(f"kernels.{op}: impl={impl!r} is not one of {IMPLS}")
  return impl


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
