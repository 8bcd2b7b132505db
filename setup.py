"""lcm-jax: Latent Consistency Models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="lcm-jax",
    version="0.1.0",
    description="Latent Consistency Model distillation and few-step sampling in JAX/Flax",
    packages=find_packages(include=["lcm_jax", "lcm_jax.*"]),
    package_data={"lcm_jax.worlds.shapes": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",  # gs:// workdirs and model folders (lcm_jax.fs)
        "filelock>=3.12",  # one download per host of a remote model folder
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "safetensors>=0.4",
        "transformers>=4.40",  # CLIPTokenizer only; no torch needed for it
        "huggingface_hub>=0.23",  # from_pretrained("org/name") (lcm_jax.hub)
        "grain>=0.2",
        "array_record",
        "pyarrow>=14",
        "msgpack>=1.0",
        "braceexpand>=0.1.7",
        "tensorboardX",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "torch==2.13.0",
            "diffusers>=0.40",
            "transformers>=5.0",
            "accelerate",
            "peft>=0.17",
            "pytest>=8",
            "pytest-xdist>=3.5",  # `make test` runs the suite on two workers
            "gcp-storage-emulator>=2024.8",  # tests/gcs_emulator.py
        ],
    },
    entry_points={"console_scripts": ["lcm-jax=lcm_jax.cli:main"]},
)
