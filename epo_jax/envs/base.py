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

Replays: an engine whose episode is a pure function of (task, variation, actions) sets
`deterministic = True`; `replay()` then rebuilds any state of an episode by resetting and
playing its actions again, and checks every answer against the original's (branching
rollouts fork episodes this way). Replaying on any other engine raises ReplayError.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

INFO_KEYS = ("won", "score", "task", "variation", "task_description", "admissible_actions")


class EpisodeSpec(NamedTuple):
    """One episode of a split: an engine task and one of its variations (or game index)."""

    task: str
    variation: int


class EnvCrashed(RuntimeError):
    """The engine process died or hung; the pool restarts it and truncates the episode."""


# EPO's split names and the aliases the engines' own code uses for them.
EPO_SPLIT_ALIASES = {"dev": "iid", "test": "ood"}


def canonical_split(split: str, splits: Sequence[str], engine: str) -> str:
    """`split` with the aliases of EPO_SPLIT_ALIASES resolved; a ValueError naming `engine`'s
    splits when it is none of them."""
    canonical = EPO_SPLIT_ALIASES.get(split, split)
    if canonical not in splits:
        raise ValueError(f"split={split!r} is not a {engine} split; use one of {tuple(splits)} "
                         f"(or the aliases {sorted(EPO_SPLIT_ALIASES)}).")
    return canonical


class ReplayError(RuntimeError):
    """An episode could not be reproduced by replaying its actions: the engine is not
    deterministic, or its answers differed from the recorded ones."""


# What one replayed point of an episode must show: (observation, info["score"]).
ReplayCheck = tuple[str, float]


class TextEnv(abc.ABC):
    """One episode-at-a-time text environment."""

    # True when an episode is fully determined by (task, variation) and the actions played,
    # so that `replay()` reproduces it; an engine claims it only once replays of its real
    # episodes are tested to match (tests/rollout/test_branching.py).
    deterministic: bool = False

    @abc.abstractmethod
    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        """Starts an episode (of the given task and variation when named); returns (obs, info)."""

    @abc.abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Applies one action text; returns (obs, reward, done, info)."""

    def replay(self, task: str, variation: int, actions: Sequence[str],
               expected: Sequence[ReplayCheck] | None = None) -> tuple[str, dict[str, Any]]:
        """Resets to (task, variation), plays `actions` and returns the last (obs, info).

        `expected` holds the original episode's (observation, score) after the reset and after
        each action (len(actions) + 1 entries); any difference, or an episode that ends within
        the replayed actions, raises ReplayError naming the step, since a branch built on a
        different state would silently train on the wrong history.
        """
        if not self.deterministic:
            raise ReplayError(
                f"{type(self).__name__} does not declare deterministic episodes "
                "(TextEnv.deterministic is False), so an episode cannot be rebuilt by replaying "
                "its actions; turn rollout branching off for this environment")
        if expected is not None and len(expected) != len(actions) + 1:
            raise ValueError(f"expected holds {len(expected)} checks for {len(actions)} actions; "
                             "give one for the reset and one per action")
        observation, info = self.reset(task, variation)
        self._check_replay(task, variation, 0, None, observation, info, expected)
        for step, action in enumerate(actions, start=1):
            observation, _, done, info = self.step(action)
            if done:
                raise ReplayError(f"replay of {task!r} variation {variation}: the episode ended at "
                                  f"step {step} ({action!r:.100}), which the original survived; "
                                  "the engine is not deterministic")
            self._check_replay(task, variation, step, action, observation, info, expected)
        return observation, info

    @staticmethod
    def _check_replay(task, variation, step, action, observation, info, expected) -> None:
        if expected is None:
            return
        want_observation, want_score = expected[step]
        score = float(info.get("score", 0.0) or 0.0)
        if observation != want_observation or score != float(want_score):
            where = "the reset" if step == 0 else f"step {step} ({action!r:.100})"
            raise ReplayError(
                f"replay of {task!r} variation {variation} diverged at {where}: expected score "
                f"{float(want_score):g} and observation {want_observation!r:.300}, got score "
                f"{score:g} and observation {observation!r:.300}; the engine is not deterministic")

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
