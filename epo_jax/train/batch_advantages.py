"""Advantages and critic targets of one RL step, from the rollout batch (jitted).

Rewards (docs/algorithms.md section 1): every turn of an episode carries the episode reward (10 x won by
default) on its last response token, plus that turn's own format penalty (-0.1 for a reply
without <think>/<action>). PPO runs GAE within each turn sample on that reward. The group
methods (docs/algorithms.md section 3, "Group statistics") count, with `algo.group_count`:
  trajectory: each trajectory once, scored by its return (episode reward + all of its turns' penalties);
  turn:       every turn sample, scored by its own reward (episode reward + that turn's penalty), as verl-agent.
GiGPO's step level discounts the per-turn environment rewards (the episode reward at the final
turn) along the trajectory; `algo.gigpo_step_penalty` puts each turn's penalty into that
discounted sum ("discounted") or adds it to its own turn's return only ("own_turn", verl-agent).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from epo_jax import algo


def trajectory_returns(episode_reward_B: jax.Array, turn_penalty_B: jax.Array,
                       traj_id_B: jax.Array, valid_B: jax.Array) -> jax.Array:
    """Per row: its trajectory's return = episode reward + the sum of the trajectory's penalties."""
    same_traj_BxB = (traj_id_B[:, None] == traj_id_B[None, :]) & valid_B[None, :]
    penalties_B = jnp.sum(jnp.where(same_traj_BxB, turn_penalty_B[None, :], 0.0), axis=1)
    return jnp.where(valid_B, episode_reward_B + penalties_B, 0.0)


def make_advantage_fn(config):
    """advantages(batch, old_values_BxR | None) -> {"advantages"[, "returns"]}, each [B, R]."""
    method = config.algo.advantage
    whiten = bool(config.algo.whiten_advantages)
    per_trajectory = config.algo.group_count == "trajectory"
    penalty_own_turn = config.algo.gigpo_step_penalty == "own_turn"

    def advantages(batch, old_values_BxR=None):
        mask_BxR, valid_B = batch["response_mask"], batch["valid"]
        turn_reward_B = batch["episode_reward"] + batch["turn_penalty"]
        if method == "ppo_gae":
            rewards_BxR = algo.place_reward_on_last_token(turn_reward_B, mask_BxR)
            adv_BxR, returns_BxR = algo.gae_advantages(
                rewards_BxR, old_values_BxR, mask_BxR, gamma=config.algo.gamma,
                lam=config.algo.gae_lambda)
            if whiten:
                adv_BxR = algo.whiten_advantages(adv_BxR, mask_BxR)
            return {"advantages": adv_BxR, "returns": returns_BxR}
        group_B, traj_B = batch["group_id"], batch["traj_id"]
        if per_trajectory:
            scores_B = trajectory_returns(batch["episode_reward"], batch["turn_penalty"], traj_B, valid_B)
        else:
            scores_B = jnp.where(valid_B, turn_reward_B, 0.0)
        members_traj_B = traj_B if per_trajectory else None
        if method in ("grpo", "drgrpo"):
            adv_B = algo.grpo_advantages(scores_B, group_B, traj_id_N=members_traj_B, valid_N=valid_B,
                                         normalize_by_std=method == "grpo")
        elif method == "rloo":
            adv_B = algo.rloo_advantages(scores_B, group_B, traj_id_N=members_traj_B, valid_N=valid_B)
        else:  # gigpo
            final_reward_B = jnp.where(batch["last_turn"], batch["episode_reward"], 0.0)
            discounted_B = final_reward_B + (0.0 if penalty_own_turn else batch["turn_penalty"])
            adv_B = algo.gigpo_advantages(
                scores_B, discounted_B, group_B, traj_B, batch["turn_index"], batch["anchor_id"],
                omega=config.algo.gigpo_omega, gamma=config.algo.gigpo_gamma, valid_N=valid_B,
                normalize_by_std=config.algo.gigpo_mode == "mean_std_norm",
                group_count=config.algo.group_count,
                own_turn_rewards_N=batch["turn_penalty"] if penalty_own_turn else None)
        return {"advantages": algo.expand_to_tokens(adv_B, mask_BxR)}

    return advantages
