"""Turn samples -> padded training arrays, in a few bucket shapes so the update compiles rarely.

Row layout: [left-padded prompt (P) | right-padded response (R)], P from the prompt buckets and R
the configured response length. The row count comes from `update_rows` (the rule the update's
minibatch / micro-batch split needs); rows past the samples are all-masked and count in no loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from epo_jax.models.sampler import bucket
from epo_jax.rollout.samples import TurnSample


def update_rows(num_samples: int, *, num_minibatches: int, micro_batch_size: int) -> int:
    """Rows of an update batch holding `num_samples` turn samples.

    The update splits its rows into num_minibatches x (micro-batches per minibatch) x
    micro_batch_size; the micro-batch count is rounded up to a power of two, so that the update
    compiles for a handful of row counts only.
    """
    per_micro_batch = num_minibatches * micro_batch_size
    needed = max(1, -(-num_samples // per_micro_batch))
    return per_micro_batch * (1 << (needed - 1).bit_length())


def micro_batches_per_minibatch(num_rows: int, *, num_minibatches: int, micro_batch_size: int) -> int:
    """How many micro-batches each minibatch of a `num_rows` batch holds (the inverse of update_rows)."""
    if num_rows % (num_minibatches * micro_batch_size):
        raise ValueError(f"update: {num_rows} rows are not a multiple of algo.num_minibatches x "
                         f"algo.micro_batch_size = {num_minibatches * micro_batch_size}")
    return num_rows // (num_minibatches * micro_batch_size)


def build_batch(samples: Sequence[TurnSample], *, prompt_buckets: Sequence[int], response_len: int,
                rows: int, pad_id: int, padding_id_start: int,
                prompt_len: int | None = None) -> dict[str, np.ndarray]:
    """Stacks samples into `rows` rows (at least len(samples); see `update_rows`).

    `prompt_len` fixes the prompt width instead of the bucket of the longest prompt (every
    process of a multi-host run must hand the same shape to the update: they agree on the
    largest); `padding_id_start` numbers the padding rows' trajectory and group ids, distinct
    across processes so that no padding row joins another.
    """
    longest = max((len(s.prompt_ids) for s in samples), default=1)
    if prompt_len is None:
        prompt_len = bucket(longest, prompt_buckets)
    elif prompt_len < longest:
        raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({longest} tokens)")
    if rows < len(samples):
        raise ValueError(f"rows={rows} cannot hold {len(samples)} samples")
    tokens = np.full((rows, prompt_len + response_len), pad_id, np.int32)
    attention = np.zeros((rows, prompt_len + response_len), bool)
    response_mask = np.zeros((rows, response_len), np.float32)
    old_logprobs = np.zeros((rows, response_len), np.float32)
    ints = {k: np.zeros(rows, np.int32) for k in ("turn_index", "traj_id", "group_id", "anchor_id")}
    floats = {k: np.zeros(rows, np.float32) for k in ("episode_reward", "turn_penalty")}
    last_turn = np.zeros(rows, bool)
    valid = np.zeros(rows, bool)
    # Padding rows get distinct trajectory ids past the real ones so they join no group.
    ints["traj_id"][:] = np.arange(rows) + padding_id_start
    ints["group_id"][:] = np.arange(rows) + padding_id_start
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), min(len(s.response_ids), response_len)
        tokens[i, prompt_len - p:prompt_len] = s.prompt_ids
        tokens[i, prompt_len:prompt_len + r] = s.response_ids[:r]
        attention[i, prompt_len - p:prompt_len + r] = True
        response_mask[i, :r] = 1.0
        old_logprobs[i, :r] = s.response_logprobs[:r]
        ints["turn_index"][i], ints["traj_id"][i] = s.turn_index, s.traj_id
        ints["group_id"][i], ints["anchor_id"][i] = s.group_id, s.anchor_id
        floats["episode_reward"][i], floats["turn_penalty"][i] = s.episode_reward, s.penalty
        last_turn[i], valid[i] = s.last_turn, True
    return dict(tokens=tokens, attention_mask=attention, response_mask=response_mask,
                old_logprobs=old_logprobs, last_turn=last_turn,
                valid=valid, **floats, **ints)


# Packing (algo.pack): the update's forward passes run on rows that each hold several turn samples
# end to end, told apart by segment ids, instead of one sample per padded row. The samples stay
# where they are (the arrays above, one row each: every loss term reads them unchanged); a packing
# layout says where each sample's tokens go in the packed rows of its micro-batch and where its
# response's hidden states come back from. Every micro-batch keeps the samples it holds unpacked
# (the update's strided split), so each loss term and aggregation sees the same rows, and each
# batch shard packs only its own rows, so no sample moves between devices.
#
# Layout arrays, for A arrangements of the rows (arrangement 0: rows in order, what the score pass
# and a one-epoch update read; with algo.ppo_epochs > 1, arrangement 1 + e: epoch e's shuffle),
# M micro-batches of S rows over G batch shards, each shard's rows packed into K rows of L tokens:
#   pack_order [A, B]             the batch row in each slot of the arrangement;
#   pack_index [A, M, G, K, L]    for each packed token, i * C + c: column c of the micro-batch's
#                                 i-th row on that shard (rows C wide); -1 where no token is;
#   pack_response_start [A, B]    per slot, the flat position (k * L + j) in its shard's packed
#                                 rows of the hidden state that scores the first response token.
PACK_KEYS = ("pack_order", "pack_index", "pack_response_start")
# Which axis of each layout array is split over the batch shards (None: replicated).
PACK_SHARD_AXIS = {"pack_order": None, "pack_index": 2, "pack_response_start": 1}
# A packed row is 1/8, 2/8, ..., 8/8 of algo.pack_tokens long: few shapes, little padding.
_PACK_LENGTH_STEPS = 8


def pack_lengths(pack_tokens: int) -> tuple[int, ...]:
    """The lengths a packed row may take: ceil(pack_tokens * k / 8) for k = 1..8."""
    return tuple(sorted({-(-pack_tokens * k // _PACK_LENGTH_STEPS) for k in range(1, _PACK_LENGTH_STEPS + 1)}))


def first_fit_decreasing(lengths_N: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, start) of each item packed into rows of `capacity`, and the rows used: longest item
    first (ties in input order), each into the first row with room. Empty items take no room."""
    row_N, start_N = np.zeros(len(lengths_N), np.int64), np.zeros(len(lengths_N), np.int64)
    used: list[int] = []
    for i in np.argsort(-np.asarray(lengths_N), kind="stable"):
        length = int(lengths_N[i])
        if length == 0:
            break  # the rest are empty too
        if length > capacity:
            raise ValueError(f"an item of {length} does not fit rows of {capacity}")
        row = next((r for r, filled in enumerate(used) if filled + length <= capacity), len(used))
        if row == len(used):
            used.append(0)
        row_N[i], start_N[i] = row, used[row]
        used[row] += length
    return row_N, start_N, len(used)


