"""The shipped architecture-only config.json files (Qwen2.5 0.5B / 3B / 7B Instruct) load into the
sizes published for those models, and "auto" numerics resolve per platform."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import transformers

from epo_jax.models import transformer
from epo_jax.models.config import SHIPPED_ARCHITECTURES, architecture_dir, from_hf_config

# From the models' Hugging Face config.json files and model cards ("Number of Parameters", total and
# non-embedding, given to two decimals).
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, params=(0.49e9, 0.36e9)),
    "Qwen2.5-3B-Instruct": dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
                                intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, params=(3.09e9, 2.77e9)),
    "Qwen2.5-7B-Instruct": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, params=(7.61e9, 6.53e9)),
}


def _config_json(name: str) -> dict:
    with open(os.path.join(architecture_dir(name), "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", SHIPPED_ARCHITECTURES)
def test_shipped_architecture_has_the_published_sizes(name):
    facts = dict(PUBLISHED[name])
    published_total, published_non_embedding = facts.pop("params")
    config = from_hf_config(_config_json(name))
    for field, value in facts.items():
        assert getattr(config, field) == value, field
    assert (config.model_type, config.qkv_bias, config.rope_theta) == ("qwen2", True, 1e6)
    assert config.rms_norm_eps == 1e-6 and config.eos_token_ids == (151645,)
    _, params = transformer.abstract_params(config)
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    tables = (1 if config.tie_word_embeddings else 2) * config.vocab_size * config.hidden_size
    assert abs(total - published_total) <= 0.01e9
    assert abs(total - tables - published_non_embedding) <= 0.01e9
    assert os.path.getsize(os.path.join(architecture_dir(name), "config.json")) < 1000


@pytest.mark.parametrize("name", SHIPPED_ARCHITECTURES)
def test_transformers_reads_the_shipped_architecture_alike(name):
    theirs = transformers.AutoConfig.from_pretrained(architecture_dir(name))
    ours = from_hf_config(_config_json(name))
    assert type(theirs).__name__ == "Qwen2Config"
    assert (theirs.hidden_size, theirs.num_hidden_layers, theirs.num_key_value_heads, theirs.vocab_size) == (
        ours.hidden_size, ours.num_layers, ours.num_kv_heads, ours.vocab_size)
    assert theirs.hidden_size // theirs.num_attention_heads == ours.head_dim


@pytest.mark.parametrize("platform, dtype, kernel", [("cpu", "float32", "xla"), ("gpu", "bfloat16", "cudnn"),
                                                     ("tpu", "bfloat16", "splash")])
def test_auto_numerics_resolve_for_the_target_platform(platform, dtype, kernel):
    config = from_hf_config(_config_json("Qwen2.5-7B-Instruct"), dtype="auto", attention="auto", platform=platform)
    assert (config.dtype, config.param_dtype, config.attention) == (dtype, "float32", kernel)


def test_unknown_architecture_and_unresolved_choices_are_named():
    with pytest.raises(ValueError, match="Qwen2.5-7B-Instruct"):
        architecture_dir("Qwen2.5-14B-Instruct")
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        from_hf_config(_config_json("Qwen2.5-0.5B-Instruct"), dtype="float16")
    with pytest.raises(ValueError, match="'auto' is resolved"):
        from_hf_config(_config_json("Qwen2.5-0.5B-Instruct")).replace(attention="auto")
