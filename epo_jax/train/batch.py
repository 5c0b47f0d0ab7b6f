"""Turn samples -> padded training arrays, in a few bucket shapes so the update compiles rarely.

Row layout: [left-padded prompt (P) | right-padded response (R)], P from the prompt buckets and R
the configured response length. Rows are padded to a multiple of the update's row count with
all-masked rows, which count in no loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from epo_jax.models.sampler import bucket
from epo_jax.rollout.samples import TurnSample


def build_batch(samples: Sequence[TurnSample], *, prompt_buckets: Sequence[int], response_len: int,
                row_multiple: int, pad_id: int, rows: int | None = None, prompt_len: int | None = None,
                padding_id_start: int = 1_000_000) -> dict[str, np.ndarray]:
    """Stacks samples into arrays; `row_multiple` is the number of rows one update consumes at once.

    `rows` and `prompt_len` fix the shape instead (every process of a multi-host run must hand the
    same shape to the update: they agree on the largest); `padding_id_start` numbers the padding
    rows' trajectory and group ids, distinct across processes so that no padding row joins another.
    """
    if not samples and rows is None:
        raise ValueError("build_batch needs at least one turn sample (or a fixed `rows`)")
    longest = max((len(s.prompt_ids) for s in samples), default=1)
    if prompt_len is None:
        prompt_len = bucket(longest, prompt_buckets)
    elif prompt_len < longest:
        raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({longest} tokens)")
    if rows is None:
        rows = -(-len(samples) // row_multiple) * row_multiple
    elif rows < len(samples):
        raise ValueError(f"rows={rows} cannot hold {len(samples)} samples")
    tokens = np.full((rows, prompt_len + response_len), pad_id, np.int32)
    attention = np.zeros((rows, prompt_len + response_len), bool)
    response_mask = np.zeros((rows, response_len), np.float32)
    old_logprobs = np.zeros((rows, response_len), np.float32)
    rollout_entropy = np.zeros((rows, response_len), np.float32)
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
        rollout_entropy[i, :r] = s.response_entropy[:r]
        ints["turn_index"][i], ints["traj_id"][i] = s.turn_index, s.traj_id
        ints["group_id"][i], ints["anchor_id"][i] = s.group_id, s.anchor_id
        floats["episode_reward"][i], floats["turn_penalty"][i] = s.episode_reward, s.penalty
        last_turn[i], valid[i] = s.last_turn, True
    return dict(tokens=tokens, attention_mask=attention, response_mask=response_mask,
                old_logprobs=old_logprobs, rollout_entropy=rollout_entropy, last_turn=last_turn,
                valid=valid, **floats, **ints)
