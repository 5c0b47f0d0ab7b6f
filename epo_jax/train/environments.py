"""The run's environments: engine options, the train split's order, and pools."""
from __future__ import annotations

from typing import Any

import numpy as np

from epo_jax import envs


def split_options(config) -> dict[str, Any]:
    """What `envs.episodes` needs besides the split: the task filter and ALFWorld's data."""
    options: dict[str, Any] = {"tasks": tuple(config.env.tasks)} if config.env.tasks else {}
    if config.env.name == "alfworld" and config.env.data_dir:
        options["data_dir"] = config.env.data_dir
    return options


def env_options(config) -> dict[str, Any]:
    """The engine options of a run's environments (`envs.make_pool`)."""
    options: dict[str, Any] = {"reward": config.env.reward,
                               "success_reward": float(config.env.success_reward)}
    if config.env.name == "scienceworld":
        # EPO shows ScienceWorld's action templates and objects (the ~3k valid combinations
        # would not fit a prompt); ALFWorld's admissible commands are few and cheap.
        # Constant JVM identity hashes make an episode replayable (branching needs that) at
        # ~15-20% more time per step, so they are only paid for when branches replay episodes.
        options.update(simplification=config.env.simplification, jvm_heap=config.env.jvm_heap,
                       available_actions=bool(config.env.show_actions),
                       deterministic=bool(config.rollout.branching))
    else:
        options["admissible"] = bool(config.env.show_actions)
        if config.env.data_dir:
            options["data_dir"] = config.env.data_dir
    return options


def make_pool(config, num_envs: int, *, group_size: int, seed: int) -> envs.EnvPool:
    return envs.make_pool(config.env.name, num_envs, group_size=group_size,
                          max_turns=config.env.max_turns, step_timeout_s=config.env.step_timeout_s,
                          seed=seed, **env_options(config))


def train_specs(config) -> list[envs.EpisodeSpec]:
    """The train split in a seed-determined order (the run's cursor walks it, wrapping around)."""
    specs = envs.episodes(config.env.name, config.env.train_split, **split_options(config))
    if not specs:
        raise ValueError(f"env.train_split={config.env.train_split!r} with env.tasks={tuple(config.env.tasks)} "
                         "has no episodes; check the task names")
    order = np.random.default_rng(config.seed).permutation(len(specs))
    return [specs[i] for i in order]
