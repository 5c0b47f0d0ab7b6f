"""How a run's groups, ids and statistics split over the processes of a pod (one process: trivially).

Process h plays groups [h G/P, (h+1) G/P) of every RL step on its own environment pool. The
trajectory and group ids of its episodes are made global where they are created (the offsets
below), and the padding rows of its share of the update batch get ids past every real one, so
no group or trajectory ever mixes two hosts' rows.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from epo_jax.rollout import agent_loop
from epo_jax.rollout.samples import Episode

# Padding rows of the update batch are numbered from here (real ids stay far below).
PADDING_ID_START = 1_000_000


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """This process's share of the run: its groups, environments and id ranges."""

    num_processes: int
    process: int
    local_groups: int  # groups this process plays per RL step
    group_size: int

    @classmethod
    def from_config(cls, config) -> ProcessLayout:
        num_processes, process = jax.process_count(), jax.process_index()
        if config.env.num_groups % num_processes:
            raise ValueError(f"env.num_groups={config.env.num_groups} must be a multiple of the number of "
                             f"processes ({num_processes}): each process plays the same number of groups")
        return cls(num_processes, process, config.env.num_groups // num_processes, config.env.group_size)

    @property
    def num_envs(self) -> int:
        """This process's environments."""
        return self.local_groups * self.group_size

    @property
    def is_main(self) -> bool:
        return self.process == 0

    def groups(self) -> range:
        """The indices of this process's groups among the step's num_groups."""
        return range(self.process * self.local_groups, (self.process + 1) * self.local_groups)

    @property
    def traj_id_offset(self) -> int:
        return self.process * self.num_envs

    @property
    def group_id_offset(self) -> int:
        return self.process * self.local_groups

    def padding_id_start(self, local_rows: int) -> int:
        return PADDING_ID_START + self.process * local_rows

    def key(self, key: jax.Array) -> jax.Array:
        """This process's share of a key: processes sample their own environments independently."""
        return key if self.num_processes == 1 else jax.random.fold_in(key, self.process)


def allgather(values: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's `values` (same shape on all), in process order."""
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this process (np.asarray refuses arrays spanning other hosts)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


_EPISODE_FIELDS = ("won", "score", "reward", "num_turns", "invalid_turns", "truncated", "crashed")


def gather_episodes(episodes: list[Episode], capacity: int, tasks: list[str]) -> list[Episode]:
    """All processes' episodes (each process passes at most `capacity`), in process order; one
    process returns its own list unchanged. Task names travel as indices into `tasks`."""
    if jax.process_count() == 1:
        return episodes
    rows = np.zeros((capacity, len(_EPISODE_FIELDS) + 3), np.float64)  # + present, task, variation
    for i, e in enumerate(episodes):
        rows[i] = [float(getattr(e, f)) for f in _EPISODE_FIELDS] + [1.0, tasks.index(e.task), e.variation]
    gathered = allgather(rows).reshape(-1, rows.shape[1])
    out = []
    for row in gathered[gathered[:, -3] > 0]:
        values = dict(zip(_EPISODE_FIELDS, row))
        out.append(Episode(traj_id=len(out), group_id=len(out), task=tasks[int(row[-2])], variation=int(row[-1]),
                           won=bool(values["won"]), score=values["score"], reward=values["reward"],
                           num_turns=int(values["num_turns"]), invalid_turns=int(values["invalid_turns"]),
                           truncated=bool(values["truncated"]), crashed=bool(values["crashed"])))
    return out


def combine_rollout_stats(stats: dict[str, float]) -> dict[str, float]:
    """The processes' rollout statistics as one run's: token and prompt counts add up, turn counts
    and times take the slowest process (the step waits for it), per-group means of the branching
    statistics average (every process plays the same number of groups), throughput and the idle-row
    fraction are recomputed."""
    if jax.process_count() == 1:
        return stats
    keys = sorted(stats)
    key_sets = allgather(np.asarray([zlib.crc32("|".join(keys).encode())], np.int64))
    if len(set(key_sets.ravel().tolist())) > 1:
        raise RuntimeError("processes report different rollout statistics; they must run the same config")
    values = allgather(np.asarray([stats[k] for k in keys], np.float64))
    out = {}
    for i, key in enumerate(keys):
        if key.startswith("branching/"):
            out[key] = float(values[:, i].mean())
        elif key.startswith("rollout/") and key != "rollout/turns":
            out[key] = float(values[:, i].sum())
        else:
            out[key] = float(values[:, i].max())
    if "rollout/new_tokens" in out and "time/generate_s" in out:
        out["throughput/rollout_tokens_per_s"] = out["rollout/new_tokens"] / max(out["time/generate_s"], 1e-9)
    if "rollout/decode_row_steps" in out:
        out["rollout/idle_row_fraction"] = agent_loop.idle_row_fraction(out)
    return out


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(allgather(np.array([flag], np.int32))))
