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
