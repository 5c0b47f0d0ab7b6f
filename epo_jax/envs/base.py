"""The text-environment protocol every engine implements.

An environment runs one episode at a time on one engine instance. It knows nothing about
policies or losses: it takes action *text* and returns observation *text*.

    env = epo_jax.envs.make("scienceworld", task="boil", variation=0)
    obs, info = env.reset()
    obs, reward, done, info = env.step("look around")
    env.close()

`info` always holds the keys in INFO_KEYS (engines may add more):
    won (bool), score (float, engine units), task (str), variation (int),
    task_description (str), admissible_actions (list[str] | None; filled only when the
    environment was created with `admissible=True`, since computing them is expensive
    for ScienceWorld).

Every engine module (`epo_jax/envs/<name>.py`) also exposes a module-level
`episodes(split, **options) -> list[EpisodeSpec]` listing the episodes of a split, so
that `epo_jax.envs.episodes(name, split)` can dispatch to it.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple

INFO_KEYS = ("won", "score", "task", "variation", "task_description", "admissible_actions")


class EpisodeSpec(NamedTuple):
    """One episode of a split: an engine task and one of its variations (or game index)."""

    task: str
    variation: int


class EnvCrashed(RuntimeError):
    """The engine process died or hung; the pool restarts it and truncates the episode."""


class TextEnv(abc.ABC):
    """One episode-at-a-time text environment."""

    @abc.abstractmethod
    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode (of the given task and variation when named); returns (obs, info)."""

    @abc.abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Applies one action text; returns (obs, reward, done, info)."""

    def close(self) -> None:
        """Releases the engine (processes, files)."""

    def seed(self, seed: int) -> None:
        """Seeds the engine's own randomness.

        The pool calls it with a distinct seed per environment after creating (or
        restarting) it. Engines whose episodes are fully determined by (task, variation)
        keep this default, which has nothing to seed.
        """

    def kill(self) -> None:
        """Ends the engine at once; may be called from any thread while a step hangs.

        Engines that run in their own process override it to kill that process, which
        also unblocks the hung call. The default falls back to `close()`.
        """
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
