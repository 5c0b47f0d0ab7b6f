"""Toy pieces for the model tests: tiny decoder configs of each supported family, random params,
PyTorch references and left padding."""
from __future__ import annotations

import jax
import numpy as np
import transformers

from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig

TINY_VOCAB = 320  # > tokenizer size: models pad their embedding rows, as Qwen2.5 does


def tiny_config(family: str, **overrides) -> ModelConfig:
    """Small configs exercising each family's features (GQA everywhere)."""
    base = dict(model_type="llama", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256, eos_token_ids=(2,), bos_token_id=1, pad_token_id=2)
    families = {
        "llama": dict(tie_word_embeddings=True),
        # Llama 3.1 rope scaling, with a short original context so that interpolation matters.
        "llama3": dict(rope_theta=500000.0, rope_scaling=(
            ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 32), ("rope_type", "llama3"))),
        "qwen2": dict(model_type="qwen2", qkv_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
        "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=24, tie_word_embeddings=True),
    }
    return ModelConfig(**{**base, **families[family], **overrides})


def random_params(config: ModelConfig, seed: int = 0):
    """(graphdef, params) with every parameter random, norms and biases included (not ones/zeros)."""
    graphdef, params = transformer.init_params(config, jax.random.key(seed))
    rng = np.random.RandomState(seed + 1)
    return graphdef, jax.tree.map(
        lambda leaf: leaf + (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), params)


def jitted_logits(graphdef, params, tokens, mask=None) -> np.ndarray:
    """Float32 logits [B, T, V] of our model, compiled once per shape instead of run op by op."""
    return np.asarray(jax.jit(transformer.logits, static_argnums=0)(graphdef, params, tokens, None, mask))


def torch_reference(path: str, dtype: str = "float32"):
    """The transformers PyTorch model stored in `path`, in eval mode."""
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    return tokens, mask
