"""Custom kernels, importable as ``softpatch_jax.kernels``.

One module per op; each has a plain-jnp ``*_reference`` (the tested ground
truth), an XLA path (blocked; the default on every platform until a Pallas
kernel has passed on its hardware, README "Kernel paths per backend") and a
Pallas kernel with a Triton and a Mosaic TPU design (opt-in with
``impl='pallas'``; ``impl='pallas_interpret'`` runs it on CPU for tests).

The package exports its op modules, not their functions, so that
``softpatch_jax.kernels.knn`` is always the module::

  from softpatch_jax.kernels import knn
  sqdist, idx = knn.knn(queries, bank, k=1)
"""

from softpatch_jax.kernels import kcenter
from softpatch_jax.kernels import knn
from softpatch_jax.kernels import lof

__all__ = ["kcenter", "knn", "lof"]
