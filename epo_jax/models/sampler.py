"""Batched generation with a fixed-size KV cache: a jitted prefill, then a jitted `lax.while_loop` decode.

Prompts are left-padded to a few length buckets (`bucket`, shared with the trainer's batch builder)
and the batch is padded to a power of two (and a multiple of the mesh's batch shards: rows split over
the "data" and "fsdp" axes), so compilations stay few. Padding is tracked by position (a mask), never
by a pad token id, because chat prompts contain every special id.

The decode loop follows Flax's lm1b `temperature_sampler`: one `lax.while_loop` over a named
`DecodeState`, with the model step passed in as a `tokens_to_logits` function.

Each generated token comes with its log-probability and the entropy of the sampling distribution
softmax(logits / temperature) over the full vocabulary, before top-p / top-k truncation, so both equal
the teacher-forced values the trainer computes at the same temperature.

Stop strings are matched on token ids by a per-string Knuth-Morris-Pratt automaton over bytes,
precomputed as a [state, token] transition table: one gather per step detects a stop string however
the tokenizer splits it across tokens.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_jax.models.config import ModelConfig
from epo_jax.models.tokenizer import token_bytes
from epo_jax.models.transformer import KVCache, positions_from_mask, unembedding

FINISH_LENGTH, FINISH_EOS, FINISH_STOP_STRING = 0, 1, 2
FINISH_REASONS = ("length", "eos", "stop_string")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature > 0 always defines the reported log-probs and entropies."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1 disables nucleus sampling.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0; 0 disables top-k.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Generated continuations, one row per prompt; entries at and after `lengths` are padding.

    tokens [B, N] int32, logprobs [B, N] and entropies [B, N] float32 (under softmax(logits / T)),
    lengths [B] int32 (the stop token counts), finish_reasons [B] int32 indexing FINISH_REASONS.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    lengths: np.ndarray
    finish_reasons: np.ndarray


def _kmp_byte_automaton(pattern: bytes) -> np.ndarray:
    """delta[state, byte] of the Knuth-Morris-Pratt matcher; state = length of the matched prefix."""
    m = len(pattern)
    delta = np.zeros((m, 256), dtype=np.int32)
    delta[0, pattern[0]] = 1
    fallback = 0
    for state in range(1, m):
        delta[state] = delta[fallback]
        delta[state, pattern[state]] = state + 1
        fallback = delta[fallback, pattern[state]]
    return delta


def stop_string_table(stop_strings: Sequence[str], vocab_bytes: Sequence[bytes]) -> np.ndarray:
    """table[i, state, token]: state of stop string i's matcher after reading the token's bytes.

    State len(stop_strings[i]) means the string has appeared (it is absorbing); rows beyond a
    shorter string's length are unused. Tokens are processed longest first so each byte position
    touches only the tokens that reach it.
    """
    patterns = [s.encode("utf-8") for s in stop_strings]
    if any(not p for p in patterns):
        raise ValueError(f"stop_strings={list(stop_strings)} contains an empty string.")
    vocab = len(vocab_bytes)
    lengths = np.array([len(b) for b in vocab_bytes])
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    byte_matrix = np.zeros((vocab, max(1, int(lengths.max(initial=1)))), dtype=np.uint8)
    for row, token in enumerate(order):
        byte_matrix[row, :lengths[token]] = np.frombuffer(vocab_bytes[token], dtype=np.uint8)
    tokens_reaching = [int(np.sum(sorted_lengths > j)) for j in range(byte_matrix.shape[1])]
    max_states = max(len(p) for p in patterns) + 1
    table = np.zeros((len(patterns), max_states, vocab), dtype=np.int32)
    for i, pattern in enumerate(patterns):
        m = len(pattern)
        delta = np.vstack([_kmp_byte_automaton(pattern), np.full((1, 256), m, dtype=np.int32)])
        for start in range(m + 1):
            state = np.full(vocab, start, dtype=np.int32)
            for j, active in enumerate(tokens_reaching):
                state[:active] = delta[state[:active], byte_matrix[:active, j]]
            table[i, start, order] = state
    return table


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (buckets sorted ascending)."""
    i = bisect.bisect_left(list(buckets), length)
    if i == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}; "
                         "raise rollout.prompt_buckets / rollout.max_prompt_len")
    return int(buckets[i])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batch_bucket(batch: int, multiple: int) -> int:
    """Next power of two >= batch, rounded up to a multiple of the number of batch shards."""
    return _round_up(1 << max(0, (batch - 1).bit_length()), multiple)


