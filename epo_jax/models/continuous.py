"""Continuous batching: a fixed number of decode slots, each holding one reply in its own KV-cache row.

    engine = SlotEngine(sampler, params, sampling, num_slots=16, chunk_len=8)
    engine.insert([(slot, prompt_ids, key)])   # prefill prompts into free slots, between chunks
    slots, replies = engine.decode()           # one jitted chunk of up to k tokens over every slot;
                                               # the replies that ended, their slots free again

The shape of JetStream / MaxText's engine (prefill a prompt, insert it into a slot, generate steps
over all slots), on the sampler's parts: its prefill, sampling head (log-probs and entropies under
softmax(logits / T) over the full vocabulary), stop-string automaton and finish rules, so a reply
comes out as `Sampler.generate` would give it. Compiles: one prefill-and-insert program per prompt
bucket and one decode-chunk program.

Layout: slot r's cache row holds its prompt left-padded to the prompt's own bucket P_r in columns
[0, P_r) and reply token j in column P_r + j; every row has L = (largest bucket) + max_new_tokens
columns. The columns' positions and segment ids are set when the prompt is inserted; a reply
column not yet written holds a position past every query's, so it stays unseen (attention.py's
visibility rule), and what an earlier reply left in the row is segment 0.

Determinism: a reply depends only on its prompt, its key and the params, never on its slot, on
when it was inserted or on what the other slots hold. Each prompt is prefilled in a batch of its
own (one row per batch shard), its row's layout depends on its own length alone, attention reads
only the row's own cache, and the other batched operations compute each row independently. Token
j of a reply draws from fold_in(key, j), as row i of `Sampler.generate` with per-prompt keys.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from epo_jax.models.sampler import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP_STRING, SampleOutput, Sampler,
                                    SamplingParams, _DecodeStatics, _prefill, _sampling_head, _stop_checks,
                                    bucket)
from epo_jax.models.transformer import KVCache, positions_from_mask, unembedding


class SlotState(NamedTuple):
    """Every slot's reply in progress; rows of free or finished slots are `done` and left alone."""

    cache: KVCache                 # per layer (keys, values) [S, K, L, Hd]
    cache_positions_SxL: jax.Array  # the position of the token each column holds or will hold
    cache_segments_SxL: jax.Array   # 1 for the prompt's tokens and the reply's columns, 0 elsewhere
    reply_start_S: jax.Array       # column of reply token 0 (the prompt's bucket)
    prompt_len_S: jax.Array        # position of reply token 0 (the prompt's length)
    keys_S: jax.Array              # the reply's key: token j draws from fold_in(key, j)
    last_token_S: jax.Array        # the latest sampled token: the model's next input
    done_S: jax.Array
    stop_states_SxK: jax.Array     # each stop string's matcher state
    tokens_SxN: jax.Array
    logprobs_SxN: jax.Array
    entropies_SxN: jax.Array
    lengths_S: jax.Array           # tokens sampled so far (the stop token included)
    finish_reasons_S: jax.Array    # index into FINISH_REASONS
    decode_steps: jax.Array        # decode steps run (scalar), for the idle-row statistic
    active_row_steps: jax.Array    # (slot, step) pairs that sampled a token of a running reply

    def outputs(self) -> tuple[jax.Array, ...]:
        """The fields of SampleOutput, in its order."""
        return self.tokens_SxN, self.logprobs_SxN, self.entropies_SxN, self.lengths_S, self.finish_reasons_S


def _logits(hidden_BxD: jax.Array, params: nnx.State) -> jax.Array:
    return jnp.einsum("bd,vd->bv", hidden_BxD, unembedding(params).astype(hidden_BxD.dtype),
                      preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("statics",), donate_argnames=("state",))
