"""Helpers shared by the kNN paths (knn.py) and the Pallas kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax.kernels import dispatch

_F32 = jnp.float32


def validate(queries, bank, k: int, op: str = "knn"):
  queries = jnp.asarray(queries)
  bank = jnp.asarray(bank)
  dispatch.check_rank("queries", op, queries, 2)
  dispatch.check_rank("bank", op, bank, 2)
  if queries.shape[1] != bank.shape[1]:
    raise ValueError(
        f"kernels.{op}: feature dims differ: queries {tuple(queries.shape)} vs "
        f"bank {tuple(bank.shape)}"
    )
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"kernels.{op}: k must be a positive int, got {k!r}")
  if bank.shape[0] < k:
    raise ValueError(
        f"kernels.{op}: k={k} exceeds the bank size N={bank.shape[0]} "
        f"(bank shape {tuple(bank.shape)})"
    )
  return queries, bank


def sq_dists(q, qq, b, bb):
  """(m, n) clamped squared distances; same expression on every path.

  Precision HIGHEST: true f32 products on GPUs and TPUs too (not TF32 /
  bf16 passes), as in the Pallas kernels, so every path finds the same
  neighbours.
  """
  dots = jax.lax.dot_general(
      q,
      b,
      (((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=_F32,
  )
  return jnp.maximum(qq[:, None] - 2.0 * dots + bb[None, :], 0.0)


def lex_smallest(d, idx, k):
  """k smallest of d per row, ties -> smaller idx; returns (d, idx) sorted."""
  ds, ids = jax.lax.sort((d, idx), dimension=1, num_keys=2)
  return ds[:, :k], ids[:, :k]


def prep(queries, bank, compute_dtype):
  """Casts for the distance matmul; norms from the cast values, in f32."""
  q = queries.astype(_F32)
  b = bank.astype(_F32)
  if compute_dtype is not None and jnp.dtype(compute_dtype) != _F32:
    qc = q.astype(compute_dtype)
    bc = b.astype(compute_dtype)
    qn = qc.astype(_F32)
    bn = bc.astype(_F32)
  else:
    qc, bc, qn, bn = q, b, q, b
  return q, b, qc, bc, jnp.sum(qn * qn, 1), jnp.sum(bn * bn, 1)


def refine(q, b, d, idx, k):
  """Exact f32 distances of the chosen indices, re-sorted (bf16 inputs)."""
  rows = b[idx]  # (m, k, D)
  diff = (
      jnp.sum(q * q, 1)[:, None]
      - 2.0
      * jnp.einsum(
          "md,mkd->mk",
          q,
          rows,
          precision=jax.lax.Precision.HIGHEST,
          preferred_element_type=_F32,
      )
      + jnp.sum(rows * rows, -1)
  )
  return lex_smallest(jnp.maximum(diff, 0.0), idx, k)
