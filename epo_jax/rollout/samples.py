"""What a rollout produces: one `TurnSample` per generated turn and one `Episode` per episode.

Token-in, token-out: a sample holds the exact prompt ids fed to the sampler and the exact ids it
generated (with their log-probabilities and entropies), so training never re-tokenises text.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class TurnSample:
    prompt_ids: np.ndarray         # int32 [P_i], the prompt as fed to the sampler
    response_ids: np.ndarray       # int32 [R_i], the generated tokens (stop token included)
    response_logprobs: np.ndarray  # float32 [R_i], log pi_old(token) at the rollout temperature
    response_entropy: np.ndarray   # float32 [R_i], entropy of the sampling distribution
    traj_id: int                   # the episode's id, unique within the RL step across processes
    group_id: int                  # episodes of one group play the same task and variation (unique id)
    turn_index: int                # 0-based turn within the episode
    anchor_id: int                 # hash of the observation the turn acted on (GiGPO step groups)
    valid_format: bool             # the reply had <think> and <action> (else the turn is penalised)
    penalty: float = 0.0           # the format penalty of this turn (<= 0)
    episode_reward: float = 0.0    # set when the episode ends
    last_turn: bool = False        # the episode's final turn


@dataclasses.dataclass
class Episode:
    traj_id: int
    group_id: int
    task: str
    variation: int
    won: bool = False
    score: float = 0.0             # engine score (ScienceWorld 0..100; ALFWorld 0/1)
    reward: float = 0.0            # the episode reward (success_reward * won, or summed dense reward)
    num_turns: int = 0
    invalid_turns: int = 0
    truncated: bool = False        # hit the turn limit
    crashed: bool = False          # the engine died or hung: excluded from training and success rates
    parent: int = -1               # branching rollouts: traj_id of the episode this one forked from
    branch_turn: int = 0           # turns shared with (copied from) the parent; 0 for a fresh episode