def _truncation_mask(z_BxV: jax.Array, log_normalizer_B: jax.Array, top_k: int,
                     top_p: jax.Array | None) -> jax.Array | None:
    """Tokens kept by top-k, then by the nucleus of what top-k kept (the smallest set of most probable
    tokens holding a top_p share of its mass; Holtzman et al. 2020), in the order transformers applies
    them; None when neither applies. Ties at a boundary are kept. z are the scaled logits."""
    keep_BxV = None
    if top_k:
        kth_B = jax.lax.top_k(z_BxV, top_k)[0][:, -1]
        keep_BxV = z_BxV >= kth_B[:, None]
    if top_p is not None:
        sorted_desc = -jnp.sort(-z_BxV, axis=-1)
        probs = jnp.exp(sorted_desc - log_normalizer_B[:, None])
        if top_k:
            probs = jnp.where(jnp.arange(probs.shape[-1]) < top_k, probs, 0.0)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        in_nucleus = mass_before < top_p * jnp.sum(probs, axis=-1, keepdims=True)
        threshold_B = jnp.min(jnp.where(in_nucleus, sorted_desc, jnp.inf), axis=-1)
        nucleus = z_BxV >= threshold_B[:, None]
        keep_BxV = nucleus if keep_BxV is None else keep_BxV & nucleus
    return keep_BxV


@dataclasses.dataclass(frozen=True)
class _DecodeStatics:
    """Everything the decode program is specialised on (hashable for jax.jit); temperature and
    top_p values are traced arguments, so changing them does not recompile."""

    graphdef: nnx.GraphDef
    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    eos_ids: tuple[int, ...]
    stop_lengths: tuple[int, ...]


_SAMPLING_BLOCK = 256


def _last_positive(weights: jax.Array) -> jax.Array:
    """Index of the last positive entry along the last axis."""
    n = weights.shape[-1]
    return n - 1 - jnp.argmax(weights[..., ::-1] > 0, axis=-1)


