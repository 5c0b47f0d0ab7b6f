"""The policy model: a Flax NNX Llama / Qwen2 / Qwen3 decoder, checkpoint I/O and a KV-cache sampler.

config:       ModelConfig (hashable architecture + dtypes + attention kernel), from_hf_config, to_hf_config,
              resolve_numerics ("auto" dtype / attention per platform), architecture_dir (shipped
              architecture-only Qwen2.5 config.json folders)
transformer:  init_params / abstract_params, pure hidden_states / logits / unembedding of
              (graphdef, params), positions_from_mask, param_partition_specs for a
              ("data", "fsdp", "tensor") mesh
loading:      load_pretrained ("" = embedded SmolLM2-135M-Instruct, *.gguf, Hugging Face folder),
              save_pretrained (a folder transformers loads), with_compute_dtype / cast_for_compute
              (the model's graph and params for another compute dtype, e.g. a bfloat16 sampler)
attention:    attend (xla / cudnn / splash behind one function), select_implementation
sampler:      Sampler.generate -> SampleOutput (tokens, log-probs, entropies, lengths); bucket
continuous:   SlotEngine, continuous batching over decode slots (insert prompts, decode chunks)
tokenizer:    load_tokenizer, gguf_tokenizer, token_bytes
"""
from epo_jax.models.attention import attend, select_implementation
from epo_jax.models.config import (
    ATTENTION_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    SAMPLER_DTYPES,
    ModelConfig,
    UnsupportedArchitectureError,
    from_hf_config,
    resolve_numerics,
)
from epo_jax.models.loading import (
    EMBEDDED_MODEL,
    LoadedModel,
    cast_for_compute,
    embedded_gguf_path,
    load_gguf,
    load_hf_folder,
    load_pretrained,
    save_pretrained,
    with_compute_dtype,
)
from epo_jax.models.continuous import SlotEngine
from epo_jax.models.sampler import FINISH_REASONS, SampleOutput, Sampler, SamplingParams, bucket, stop_string_table
from epo_jax.models.tokenizer import gguf_tokenizer, load_tokenizer, token_bytes
from epo_jax.models.transformer import (
    Transformer,
    abstract_params,
    hidden_states,
    init_params,
    logits,
    param_partition_specs,
    positions_from_mask,
    unembedding,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "COMPUTE_DTYPES", "EMBEDDED_MODEL", "FINISH_REASONS", "ModelConfig", "LoadedModel", "SAMPLER_DTYPES", "SampleOutput", "Sampler", "SamplingParams", "SlotEngine",
    "Transformer", "UnsupportedArchitectureError", "abstract_params", "attend", "bucket", "cast_for_compute", "embedded_gguf_path", "from_hf_config",
    "gguf_tokenizer", "hidden_states", "init_params", "load_gguf", "load_hf_folder", "load_pretrained",
    "load_tokenizer", "logits", "param_partition_specs", "positions_from_mask", "resolve_numerics",
    "save_pretrained", "select_implementation", "stop_string_table", "token_bytes", "unembedding",
    "with_compute_dtype",
]
