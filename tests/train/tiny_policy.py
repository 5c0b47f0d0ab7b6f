"""Test-only: a tiny random Llama with the embedded SmolLM2 tokenizer, saved as a Hugging Face
folder, so end-to-end runs exercise the real loading, sampling and training code in seconds."""
import functools
import os

import jax

from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.models.loading import load_pretrained, save_pretrained


@functools.lru_cache(maxsize=None)
def tiny_policy_dir(root: str) -> str:
    path = os.path.join(root, "tiny-llama")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = load_pretrained("").tokenizer
    config = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         tie_word_embeddings=True, rope_theta=100000.0,
                         eos_token_ids=(tokenizer.eos_token_id,))
    _, params = transformer.init_params(config, jax.random.key(0))
    save_pretrained(params, config, tokenizer, path)
    return path
