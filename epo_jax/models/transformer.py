"""Flax NNX decoder for the Llama / Qwen2 / Qwen3 family, used through pure functions of its params.

Architecture (Touvron et al. 2023; Qwen2 report 2024; Qwen3 report 2025): token embedding, L pre-norm
blocks x + Attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x)), a final RMSNorm and an unembedding (tied to the
embedding or a separate lm_head). Attention is grouped-query attention with rotary position embeddings
(RoPE, the rotate-half convention of Hugging Face), optional q/k/v bias (Qwen2), optional per-head q/k
RMSNorm (Qwen3).

Projection kernels are [in, out] with the head dimension split out (q_proj.kernel [D, N, Hd]); the
embedding and the unembedding are [V, D] tables, the layout Hugging Face gives them. Parameter paths
mirror Hugging Face names: ('layers', 3, 'self_attn', 'q_proj', 'kernel') is the transpose of
`model.layers.3.self_attn.q_proj.weight` (see `loading.hf_name`).

The layers are a Python list, unrolled in the compiled program rather than scanned: on the
development CPU unrolled layers decoded 10-30% faster than `lax.scan` over stacked layers, at 3-4x
the compile time; the sampler compiles each shape bucket once and then decodes for the whole run,
so decode speed wins.

Who attends to whom comes from positions and segment ids (0 = padding) inside `attention.attend`,
which also runs the kernel `ModelConfig.attention` names (xla, cudnn or splash); no [B, T, S] mask
is built here.

Use it through `init_params` / `abstract_params` and the pure functions `hidden_states`, `logits`,
`unembedding`: the module is rebuilt from (graphdef, params) inside each traced function, so losses
stay pure functions of the params pytree (an `nnx.State`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from epo_jax.models.attention import attend
from epo_jax.models.config import ModelConfig

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (keys, values), each [B, K, S, Hd]

_INIT_STDDEV = 0.02  # transformers' default initializer_range


def _normal_init(rng: np.random.Generator | None, shape: tuple[int, ...], param_dtype: jnp.dtype) -> jax.Array:
    """normal(0, 0.02) weights drawn on the host (compiling a random-number program per weight shape
    costs seconds); zeros when rng is None, the shape-only init used to lay out a checkpoint."""
    if rng is None:
        return jnp.zeros(shape, param_dtype)
    return jnp.asarray((_INIT_STDDEV * rng.standard_normal(shape, dtype=np.float32)), dtype=param_dtype)


def _param(value: jax.Array, sharding: Sequence[str | None] | None) -> nnx.Param:
    """A parameter annotated with mesh axis names per dimension (None = replicated along it).

    Eager sharding stays off: placement is decided by `param_partition_specs` against a concrete mesh.
    """
    if sharding is None:
        return nnx.Param(value, eager_sharding=False)
    return nnx.Param(value, out_sharding=tuple(sharding), eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.weight = _param(jnp.ones((dim,), param_dtype), None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * normed


class Projection(nnx.Module):
    """A linear map y = x . kernel + bias with kernel [*in_dims, *out_dims] and bias [*out_dims].

    The [in, out] layout feeds XLA:CPU's matrix kernels directly; with Hugging Face's [out, in]
    layout the compiled decode loop transposed every head-split attention weight on every step.
    `adapter`, when set (a LoRA adapter, epo_jax/models/lora.py), adds its output of x to y.
    """

    def __init__(
        self,
        in_dims: tuple[int, ...],
        out_dims: tuple[int, ...],
        use_bias: bool,
        sharding: Sequence[str | None],
        param_dtype: jnp.dtype,
        rng: np.random.Generator | None,
    ):
        self.kernel = _param(_normal_init(rng, in_dims + out_dims, param_dtype), sharding)
        self.bias = (_param(jnp.zeros(out_dims, param_dtype), sharding[len(in_dims):])
                     if use_bias else None)
        self.num_in_dims = len(in_dims)
        self.adapter = nnx.data(None)  # data, so that an adapter module can be attached later

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        x_dims = tuple(range(x.ndim - self.num_in_dims, x.ndim))
        y = jax.lax.dot_general(x, kernel, ((x_dims, tuple(range(self.num_in_dims))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.adapter is not None:
            y = y + self.adapter(x)
        return y


class Embedding(nnx.Module):
    """Token embedding table [V, D]; also the unembedding when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int, param_dtype: jnp.dtype, rng: np.random.Generator | None):
        self.weight = _param(_normal_init(rng, (vocab_size, dim), param_dtype), ("tensor", "fsdp"))

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, rotate-half convention: x * cos + rotate_half(x) * sin with
    rotate_half([x1, x2]) = [-x2, x1] and angles position * inv_freq repeated over both halves
    (Su et al. 2021, as implemented in transformers' Llama)."""
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_BxTxF)[:, :, None, :]
    sin = jnp.sin(angles_BxTxF)[:, :, None, :]
    x32 = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; optional q/k/v/o biases and q/k RMSNorm."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator | None):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pd = jnp.dtype(config.param_dtype)
        self.q_proj = Projection((d,), (n, h), config.qkv_bias, ("fsdp", "tensor", None), pd, rng)
        self.k_proj = Projection((d,), (k, h), config.qkv_bias, ("fsdp", "tensor", None), pd, rng)
        self.v_proj = Projection((d,), (k, h), config.qkv_bias, ("fsdp", "tensor", None), pd, rng)
        self.o_proj = Projection((n, h), (d,), config.o_bias, ("tensor", None, "fsdp"), pd, rng)
        self.q_norm = RMSNorm(h, config.rms_norm_eps, pd) if config.qk_norm else None
        self.k_norm = RMSNorm(h, config.rms_norm_eps, pd) if config.qk_norm else None
        self.num_kv_heads = k
        self.config = config

    def _project(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> tuple[jax.Array, ...]:
        q = self.q_proj(x_BxTxD)
        k = self.k_proj(x_BxTxD)
        v = self.v_proj(x_BxTxD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.config.inverse_frequencies()
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)
        b, t, n, h = q.shape
        q_BxTxKxGxH = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
        return q_BxTxKxGxH, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def _output(self, attended_BxTxKxGxH: jax.Array) -> jax.Array:
        b, t, k, g, h = attended_BxTxKxGxH.shape
        return self.o_proj(attended_BxTxKxGxH.reshape(b, t, k * g, h))

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Self-attention over the sequence itself; returns the output and its keys/values [B, K, T, Hd]."""
        q, k_BxKxTxH, v_BxKxTxH = self._project(x_BxTxD, positions_BxT)
        attended = attend(q, k_BxKxTxH, v_BxKxTxH, positions_BxT, segments_BxT,
                          implementation=self.config.attention, query_chunk=self.config.attention_query_chunk)
        return self._output(attended), (k_BxKxTxH, v_BxKxTxH)

    def decode(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        cache_index: jax.Array,
        cache_positions_BxS: jax.Array,
        cache_segments_BxS: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Writes this step's keys/values at slot `cache_index` of the cache (a scalar, or [B]: one slot
        per row) and attends over the whole cache."""
        q, k_new, v_new = self._project(x_BxTxD, positions_BxT)
        k_cache, v_cache = cache
        k_cache = _write_cache(k_cache, k_new, cache_index)
        v_cache = _write_cache(v_cache, v_new, cache_index)
        attended = attend(q, k_cache, v_cache, positions_BxT, jnp.ones_like(positions_BxT),
                          cache_positions_BxS, cache_segments_BxS,
                          implementation=self.config.attention, query_chunk=self.config.attention_query_chunk)
        return self._output(attended), (k_cache, v_cache)


def _write_cache(cache_BxKxSxH: jax.Array, new_BxKxTxH: jax.Array, index: jax.Array) -> jax.Array:
    """The cache with `new` written at slots [index, index + T): the same slots in every row for a
    scalar index, each row's own for an index per row."""
    new_BxKxTxH = new_BxKxTxH.astype(cache_BxKxSxH.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache_BxKxSxH, new_BxKxTxH, (0, 0, index, 0))
    return jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (0, i, 0)))(
        cache_BxKxSxH, new_BxKxTxH, index)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator | None):
        d, f = config.hidden_size, config.intermediate_size
        pd = jnp.dtype(config.param_dtype)
        self.gate_proj = Projection((d,), (f,), False, ("fsdp", "tensor"), pd, rng)
        self.up_proj = Projection((d,), (f,), False, ("fsdp", "tensor"), pd, rng)
        self.down_proj = Projection((f,), (d,), False, ("tensor", "fsdp"), pd, rng)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator | None):
        pd = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
        self.self_attn = Attention(config, rng)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
        self.mlp = MLP(config, rng)

    def __call__(
        self, x: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attended, kv = self.self_attn(self.input_layernorm(x), positions_BxT, segments_BxT)
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def decode(
        self,
        x: jax.Array,
        positions_BxT: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        cache_index: jax.Array,
        cache_positions_BxS: jax.Array,
        cache_segments_BxS: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attended, cache = self.self_attn.decode(self.input_layernorm(x), positions_BxT, cache, cache_index,
                                                cache_positions_BxS, cache_segments_BxS)
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h)), cache


