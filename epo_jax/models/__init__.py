"""The policy model: a Flax NNX Llama / Qwen2 / Qwen3 decoder, checkpoint I/O and a KV-cache sampler.

config:       ModelConfig (hashable architecture + dtypes), from_hf_config, to_hf_config
transformer:  init_params / abstract_params, pure hidden_states / logits / unembedding of
              (graphdef, params), positions_from_mask, param_partition_specs for a
              ("data", "fsdp", "tensor") mesh
loading:      load_pretrained ("" = embedded SmolLM2-135M-Instruct, *.gguf, Hugging Face folder),
              save_pretrained (a folder transformers loads)
sampler:      Sampler.generate -> SampleOutput (tokens, log-probs, entropies, lengths)
tokenizer:    load_tokenizer, gguf_tokenizer, token_bytes
"""
from epo_jax.models.config import ModelConfig, UnsupportedArchitectureError, from_hf_config
from epo_jax.models.loading import (
    EMBEDDED_MODEL,
    LoadedModel,
    embedded_gguf_path,
    load_gguf,
    load_hf_folder,
    load_pretrained,
    save_pretrained,
)
from epo_jax.models.sampler import FINISH_REASONS, SampleOutput, Sampler, SamplingParams, stop_string_table
from epo_jax.models.tokenizer import gguf_tokenizer, load_tokenizer, token_bytes
from epo_jax.models.transformer import (
    Transformer,
    abstract_params,
    hidden_states,
    init_params,
    logits,
    param_partition_specs,
    positions_from_mask,
    split_model,
    unembedding,
)

__all__ = [
    "EMBEDDED_MODEL", "FINISH_REASONS", "ModelConfig", "LoadedModel", "SampleOutput", "Sampler", "SamplingParams",
    "Transformer", "UnsupportedArchitectureError", "abstract_params", "embedded_gguf_path", "from_hf_config",
    "gguf_tokenizer", "hidden_states", "init_params", "load_gguf", "load_hf_folder", "load_pretrained",
    "load_tokenizer", "logits", "param_partition_specs", "positions_from_mask",
    "save_pretrained", "split_model", "stop_string_table", "token_bytes", "unembedding",
]