def _inverse_cdf_sample(weights_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One draw per row from p proportional to weights: the first token whose cumulative weight
    exceeds u * total, u ~ U[0, 1).

    Two levels, blocks of 256 tokens then tokens within the chosen block, so the only scans are
    over V / 256 block sums and 256 weights: a Gumbel variate per vocabulary entry, or a cumulative
    sum over the whole vocabulary, each cost several times the rest of the sampling head on CPU.
    Rounding can leave the target at or past the last cumulative sum; the draw then takes the last
    token of positive weight, never a truncated one.
    """
    batch, vocab = weights_BxV.shape
    n_blocks = -(-vocab // _SAMPLING_BLOCK)
    padded = jnp.pad(weights_BxV, ((0, 0), (0, n_blocks * _SAMPLING_BLOCK - vocab)))
    blocks_BxNxK = padded.reshape(batch, n_blocks, _SAMPLING_BLOCK)
    block_sums_BxN = jnp.sum(blocks_BxNxK, axis=-1)
    block_cdf_BxN = jnp.cumsum(block_sums_BxN, axis=-1)
    target_B = jax.vmap(jax.random.uniform)(keys_B) * block_cdf_BxN[:, -1]
    block_B = jnp.minimum(jnp.sum(block_cdf_BxN <= target_B[:, None], axis=-1), _last_positive(block_sums_BxN))
    mass_before_B = jnp.take_along_axis(block_cdf_BxN - block_sums_BxN, block_B[:, None], axis=1)[:, 0]
    inner_BxK = jnp.take_along_axis(blocks_BxNxK, block_B[:, None, None], axis=1)[:, 0]
    inner_cdf_BxK = jnp.cumsum(inner_BxK, axis=-1) + mass_before_B[:, None]
    within_B = jnp.minimum(jnp.sum(inner_cdf_BxK <= target_B[:, None], axis=-1), _last_positive(inner_BxK))
    return (block_B * _SAMPLING_BLOCK + within_B).astype(jnp.int32)


def _sampling_head(
    logits_BxV: jax.Array, keys_B: jax.Array, statics: _DecodeStatics, temperature: jax.Array, top_p: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token, log p(token), entropy) with p = softmax(z), z = logits / T, over the full vocabulary.

    With m = max z, e = exp(z - m), s = sum e: log p(v) = z_v - m - log s and
    H = -sum_v p(v) log p(v) = log s - sum_v e_v (z_v - m) / s, one pass over the vocabulary. The
    token is drawn from p restricted to top-k / top-p, or is the first argmax when greedy.
    """
    z_BxV = logits_BxV / temperature
    max_B = jnp.max(z_BxV, axis=-1)
    shifted_BxV = z_BxV - max_B[:, None]
    exp_BxV = jnp.exp(shifted_BxV)
    sum_B = jnp.sum(exp_BxV, axis=-1)
    entropy_B = jnp.log(sum_B) - jnp.sum(exp_BxV * shifted_BxV, axis=-1) / sum_B
    log_normalizer_B = max_B + jnp.log(sum_B)
    if statics.greedy:
        # argmax, not a comparison with max_B: XLA may recompute z in another fusion, where it can
        # round differently from the z the maximum was taken over, and then no token would match.
        token_B = jnp.argmax(z_BxV, axis=-1).astype(jnp.int32)
    else:
        keep_BxV = _truncation_mask(z_BxV, log_normalizer_B, statics.top_k, top_p if statics.use_top_p else None)
        weights_BxV = exp_BxV if keep_BxV is None else jnp.where(keep_BxV, exp_BxV, 0.0)
        token_B = _inverse_cdf_sample(weights_BxV, keys_B)
    logprob_B = jnp.take_along_axis(z_BxV, token_B[:, None], axis=1)[:, 0] - log_normalizer_B
    return token_B, logprob_B, entropy_B


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    cache_len: int,
) -> tuple[KVCache, jax.Array]:
    """KV cache of the prompts and the float32 next-token logits [B, V] after the last prompt token."""
    model = nnx.merge(graphdef, params)
    hidden_BxPxD, cache = model.prefill(tokens_BxP, positions_from_mask(mask_BxP), mask_BxP.astype(jnp.int32),
                                        cache_len)
    unembed_VxD = unembedding(params).astype(hidden_BxPxD.dtype)
    logits_BxV = jnp.einsum("bd,vd->bv", hidden_BxPxD[:, -1], unembed_VxD, preferred_element_type=jnp.float32)
    return cache, logits_BxV


class DecodeState(NamedTuple):
    """The carry of the decode loop; rows that are done keep their outputs."""

    step: jax.Array              # index of the token sampled next, int32 scalar
    cache: KVCache               # holds the prompt and the tokens fed to the model so far
    last_token_B: jax.Array      # the latest sampled token: the model's next input
    done_B: jax.Array            # finished rows (EOS, a stop string, or filler rows)
    stop_states_BxK: jax.Array   # each stop string's matcher state
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    entropies_BxN: jax.Array
    lengths_B: jax.Array         # tokens generated so far, the stop token included
    finish_reasons_B: jax.Array  # index into FINISH_REASONS

    def outputs(self) -> tuple[jax.Array, ...]:
        """The fields of SampleOutput, in its order."""
        return self.tokens_BxN, self.logprobs_BxN, self.entropies_BxN, self.lengths_B, self.finish_reasons_B


TokensToLogits = Callable[[jax.Array, jax.Array, KVCache], tuple[jax.Array, KVCache]]


def _initial_state(cache: KVCache, done_B: jax.Array, max_new_tokens: int, num_stop_strings: int) -> DecodeState:
    batch = done_B.shape[0]
    return DecodeState(
        step=jnp.int32(0), cache=cache, last_token_B=jnp.zeros((batch,), jnp.int32), done_B=done_B,
        stop_states_BxK=jnp.zeros((batch, num_stop_strings), jnp.int32),
        tokens_BxN=jnp.zeros((batch, max_new_tokens), jnp.int32),
        logprobs_BxN=jnp.zeros((batch, max_new_tokens), jnp.float32),
        entropies_BxN=jnp.zeros((batch, max_new_tokens), jnp.float32),
        lengths_B=jnp.zeros((batch,), jnp.int32),
        finish_reasons_B=jnp.full((batch,), FINISH_LENGTH, jnp.int32))