def micro_batch_slots(num_rows: int, num_micro_batches: int) -> np.ndarray:
    """[M, S]: the slots of micro-batch m (m = minibatch x micro-batches per minibatch + micro-batch),
    slot a being row a * M + m of the arranged batch: the update's strided split
    (`epo_jax.train.update`)."""
    return np.arange(num_rows).reshape(-1, num_micro_batches).T


def _shard_groups(orders_AxB: np.ndarray, num_micro_batches: int, shards: int) -> np.ndarray:
    """[A, M, G, S / G]: the batch rows each shard of each micro-batch holds, per arrangement."""
    slots_MxS = micro_batch_slots(orders_AxB.shape[1], num_micro_batches)
    return orders_AxB[:, slots_MxS].reshape(len(orders_AxB), num_micro_batches, shards, -1)


def pack_shape(seq_lens_B: np.ndarray, groups: np.ndarray, pack_tokens: int) -> tuple[int, int]:
    """(K, L): the fewest packed tokens K x L per shard and micro-batch (the shorter row on a tie)
    that hold every group of `groups` (rows of seq_lens_B, packed first-fit decreasing), with L
    from `pack_lengths` and K a power of two (or the group size, if smaller)."""
    group_lens = seq_lens_B[groups.reshape(-1, groups.shape[-1])]
    longest = int(group_lens.max(initial=0))
    if longest > pack_tokens:
        raise ValueError(f"a turn sample of {longest} tokens does not fit a packed row of algo.pack_tokens="
                         f"{pack_tokens}; raise algo.pack_tokens to at least {longest}")
    best = None
    for length in pack_lengths(pack_tokens):
        if length < longest:
            continue
        rows = max(max(first_fit_decreasing(g, length)[2] for g in group_lens), 1)
        rows = min(1 << (rows - 1).bit_length(), groups.shape[-1])
        if best is None or rows * length < best[0] * best[1]:
            best = (rows, length)
    return best


def pack_batch(prompt_lens_B: np.ndarray, seq_lens_B: np.ndarray, orders_AxB: np.ndarray, *,
               num_micro_batches: int, shards: int, pack_tokens: int, prompt_width: int,
               row_width: int) -> dict[str, np.ndarray]:
    """The packing layout (PACK_KEYS, see above) of a batch whose row b holds a sample with
    prompt_lens_B[b] real prompt tokens and seq_lens_B[b] real tokens in all, its prompt ending
    at column `prompt_width` of a `row_width`-column row (`build_batch`); padding rows have 0.

    orders_AxB: the arrangements, each a permutation of the rows. Every shard of every micro-batch
    of every arrangement packs its rows first-fit decreasing into the same shape (`pack_shape`).
    """
    groups = _shard_groups(orders_AxB, num_micro_batches, shards)
    rows, length = pack_shape(seq_lens_B, groups, pack_tokens)
    index = np.full((*groups.shape[:3], rows, length), -1, np.int32)
    response_start = np.zeros(orders_AxB.shape, np.int32)
    per_shard = groups.shape[-1]
    slots_MxS = micro_batch_slots(orders_AxB.shape[1], num_micro_batches)
    for a, m, g in np.ndindex(*groups.shape[:3]):
        members = groups[a, m, g]
        row_N, start_N, _ = first_fit_decreasing(seq_lens_B[members], length)
        for i, b in enumerate(members):
            n, p = int(seq_lens_B[b]), int(prompt_lens_B[b])
            if n == 0:
                continue
            row, start = int(row_N[i]), int(start_N[i])
            first_column = prompt_width - p  # where the sample's tokens begin in its padded row
            index[a, m, g, row, start:start + n] = i * row_width + first_column + np.arange(n)
            response_start[a, slots_MxS[m, g * per_shard + i]] = row * length + start + p - 1
    return {"pack_order": orders_AxB.astype(np.int32), "pack_index": index, "pack_response_start": response_start}


def sequence_lengths(batch: dict[str, np.ndarray], response_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(real prompt tokens, real tokens) of each row of a `build_batch` batch."""
    attention = batch["attention_mask"]
    return (attention[:, :attention.shape[1] - response_len].sum(1).astype(np.int64),
            attention.sum(1).astype(np.int64))