def _insert(
    statics: _DecodeStatics,
    params: nnx.State,
    state: SlotState,
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    slots_B: jax.Array,
    keys_B: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_table: jax.Array,
) -> SlotState:
    """Prefills B prompts of one bucket, samples each reply's token 0 from the prefill's logits and
    writes both into slots `slots_B` (a slot index >= S marks a filler row, which is dropped)."""
    batch, width = tokens_BxP.shape
    num_slots, cache_len = state.cache_positions_SxL.shape
    new_tokens = statics.max_new_tokens
    prefilled, logits_BxV = _prefill(statics.graphdef, params, tokens_BxP, mask_BxP, width)
    first_keys_B = jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys_B)
    token_B, logprob_B, entropy_B = _sampling_head(logits_BxV, first_keys_B, statics, temperature, top_p)
    stop_states_BxK, hit_eos_B, hit_stop_B = _stop_checks(
        token_B, jnp.zeros((batch, state.stop_states_SxK.shape[1]), jnp.int32), statics, stop_table)
    prompt_len_B = jnp.sum(mask_BxP.astype(jnp.int32), axis=1)
    column_L = jnp.arange(cache_len)
    in_prompt_L = column_L < width
    pad = ((0, 0), (0, cache_len - width))
    positions_BxL = jnp.where(in_prompt_L, jnp.pad(positions_from_mask(mask_BxP), pad),
                              prompt_len_B[:, None] + column_L - width)
    segments_BxL = jnp.where(in_prompt_L, jnp.pad(mask_BxP.astype(jnp.int32), pad),
                             (column_L - width < new_tokens).astype(jnp.int32))

    def put(target, rows):
        return target.at[slots_B].set(rows.astype(target.dtype), mode="drop")

    def first(values_B):
        return jnp.zeros((batch, new_tokens), values_B.dtype).at[:, 0].set(values_B)

    cache = [(k.at[slots_B, :, :width].set(pk.astype(k.dtype), mode="drop"),
              v.at[slots_B, :, :width].set(pv.astype(v.dtype), mode="drop"))
             for (k, v), (pk, pv) in zip(state.cache, prefilled)]
    done_B = hit_eos_B | hit_stop_B | (new_tokens == 1)
    reasons_B = jnp.where(hit_eos_B, FINISH_EOS, jnp.where(hit_stop_B, FINISH_STOP_STRING, FINISH_LENGTH))
    return state._replace(
        cache=cache, cache_positions_SxL=put(state.cache_positions_SxL, positions_BxL),
        cache_segments_SxL=put(state.cache_segments_SxL, segments_BxL),
        reply_start_S=put(state.reply_start_S, jnp.full((batch,), width)),
        prompt_len_S=put(state.prompt_len_S, prompt_len_B), keys_S=state.keys_S.at[slots_B].set(keys_B, mode="drop"),
        last_token_S=put(state.last_token_S, token_B), done_S=put(state.done_S, done_B),
        stop_states_SxK=put(state.stop_states_SxK, stop_states_BxK), tokens_SxN=put(state.tokens_SxN, first(token_B)),
        logprobs_SxN=put(state.logprobs_SxN, first(logprob_B)),
        entropies_SxN=put(state.entropies_SxN, first(entropy_B)),
        lengths_S=put(state.lengths_S, jnp.ones((batch,), jnp.int32)),
        finish_reasons_S=put(state.finish_reasons_S, reasons_B))


