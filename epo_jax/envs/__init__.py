"""Text environments (ScienceWorld, ALFWorld, a toy corridor) behind one protocol, and a batched pool.

    env = epo_jax.envs.make("scienceworld", task="boil", variation=0)
    specs = epo_jax.envs.episodes("scienceworld", "iid")
    pool = epo_jax.envs.make_pool("scienceworld", num_envs=16, group_size=8)

Engine modules are imported only when first used, so importing this package starts
no engine and needs neither ScienceWorld nor ALFWorld to be importable.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from epo_jax.envs.base import INFO_KEYS, EnvCrashed, EpisodeSpec, ReplayError, TextEnv
from epo_jax.envs.pool import EnvPool, Replay, ResetResult, StepResult, SubprocessEnv

# name -> (module, environment class, pool backend the engine needs)
_REGISTRY = {
    "scienceworld": ("epo_jax.envs.scienceworld", "ScienceWorldEnv", "thread"),
    "alfworld": ("epo_jax.envs.alfworld", "AlfWorldEnv", "process"),
    # A toy corridor for miniature end-to-end runs (pure Python, microseconds per step).
    "toy_keydoor": ("epo_jax.envs.toy_keydoor", "ToyKeyDoorEnv", "thread"),
}
ENV_NAMES = tuple(_REGISTRY)

__all__ = [
    "ENV_NAMES", "INFO_KEYS", "EnvCrashed", "EnvPool", "EpisodeSpec", "Replay", "ReplayError",
    "ResetResult", "StepResult", "SubprocessEnv", "TextEnv", "default_backend", "episodes",
    "make", "make_pool",
]


def _entry(name: str) -> tuple[str, str, str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; known environments: {ENV_NAMES}.")
    return _REGISTRY[name]


def make(name: str, **options: Any) -> TextEnv:
    """Builds one environment by name ("scienceworld" | "alfworld" | "toy_keydoor") with its options."""
    module_name, class_name, _ = _entry(name)
    return getattr(importlib.import_module(module_name), class_name)(**options)


def episodes(name: str, split: str, **options: Any) -> list[EpisodeSpec]:
    """Lists the episodes of a split, via the engine module's `episodes(split, **options)`."""
    module_name, _, _ = _entry(name)
    return importlib.import_module(module_name).episodes(split, **options)


def default_backend(name: str) -> str:
    """The pool backend an engine needs: "thread" (ScienceWorld, toy_keydoor) or "process" (ALFWorld)."""
    return _entry(name)[2]


def make_pool(name: str, num_envs: int, *, group_size: int = 1, backend: str | None = None,
              seed: int = 0, max_turns: int = 30, step_timeout_s: float = 60.0,
              start_timeout_s: float = 600.0, **options: Any) -> EnvPool:
    """An EnvPool of `num_envs` environments `make(name, **options)`.

    backend None picks the engine's default (see `default_backend`).
    """
    _entry(name)
    return EnvPool(functools.partial(make, name, **options), num_envs, group_size=group_size,
                   backend=backend or default_backend(name), seed=seed, max_turns=max_turns,
                   step_timeout_s=step_timeout_s, start_timeout_s=start_timeout_s)
