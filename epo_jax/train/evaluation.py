"""Evaluation: success rate and score on the IID and OOD splits at the eval temperature, and the
episode metrics the training steps report too."""
from __future__ import annotations

import zlib
from typing import Sequence

import jax
import numpy as np
from etils import epath

from epo_jax import envs
from epo_jax.envs import panels
from epo_jax.rollout import agent_loop
from epo_jax.rollout.samples import Episode
from epo_jax.train import environments, processes


def episode_metrics(prefix: str, episodes: Sequence[Episode]) -> dict[str, float]:
    """Counts, success, reward, score, turns and the share of turns without the reply format,
    over the episodes whose engine did not crash."""
    finished = [e for e in episodes if not e.crashed]
    out = {f"{prefix}episodes": float(len(finished)),
           f"{prefix}crashed_episodes": float(len(episodes) - len(finished))}
    if finished:
        out[f"{prefix}success_rate"] = float(np.mean([e.won for e in finished]))
        out[f"{prefix}reward_mean"] = float(np.mean([e.reward for e in finished]))
        out[f"{prefix}score_mean"] = float(np.mean([e.score for e in finished]))
        out[f"{prefix}turns_mean"] = float(np.mean([e.num_turns for e in finished]))
        invalid = float(np.sum([e.invalid_turns for e in finished]) / max(1, np.sum([e.num_turns for e in finished])))
        out[f"{prefix}invalid_turn_rate"] = invalid
        out[f"{prefix}valid_turn_rate"] = 1.0 - invalid
    return out


def eval_specs(config, split: str) -> list[envs.EpisodeSpec]:
    """The split's evaluation panel (epo_jax/envs/panels.py): the same episodes for every seed,
    method, process count and pool size."""
    return panels.panel(config.env.name, split, config.eval.num_episodes, **environments.split_options(config))


def eval_panels(config) -> dict[str, list[envs.EpisodeSpec]]:
    """Every eval split's panel ({} when the run does not evaluate)."""
    if not config.eval.every_steps:
        return {}
    return {split: eval_specs(config, split) for split in config.env.eval_splits}


def write_panels(config, workdir: str, panels_by_split: dict[str, list[envs.EpisodeSpec]]) -> None:
    """The run's panels as `eval_panel.json` in its work directory (for `epo_jax.report`)."""
    if panels_by_split:
        (epath.Path(workdir) / panels.PANEL_FILE).write_text(panels.to_json(
            config.env.name, config.eval.num_episodes, panels_by_split, **environments.split_options(config)))


def evaluate(config, policy_params, make_policy, tokenizer, rng, pool, layout: processes.ProcessLayout
             ) -> dict[str, float]:
    """Success rate and score on each eval split at the eval temperature, one episode per spec,
    played in waves of `pool`'s size (a pool of groups of one); each process plays its share.
    Episode i of a process's share has trajectory id i in every wave layout, so its replies
    (reply_key of the split's key, i and the turn) do not depend on the pool's size."""
    out: dict[str, float] = {}
    policy = make_policy(policy_params, temperature=config.eval.temperature)
    rng = layout.key(rng)
    for split in config.env.eval_splits:
        all_specs = eval_specs(config, split)
        specs = panels.process_share(all_specs, layout.process, layout.num_processes)
        episodes = []
        for wave, chunk in enumerate(panels.waves(specs, pool.num_groups)):
            padded = chunk + [chunk[0]] * (pool.num_groups - len(chunk))  # extras are dropped
            rollout = agent_loop.run_episodes(
                pool, policy, tokenizer, padded, jax.random.fold_in(rng, zlib.crc32(split.encode())),
                config=config, traj_id_offset=wave * pool.num_groups)
            episodes.extend(rollout.episodes[:len(chunk)])
        episodes = processes.gather_episodes(episodes, -(-len(all_specs) // layout.num_processes),
                                             sorted({s.task for s in all_specs}))
        out.update(episode_metrics(f"eval/{split}/", episodes))
        for task in sorted({e.task for e in episodes}):
            finished = [e for e in episodes if e.task == task and not e.crashed]
            if finished:
                out[f"eval/{split}/success_rate/{task}"] = float(np.mean([e.won for e in finished]))
                out[f"eval/{split}/score/{task}"] = float(np.mean([e.score for e in finished]))
    return out
