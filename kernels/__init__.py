"""Custom kernels, importable as ``softpatch_jax.kernels``."""
