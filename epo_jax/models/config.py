"""Architecture description of the policy decoder, and its translation to and from Hugging Face config.json.

One frozen (hashable) dataclass covers the Llama family (SmolLM2, Llama 2/3 with rope scaling) and
Qwen2 / Qwen2.5 / Qwen3. Being hashable, it can sit in a Flax graph definition and in `jax.jit` static
arguments.

A ModelConfig holds concrete numerics; the run config's "auto" choices (model.dtype,
model.attention) are resolved for a platform in one place, `resolve_numerics`, which the loaders
(`from_hf_config`, the GGUF reader) call.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from epo_jax.errors import UserError
from epo_jax.models import attention as attention_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("auto",) + SUPPORTED_DTYPES           # allowed values of model.dtype
ATTENTION_IMPLEMENTATIONS = attention_lib.IMPLEMENTATIONS  # allowed values of model.attention

# Architecture-only folders (a config.json, no weights) of the models EPO was run with, for sizing
# runs offline (e.g. `--config.model.path=<architecture_dir("Qwen2.5-7B-Instruct")>` in a planner).
SHIPPED_ARCHITECTURES = ("Qwen2.5-0.5B-Instruct", "Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct")
_ARCHITECTURES_DIR = pathlib.Path(__file__).with_name("architectures")

_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedArchitectureError(UserError, ValueError):
    """The checkpoint describes a model this decoder cannot represent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights; `remat`
    rematerialises each decoder layer in the backward pass; `attention` is the kernel (xla, cudnn,
    splash: `attention.py`); in the xla kernel sequences longer than `attention_query_chunk` attend
    in blocks of that many queries, so attention scores take B x heads x chunk x T memory instead of
    B x heads x T x T.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "xla"
    attention_query_chunk: int = 512

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type={self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}.")
        for field in ("dtype", "param_dtype"):
            value = getattr(self, field)
            if value not in SUPPORTED_DTYPES:
                raise ValueError(f"{field}={value!r} is not supported; use one of {SUPPORTED_DTYPES}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each key/value head among equal groups).")
        if self.attention not in attention_lib.KERNELS:
            raise ValueError(f"attention={self.attention!r} is not one of {attention_lib.KERNELS} "
                             "('auto' is resolved by resolve_numerics before a ModelConfig is built).")
        if self.attention_query_chunk < 1:
            raise ValueError(f"attention_query_chunk={self.attention_query_chunk} must be >= 1.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope_scaling type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}.")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def inverse_frequencies(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim / 2] in float32, following the config's rope scaling.

        default: 1 / theta^(2i / d); linear: divided by `factor`; llama3: Llama 3.1's
        wavelength-dependent interpolation (transformers `_compute_llama3_parameters`).
        """
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        params = self.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "linear":
            return (inv_freq / np.float32(params["factor"])).astype(np.float32)
        if rope_type == "llama3":
            factor = float(params["factor"])
            low_freq_factor = float(params["low_freq_factor"])
            high_freq_factor = float(params["high_freq_factor"])
            old_context_len = float(params["original_max_position_embeddings"])
            low_freq_wavelen = old_context_len / low_freq_factor
            high_freq_wavelen = old_context_len / high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
            return np.where(is_medium, smoothed, scaled).astype(np.float32)
        return inv_freq

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dictionary that `transformers` reads back into the same architecture."""
        rope_parameters = {"rope_type": "default", **self.rope_parameters, "rope_theta": self.rope_theta}
        eos: int | list[int] | None = list(self.eos_token_ids) if self.eos_token_ids else None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURE_BY_MODEL_TYPE[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        elif self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        if self.rope_scaling:
            out["rope_scaling"] = dict(rope_parameters)
        return out


def architecture_dir(name: str) -> str:
    """The shipped folder holding `name`'s Hugging Face config.json (architecture only, no weights)."""
    if name not in SHIPPED_ARCHITECTURES:
        raise ValueError(f"no shipped architecture {name!r}; the shipped ones are {SHIPPED_ARCHITECTURES}.")
    return str(_ARCHITECTURES_DIR / name)


def _rope_scaling_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(rope_theta, rope scaling items) from the v4 (`rope_theta`, `rope_scaling`) or the v5
    (`rope_parameters`) config layout."""
    params = dict(hf.get("rope_parameters") or {})
    legacy_scaling = dict(hf.get("rope_scaling") or {})
    merged = {**legacy_scaling, **params}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    rope_theta = float(merged.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", "default")
    if rope_type == "default":
        return rope_theta, ()
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return rope_theta, tuple(sorted(merged.items()))


def resolve_numerics(dtype: str, attention: str, head_dim: int, platform: str | None = None) -> dict[str, str]:
    """{"dtype", "attention"} for a model on `platform` (default: the running backend), from the run
    config's model.dtype and model.attention.

    dtype "auto" is bfloat16 on GPU and TPU (with float32 parameters, param_dtype) and float32 on
    CPU, where XLA's bfloat16 matmuls are slower than float32; attention "auto" and the explicit
    kernels follow `attention.select_implementation`, which names model.attention when a choice
    cannot run there.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {COMPUTE_DTYPES}.")
    if platform is None:
        import jax  # the backend is asked only when a loader resolves a config, not at import

        platform = jax.default_backend()
    if dtype == "auto":
        dtype = "bfloat16" if platform in ("gpu", "tpu") else "float32"
    kernel = attention_lib.select_implementation(attention, platform=platform, dtype=dtype, head_dim=head_dim)
    return {"dtype": dtype, "attention": kernel}


def from_hf_config(
    hf: Mapping[str, Any],
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    attention: str = "auto",
    platform: str | None = None,
) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face config.json dictionary; dtype and attention may be
    "auto", resolved for `platform` by `resolve_numerics`.

    Raises UnsupportedArchitectureError for architectures or options this decoder does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"config.json has model_type={model_type!r} (architectures={hf.get('architectures')}); "
            f"supported model types are {SUPPORTED_MODEL_TYPES} (Llama family, Qwen2/Qwen2.5, Qwen3).")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"hidden_act={hf.get('hidden_act')!r} is not supported; only 'silu' (SwiGLU) is implemented.")
    if hf.get("mlp_bias", False):
        raise UnsupportedArchitectureError("mlp_bias=True is not supported; only bias-free MLPs are implemented.")
    if hf.get("use_sliding_window", False):
        raise UnsupportedArchitectureError(
            "use_sliding_window=True is not supported; only full causal attention is implemented.")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedArchitectureError(f"pretraining_tp={hf.get('pretraining_tp')} is not supported; use 1.")
    num_heads = int(hf["num_attention_heads"])
    hidden_size = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden_size // num_heads
    rope_theta, rope_scaling = _rope_scaling_from_hf(hf)
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_token_ids,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=param_dtype,
        remat=remat,
        **resolve_numerics(dtype, attention, int(head_dim), platform),
    )