def _run_layer(layer: DecoderLayer, x: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array) -> jax.Array:
    return layer(x, positions_BxT, segments_BxT)[0]


def _run_layer_remat(layer: DecoderLayer, x: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array) -> jax.Array:
    """The layer with its activations recomputed in the backward pass (only its input is saved).

    `jax.checkpoint` wraps a pure function of the layer's state: the layer is split and rebuilt
    inside, so no Param object crosses the checkpoint's trace (nnx.remat would try to write the
    traced params back into Params created by the caller's trace, which flax rejects when the model
    itself was merged inside a jitted loss).
    """
    graphdef, state = nnx.split(layer)

    def pure_layer(state, x, positions_BxT, segments_BxT):
        return nnx.merge(graphdef, state)(x, positions_BxT, segments_BxT)[0]

    return jax.checkpoint(pure_layer)(state, x, positions_BxT, segments_BxT)


class Transformer(nnx.Module):
    """The decoder: embedding, layers, final norm and (untied) lm_head."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator | None):
        pd = jnp.dtype(config.param_dtype)
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, pd, rng)
        self.layers = nnx.List([DecoderLayer(config, rng) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
        # The untied unembedding is a [V, D] table like the embedding (Hugging Face's lm_head.weight).
        self.lm_head = None if config.tie_word_embeddings else Embedding(config.vocab_size, config.hidden_size, pd, rng)

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array) -> jax.Array:
        """Final normed hidden states [B, T, D] in the compute dtype; segments_BxT: int, 0 = padding."""
        x = self.embed_tokens(tokens_BxT, jnp.dtype(self.config.dtype))
        run = _run_layer_remat if self.config.remat else _run_layer
        for layer in self.layers:
            x = run(layer, x, positions_BxT, segments_BxT)
        return self.norm(x)

    def prefill(
        self, tokens_BxT: jax.Array, positions_BxT: jax.Array, segments_BxT: jax.Array, cache_len: int,
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states of the prompt and a KV cache of `cache_len` slots whose first T hold the prompt."""
        x = self.embed_tokens(tokens_BxT, jnp.dtype(self.config.dtype))
        t = tokens_BxT.shape[1]
        cache: KVCache = []
        for layer in self.layers:
            x, (k, v) = layer(x, positions_BxT, segments_BxT)
            padding = ((0, 0), (0, 0), (0, cache_len - t), (0, 0))
            cache.append((jnp.pad(k, padding), jnp.pad(v, padding)))
        return self.norm(x), cache

    def decode(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        cache: KVCache,
        cache_index: jax.Array,
        cache_positions_BxS: jax.Array,
        cache_segments_BxS: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens (at positions_BxT) written at cache slots [cache_index, cache_index + T)
        (cache_index: a scalar, or one slot per row [B]).

        cache_positions_BxS are the positions of the tokens each slot holds or will hold, and
        cache_segments_BxS their segment ids (0 for prompt padding): a query sees the slots of its
        segment at positions up to its own, so slots not yet written stay unseen.
        """
        x = self.embed_tokens(tokens_BxT, jnp.dtype(self.config.dtype))
        new_cache: KVCache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode(x, positions_BxT, layer_cache, cache_index,
                                          cache_positions_BxS, cache_segments_BxS)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache


def init_params(config: ModelConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Randomly initialised (graphdef, params): normal(0, 0.02) weights, unit norms, zero biases.

    Weights come from numpy's PCG64 seeded with the key's bits: deterministic per key, no compilation."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return nnx.split(Transformer(config, rng))


@functools.lru_cache(maxsize=8)
def abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) with jax.ShapeDtypeStruct leaves: the layout to fill from a checkpoint.

    Cached per config; treat the returned state as read-only."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, None)))


def positions_from_mask(attention_mask_BxT: jax.Array) -> jax.Array:
    """Position ids counting real tokens only: left padding does not shift positions (pads get 0)."""
    mask = attention_mask_BxT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def hidden_states(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array | None = None,
    attention_mask_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Final normed hidden states [B, T, D] (compute dtype); a pure function of params.

    Each row is one sequence whose real tokens `attention_mask_BxT` marks (default all ones), or,
    with `segment_ids_BxT` (int, 0 = padding) and `positions_BxT` restarting in each segment,
    several packed sequences that do not see each other. Positions default to
    `positions_from_mask(attention_mask_BxT)`, so left-padded batches give each row the hidden
    states it has unpadded.
    """
    chex.assert_rank(tokens_BxT, 2)
    model = nnx.merge(graphdef, params)
    if segment_ids_BxT is None:
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(tokens_BxT.shape, dtype=bool)
        chex.assert_equal_shape([tokens_BxT, attention_mask_BxT])
        if positions_BxT is None:
            positions_BxT = positions_from_mask(attention_mask_BxT)
        segment_ids_BxT = attention_mask_BxT.astype(jnp.int32)
    elif positions_BxT is None or attention_mask_BxT is not None:
        raise ValueError("hidden_states: packed rows take segment_ids_BxT with their positions_BxT "
                         "(restarting in each segment) and no attention_mask_BxT.")
    elif model.config.attention == "cudnn":
        raise ValueError("model.attention='cudnn' takes one run of real tokens per row; rows packed with "
                         "segment ids need model.attention='xla' or 'splash'.")
    chex.assert_equal_shape([tokens_BxT, positions_BxT, segment_ids_BxT])
    return model(tokens_BxT, positions_BxT, segment_ids_BxT)


def unembedding(params: nnx.State) -> jax.Array:
    """The [V, D] unembedding matrix (Hugging Face layout): lm_head if present, else the tied embedding."""
    if "lm_head" in params:
        return params["lm_head"]["weight"][...]
    return params["embed_tokens"]["weight"][...]


def logits(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array | None = None,
    attention_mask_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Next-token logits [B, T, V] in float32: hidden_states @ unembedding^T."""
    hidden = hidden_states(graphdef, params, tokens_BxT, positions_BxT, attention_mask_BxT, segment_ids_BxT)
    unembed_VxD = unembedding(params).astype(hidden.dtype)
    return jnp.einsum("btd,vd->btv", hidden, unembed_VxD, preferred_element_type=jnp.float32)


def _place_fsdp(spec: list[str | None], shape: tuple[int, ...], fsdp_size: int) -> list[str | None]:
    """Puts 'fsdp' on the largest dimension it divides that no other axis uses (replicated if none)."""
    spec = [None if axis == "fsdp" else axis for axis in spec]
    candidates = [i for i, axis in enumerate(spec) if axis is None and shape[i] % fsdp_size == 0]
    if candidates:
        spec[max(candidates, key=lambda i: shape[i])] = "fsdp"
    return spec


def param_partition_specs(params: nnx.State, mesh: Mesh | None = None) -> nnx.State:
    """PartitionSpec pytree (same structure as params) for mesh axes ("data", "fsdp", "tensor").

    Without a mesh: the annotations of the modules, "tensor" over heads, the MLP hidden dimension and
    the vocabulary (Megatron-style), "fsdp" over the model dimension, norms replicated. With a mesh,
    specs are fitted to it: an axis of size 1 or absent from the mesh is dropped, "tensor" is dropped
    where it does not divide its dimension, and "fsdp" goes to the largest dimension not taken by
    "tensor" that it divides. "data" always replicates params. The result is valid for
    `jax.sharding.NamedSharding(mesh, spec)`.
    """
    annotated = nnx.get_partition_spec(params)
    if mesh is None:
        return annotated
    sizes = dict(mesh.shape)

    def fit(spec: PartitionSpec, leaf: jax.Array) -> PartitionSpec:
        shape = leaf.shape
        axes = list(spec) + [None] * (len(shape) - len(spec))
        axes = [axis if axis is not None and sizes.get(axis, 1) > 1 and shape[i] % sizes[axis] == 0 else None
                for i, axis in enumerate(axes)]
        if sizes.get("fsdp", 1) > 1 and len(shape) > 1:
            axes = _place_fsdp(axes, shape, sizes["fsdp"])
        return PartitionSpec(*axes)

    return jax.tree.map(fit, annotated, params)
