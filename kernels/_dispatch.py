"""Backend dispatch shared by the kernel wrappers."""
from __future__ import annotations

import jax

IMPLS = ("xla", "pallas", "pallas_interpret", "reference")


def resolve_impl(impl: str | None, op: str) -> str:
  """Maps ``impl=None`` to the fastest path for the default backend.

  CPU -> the blocked XLA path (Pallas only runs interpreted there, which is
  slow); GPU/TPU -> the Pallas kernel.
  """
  if impl is None:
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  if impl not in IMPLS:
    raise ValueError(f"kernels.{op}: impl={impl!r} is not one of {IMPLS}")
  return impl


def check_rank(name: str, op: str, x, rank: int) -> None:
  if x.ndim != rank:
    raise ValueError(
        f"kernels.{op}: {name} must have rank {rank}, got shape {tuple(x.shape)}")


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m