def _stop_checks(token_B: jax.Array, stop_states_BxK: jax.Array, statics: _DecodeStatics,
                 stop_table: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(each stop string's matcher state after token_B, token is an EOS id, a stop string is complete)."""
    if statics.stop_lengths:
        stop_index = jnp.arange(stop_table.shape[0])
        stop_states_BxK = stop_table[stop_index[None, :], stop_states_BxK, token_B[:, None]]
        hit_stop = jnp.any(stop_states_BxK == jnp.asarray(statics.stop_lengths, jnp.int32)[None, :], axis=1)
    else:
        hit_stop = jnp.zeros(token_B.shape, bool)
    eos_ids = jnp.asarray(statics.eos_ids or (-1,), dtype=jnp.int32)
    hit_eos = jnp.any(token_B[:, None] == eos_ids[None, :], axis=1)
    return stop_states_BxK, hit_eos, hit_stop


def _record(state: DecodeState, logits_BxV: jax.Array, row_keys_B: jax.Array, statics: _DecodeStatics,
            temperature: jax.Array, top_p: jax.Array, stop_table: jax.Array) -> DecodeState:
    """Samples token `state.step` of every row from its logits and records it in the state."""
    step = state.step
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_B)
    token_B, logprob_B, entropy_B = _sampling_head(logits_BxV, step_keys, statics, temperature, top_p)
    active = ~state.done_B
    stop_states, hit_eos, hit_stop = _stop_checks(token_B, state.stop_states_BxK, statics, stop_table)
    reasons = jnp.where(active & hit_eos, FINISH_EOS,
                        jnp.where(active & hit_stop, FINISH_STOP_STRING, state.finish_reasons_B))
    return state._replace(
        step=step + 1, last_token_B=token_B, done_B=state.done_B | hit_eos | hit_stop, stop_states_BxK=stop_states,
        tokens_BxN=state.tokens_BxN.at[:, step].set(jnp.where(active, token_B, 0)),
        logprobs_BxN=state.logprobs_BxN.at[:, step].set(jnp.where(active, logprob_B, 0.0)),
        entropies_BxN=state.entropies_BxN.at[:, step].set(jnp.where(active, entropy_B, 0.0)),
        lengths_B=state.lengths_B + active.astype(jnp.int32), finish_reasons_B=reasons)


def _sample_loop(tokens_to_logits: TokensToLogits, record: Callable[[DecodeState, jax.Array], DecodeState],
                 first_logits_BxV: jax.Array, state: DecodeState) -> DecodeState:
    """The first token from the prefill's logits, then one `lax.while_loop` step per token until
    every row is done or max_new_tokens are sampled."""
    max_new_tokens = state.tokens_BxN.shape[1]

    def cond(state: DecodeState) -> jax.Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

    def body(state: DecodeState) -> DecodeState:
        logits_BxV, cache = tokens_to_logits(state.last_token_B, state.step, state.cache)
        return record(state._replace(cache=cache), logits_BxV)

    return jax.lax.while_loop(cond, body, record(state, first_logits_BxV))


@functools.partial(jax.jit, static_argnames=("statics",), donate_argnames=("cache",))
def _decode(
    statics: _DecodeStatics,
    params: nnx.State,
    cache: KVCache,
    logits_BxV: jax.Array,
    mask_BxP: jax.Array,
    done_B: jax.Array,
    row_keys_B: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_table: jax.Array,
) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """Samples up to max_new_tokens per row, stopping rows at EOS or a completed stop string."""
    model = nnx.merge(statics.graphdef, params)
    unembed_VxD = unembedding(params)
    batch, prompt_len = mask_BxP.shape
    prompt_lengths_B = jnp.sum(mask_BxP.astype(jnp.int32), axis=1)
    # Slot P + j holds generated token j at position prompt_length + j; prompt padding is segment 0.
    cache_positions_BxS = jnp.concatenate(
        [positions_from_mask(mask_BxP), prompt_lengths_B[:, None] + jnp.arange(statics.max_new_tokens)], axis=1)
    cache_segments_BxS = jnp.concatenate(
        [mask_BxP.astype(jnp.int32), jnp.ones((batch, statics.max_new_tokens), jnp.int32)], axis=1)

    def tokens_to_logits(token_B: jax.Array, step: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds token `step - 1` (written at cache slot P + step - 1); logits of token `step`."""
        positions_Bx1 = (prompt_lengths_B + step - 1)[:, None]
        hidden_Bx1xD, cache = model.decode(token_B[:, None], positions_Bx1, cache, prompt_len + step - 1,
                                           cache_positions_BxS, cache_segments_BxS)
        logits = jnp.einsum("bd,vd->bv", hidden_Bx1xD[:, 0], unembed_VxD.astype(hidden_Bx1xD.dtype),
                            preferred_element_type=jnp.float32)
        return logits, cache

    record = functools.partial(_record, row_keys_B=row_keys_B, statics=statics, temperature=temperature,
                               top_p=top_p, stop_table=stop_table)
    state = _sample_loop(tokens_to_logits, record, logits_BxV,
                         _initial_state(cache, done_B, statics.max_new_tokens, stop_table.shape[0]))
    # Returning the cache lets XLA alias the donated input buffers to the loop state, so the loop
    # updates them in place instead of copying the cache into fresh buffers.
    return state.cache, state.outputs()


class Sampler:
    """Generates continuations for many prompts at once with a policy's (graphdef, params).

    Compiles one prefill and one decode program per (batch bucket, prompt-length bucket, sampling
    settings); params are an argument, so updated params reuse the compiled programs.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_config: ModelConfig,
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
        *,
        stop_strings: Sequence[str] = (),
        eos_token_ids: Sequence[int] | None = None,
        prompt_buckets: Sequence[int] = (256, 512, 1024, 2048),
        mesh: Mesh | None = None,
    ):
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer (to know the bytes of every token id).")
        if not prompt_buckets or any(b < 1 for b in prompt_buckets):
            raise ValueError(f"prompt_buckets={tuple(prompt_buckets)} must be positive lengths.")
        self.graphdef = graphdef
        self.model_config = model_config
        if eos_token_ids is None:
            eos_token_ids = tuple(model_config.eos_token_ids)
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos_token_ids = tuple(sorted(set(eos_token_ids) | {tokenizer.eos_token_id}))
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.stop_strings = tuple(stop_strings)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.mesh = mesh
        # Rows split over the data-parallel axes; FSDP devices hold different rows too, gathering
        # each layer's weights as they go, instead of repeating the same rows.
        self._batch_axes = tuple(axis for axis in ("data", "fsdp")
                                 if mesh is not None and mesh.shape.get(axis, 1) > 1)
        self._batch_shards = int(np.prod([mesh.shape[axis] for axis in self._batch_axes], dtype=int))
        table = (stop_string_table(self.stop_strings, token_bytes(tokenizer, model_config.vocab_size))
                 if self.stop_strings else np.zeros((1, 1, model_config.vocab_size), np.int32))
        self._stop_table = jnp.asarray(table)

    def _batch_sharding(self, ndim: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec(self._batch_axes or None, *([None] * (ndim - 1))))

    def _batch_sharded(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, self._batch_sharding(array.ndim))

    def _abstract_rows(self, num_prompts: int, prompt_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        batch = _batch_bucket(num_prompts, self._batch_shards)
        return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self._batch_sharding(len(shape)))
                for name, shape, dtype in (("tokens", (batch, prompt_len), jnp.int32),
                                           ("mask", (batch, prompt_len), jnp.bool_), ("done", (batch,), jnp.bool_))}

    def lower_prefill(self, params, num_prompts: int, prompt_len: int,
                      sampling: SamplingParams) -> jax.stages.Lowered:
        """The prefill program `generate` runs for `num_prompts` prompts in the `prompt_len` bucket,
        lowered at abstract shapes (params may hold jax.ShapeDtypeStruct leaves): what
        `epo_jax.plan` compiles to size the rollout without allocating it."""
        rows = self._abstract_rows(num_prompts, prompt_len)
        with self.kernel_mesh():
            return _prefill.lower(self.graphdef, params, rows["tokens"], rows["mask"],
                                  prompt_len + sampling.max_new_tokens)

    def lower_decode(self, params, prefill_outputs: tuple[KVCache, jax.Array], num_prompts: int, prompt_len: int,
                     sampling: SamplingParams) -> jax.stages.Lowered:
        """The decode program after `lower_prefill`'s; `prefill_outputs` is the (KV cache, logits)
        the prefill returns, as jax.ShapeDtypeStruct leaves with the compiled prefill's output shardings."""
        rows = self._abstract_rows(num_prompts, prompt_len)
        cache, logits = prefill_outputs
        row_keys = self._row_keys(jax.random.key(0), num_prompts, rows["done"].shape[0])
        return _decode.lower(self.decode_statics(sampling), params, cache, logits, rows["mask"], rows["done"],
                             row_keys, jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                             self._stop_table)

    def left_padded(self, prompts: Sequence[Sequence[int]], width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) [rows, width], each prompt right-aligned; rows past the prompts repeat prompt 0."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token.")
        tokens = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), bool)
        for row in range(rows):
            prompt = prompts[row] if row < len(prompts) else prompts[0]
            tokens[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = True
        if tokens.max() >= self.model_config.vocab_size or tokens.min() < 0:
            raise ValueError(f"prompt token ids must lie in [0, {self.model_config.vocab_size}); "
                             f"found ids in [{tokens.min()}, {tokens.max()}].")
        return tokens, mask

    def kernel_mesh(self) -> contextlib.AbstractContextManager:
        """The mesh context prefill runs under: the splash kernel runs per shard in a shard_map over
        it (Mosaic kernels are not partitioned automatically); the other kernels need none."""
        splash_mesh = self.mesh is not None and self.model_config.attention == "splash"
        return jax.set_mesh(self.mesh) if splash_mesh else contextlib.nullcontext()

    def decode_statics(self, sampling: SamplingParams) -> _DecodeStatics:
        """What the decode programs are specialised on for `sampling` (temperature and top_p are traced)."""
        return _DecodeStatics(
            graphdef=self.graphdef, max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy,
            top_k=sampling.top_k, use_top_p=sampling.top_p < 1, eos_ids=self.eos_token_ids,
            stop_lengths=tuple(len(s.encode("utf-8")) for s in self.stop_strings))

    def batch_rows(self, num_prompts: int) -> int:
        """Rows a call with `num_prompts` prompts decodes (a power of two, a multiple of the batch shards)."""
        return _batch_bucket(num_prompts, self._batch_shards)

    def program_shape(self, num_prompts: int, longest_prompt: int) -> tuple[int, int]:
        """(rows, prompt length) of the programs that generate for these prompts: one compile each."""
        return self.batch_rows(num_prompts), bucket(longest_prompt, self.prompt_buckets)

    def _row_keys(self, key: jax.Array, num_prompts: int, batch: int) -> jax.Array:
        """One key per row; filler rows reuse row 0's."""
        if key.shape == (num_prompts,):
            row_keys = key
        elif key.shape == ():
            row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(num_prompts))
        else:
            raise ValueError(f"key has shape {key.shape}; pass one key or one per prompt ({num_prompts},).")
        row_keys = jnp.concatenate([row_keys, jnp.broadcast_to(row_keys[:1], (batch - num_prompts,))])
        if self.mesh is None:
            return row_keys
        return jax.device_put(row_keys, NamedSharding(self.mesh, PartitionSpec(self._batch_axes or None)))

    def generate(
        self,
        params: nnx.State,
        prompts: Sequence[Sequence[int]],
        key: jax.Array,
        sampling: SamplingParams = SamplingParams(),
    ) -> SampleOutput:
        """Continuations of `prompts` (token id lists); deterministic for a given key.

        `key` is one key, or one key per prompt (shape [len(prompts)]). Row i draws token `step`
        from fold_in(row_key_i, step), where row_key_i is key[i] or, for a single key,
        fold_in(key, i); so a prompt's continuation does not depend on the batch bucket it lands
        in, and with per-prompt keys not on the other prompts either.
        """
        if not prompts:
            raise ValueError("prompts is empty; pass at least one token id list.")
        batch, prompt_len = self.program_shape(len(prompts), max(len(p) for p in prompts))
        tokens, mask = self.left_padded(prompts, prompt_len, batch)
        done = np.arange(batch) >= len(prompts)  # filler rows start finished
        row_keys = self._row_keys(key, len(prompts), batch)
        tokens_j, mask_j = self._batch_sharded(tokens), self._batch_sharded(mask)
        with self.kernel_mesh():
            cache, logits = _prefill(self.graphdef, params, tokens_j, mask_j, prompt_len + sampling.max_new_tokens)
        _, out = _decode(self.decode_statics(sampling), params, cache, logits, mask_j, self._batch_sharded(done),
                         row_keys, jnp.float32(sampling.temperature), jnp.float32(sampling.top_p), self._stop_table)
        return SampleOutput(*(np.asarray(x)[: len(prompts)] for x in out))