def _record(state: SlotState, logits_SxV: jax.Array, statics: _DecodeStatics, temperature: jax.Array,
            top_p: jax.Array, stop_table: jax.Array) -> SlotState:
    """Samples the next token of every running reply (token `lengths_S` of each) and records it."""
    active_S = ~state.done_S
    index_S = state.lengths_S
    keys_S = jax.vmap(jax.random.fold_in)(state.keys_S, index_S)
    token_S, logprob_S, entropy_S = _sampling_head(logits_SxV, keys_S, statics, temperature, top_p)
    stop_states_SxK, hit_eos_S, hit_stop_S = _stop_checks(token_S, state.stop_states_SxK, statics, stop_table)
    rows_S = jnp.arange(token_S.shape[0])
    column_S = jnp.where(active_S, index_S, statics.max_new_tokens)  # past the end: dropped

    def put(target, values_S):
        return target.at[rows_S, column_S].set(values_S, mode="drop")

    lengths_S = index_S + active_S.astype(jnp.int32)
    finished_S = active_S & (hit_eos_S | hit_stop_S | (lengths_S >= statics.max_new_tokens))
    reasons_S = jnp.where(active_S & hit_eos_S, FINISH_EOS,
                          jnp.where(active_S & hit_stop_S, FINISH_STOP_STRING, state.finish_reasons_S))
    return state._replace(
        last_token_S=jnp.where(active_S, token_S, state.last_token_S), done_S=state.done_S | finished_S,
        stop_states_SxK=jnp.where(active_S[:, None], stop_states_SxK, state.stop_states_SxK),
        tokens_SxN=put(state.tokens_SxN, token_S), logprobs_SxN=put(state.logprobs_SxN, logprob_S),
        entropies_SxN=put(state.entropies_SxN, entropy_S), lengths_S=lengths_S, finish_reasons_S=reasons_S,
        decode_steps=state.decode_steps + 1,
        active_row_steps=state.active_row_steps + jnp.sum(active_S.astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=("statics", "chunk_len"), donate_argnames=("state",))
def _decode_chunk(
    statics: _DecodeStatics,
    chunk_len: int,
    params: nnx.State,
    state: SlotState,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_table: jax.Array,
) -> SlotState:
    """Up to `chunk_len` decode steps over every slot; stops early once no reply is running."""
    model = nnx.merge(statics.graphdef, params)

    def step(state: SlotState) -> SlotState:
        fed_S = jnp.maximum(state.lengths_S - 1, 0)  # index of the latest token, the one fed now
        hidden_Sx1xD, cache = model.decode(
            state.last_token_S[:, None], (state.prompt_len_S + fed_S)[:, None], state.cache,
            state.reply_start_S + fed_S, state.cache_positions_SxL, state.cache_segments_SxL)
        return _record(state._replace(cache=cache), _logits(hidden_Sx1xD[:, 0], params), statics, temperature,
                       top_p, stop_table)

    def cond(carry: tuple[jax.Array, SlotState]) -> jax.Array:
        i, state = carry
        return (i < chunk_len) & ~jnp.all(state.done_S)

    def body(carry: tuple[jax.Array, SlotState]) -> tuple[jax.Array, SlotState]:
        i, state = carry
        return i + 1, step(state)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


class SlotEngine:
    """`num_slots` replies decoded together, each slot refilled as soon as its reply ends.

    The host decides what goes where: `insert` prefills prompts into free slots, `decode` runs one
    chunk and returns the replies that ended. `free_slots` lists the slots that hold no reply.
    Slots are rounded up to a multiple of the mesh's batch shards (rows split over "data" x "fsdp").
    """

    def __init__(self, sampler: Sampler, params: nnx.State, sampling: SamplingParams, *, num_slots: int,
                 chunk_len: int):
        if num_slots < 1 or chunk_len < 1:
            raise ValueError(f"num_slots={num_slots} and chunk_len={chunk_len} must be >= 1.")
        self.sampler, self.params, self.sampling = sampler, params, sampling
        self.chunk_len = int(chunk_len)
        shards = sampler.batch_rows(1)
        self.num_slots = -(-int(num_slots) // shards) * shards
        self._prefill_rows = shards  # one prompt per batch shard: each prompt is prefilled alone
        self._statics = sampler.decode_statics(sampling)
        self._temperature, self._top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
        self._state = self._empty_state()
        self._busy = np.zeros(self.num_slots, bool)

    def _empty_state(self) -> SlotState:
        config, sampler = self.sampler.model_config, self.sampler
        s, n = self.num_slots, self.sampling.max_new_tokens
        cache_len = sampler.prompt_buckets[-1] + n
        shape = (s, config.num_kv_heads, cache_len, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        num_stop = sampler._stop_table.shape[0]
        state = SlotState(
            cache=[(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)],
            cache_positions_SxL=jnp.zeros((s, cache_len), jnp.int32),
            cache_segments_SxL=jnp.zeros((s, cache_len), jnp.int32),
            reply_start_S=jnp.zeros((s,), jnp.int32), prompt_len_S=jnp.zeros((s,), jnp.int32),
            keys_S=jax.random.split(jax.random.key(0), s), last_token_S=jnp.zeros((s,), jnp.int32),
            done_S=jnp.ones((s,), bool), stop_states_SxK=jnp.zeros((s, num_stop), jnp.int32),
            tokens_SxN=jnp.zeros((s, n), jnp.int32), logprobs_SxN=jnp.zeros((s, n), jnp.float32),
            entropies_SxN=jnp.zeros((s, n), jnp.float32), lengths_S=jnp.zeros((s,), jnp.int32),
            finish_reasons_S=jnp.zeros((s,), jnp.int32), decode_steps=jnp.int32(0), active_row_steps=jnp.int32(0))
        if sampler.mesh is None:
            return state
        rows = sampler._batch_axes or None
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
            sampler.mesh, PartitionSpec(*([rows] + [None] * (x.ndim - 1))[:x.ndim]))), state)

    @property
    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._busy)]

    @property
    def busy(self) -> bool:
        """Whether any slot holds a reply not yet returned by `decode`."""
        return bool(self._busy.any())

    def insert(self, requests: Sequence[tuple[int, Sequence[int], jax.Array]]) -> None:
        """Prefills each (free slot, prompt token ids, reply key) into its slot."""
        by_bucket: dict[int, list[tuple[int, Sequence[int], jax.Array]]] = defaultdict(list)
        slots = [slot for slot, _, _ in requests]
        for slot, prompt, key in requests:
            if not 0 <= slot < self.num_slots or self._busy[slot] or slots.count(slot) > 1:
                raise ValueError(f"slot {slot} is not a free slot of this engine (free: {self.free_slots}).")
            by_bucket[bucket(len(prompt), self.sampler.prompt_buckets)].append((slot, prompt, key))
        rows, batches = self._prefill_rows, []
        for width, group in by_bucket.items():
            for start in range(0, len(group), rows):
                part = group[start:start + rows]
                tokens, mask = self.sampler.left_padded([prompt for _, prompt, _ in part], width, rows)
                part_slots = np.full(rows, self.num_slots, np.int32)  # filler rows are dropped
                part_slots[:len(part)] = [slot for slot, _, _ in part]
                keys = jnp.stack([key for _, _, key in part] + [part[0][2]] * (rows - len(part)))
                batches.append((tokens, mask, part_slots, keys))
        self._busy[slots] = True
        batch_sharded = self.sampler._batch_sharded
        for tokens, mask, part_slots, keys in batches:
            with self.sampler.kernel_mesh():
                self._state = _insert(self._statics, self.params, self._state, batch_sharded(tokens),
                                      batch_sharded(mask), batch_sharded(part_slots), keys, self._temperature,
                                      self._top_p, self.sampler._stop_table)

    def decode(self) -> tuple[list[int], SampleOutput]:
        """Runs one chunk and returns (slots, their replies) for every reply that has ended; those
        slots are free again."""
        self._state = _decode_chunk(self._statics, self.chunk_len, self.params, self._state, self._temperature,
                                    self._top_p, self.sampler._stop_table)
        finished = np.flatnonzero(self._busy & np.asarray(self._state.done_S))
        self._busy[finished] = False
        if finished.size:
            outputs = [np.asarray(x)[finished] for x in self._state.outputs()]
        else:
            outputs = [np.zeros((0,) + x.shape[1:], x.dtype) for x in self._state.outputs()]
        return [int(i) for i in finished], SampleOutput(*outputs)

    def row_steps(self) -> tuple[int, int]:
        """(slot-steps decoded, slot-steps that sampled a running reply's token) so far."""
        return int(self._state.decode_steps) * self.num_slots, int(self._state.active_row_steps)
