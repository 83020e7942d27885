"""Custom kernels, importable as ``softpatch_jax.kernels``.

One module per op; each has a plain-jnp ``*_reference`` (the tested ground
truth), an XLA path (blocked, the default on CPU) and a Pallas kernel (the
default on GPU/TPU; ``impl='pallas_interpret'`` runs it on CPU for tests).

The package exports its op modules, not their functions, so that
``softpatch_jax.kernels.knn`` is always the module::

  from softpatch_jax.kernels import knn
  sqdist, idx = knn.knn(queries, bank, k=1)
"""

from softpatch_jax.kernels import kcenter
from softpatch_jax.kernels import knn
from softpatch_jax.kernels import lof

__all__ = ["kcenter", "knn", "lof"]
