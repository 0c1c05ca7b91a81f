"""owl_jax: mPLUG-Owl in JAX/Flax, TPU-native."""
from setuptools import find_packages, setup

# Pinned: the versions the test suite runs against.
CORE_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "transformers==5.24.0",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",  # the main job's report plots
]

# The input pipeline (owl_jax/data): TFDS builders, ArrayRecord shards, grain loaders.
DATA_REQUIRES = [
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",  # builders + ArrayRecord data sources; TensorFlow itself is not needed
    "array-record==0.8.6",
    "importlib_resources==7.1.0",  # imported by tensorflow-datasets' builder code, not declared by it
]

setup(
    name="owl_jax",
    version="0.1.0",
    description="mPLUG-Owl (arXiv 2304.14178) in JAX/Flax: sharded two-stage training, "
    "generation and lossless conversion to and from PyTorch.",
    packages=find_packages(include=["owl_jax", "owl_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE_REQUIRES + DATA_REQUIRES,
    extras_require={
        # torch only as the reference implementation in tests and for torch-side export checks.
        # gcsfs and a local GCS server: checkpoints on a gs:// workdir are tested end to end.
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "libtpu==0.0.42.1", "gcsfs==2026.10.0",
                 "gcp-storage-emulator==2026.7.19"],
        "tpu": ["libtpu==0.0.42.1", "gcsfs==2026.10.0"],
        # gs:// workdirs for metrics and params (orbax checkpoints reach GCS through tensorstore)
        "gcs": ["gcsfs==2026.10.0"],
    },
)
