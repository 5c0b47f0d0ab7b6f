"""Fixed evaluation panels: which (task, variation) episodes an evaluation plays.

    specs = panels.panel("scienceworld", "iid", 48)       # the same 48 episodes everywhere
    share = panels.process_share(specs, process, num_processes)
    for wave in panels.waves(share, pool_size): ...

A panel is a pure function of (benchmark, split, size, task filter, the split's episode list).
It does not depend on the seed, the method, the number of processes, the pool size or the order
in which the engine lists its episodes, so every run of every method and seed that asks for the
same size evaluates exactly the same episodes, and the list can be printed, published and
checked (`python -m epo_jax.envs.panels scienceworld 48`; docs/panels/ holds the ScienceWorld and
toy corridor panels of the sizes the configs use). The trainer writes the panels it
evaluates into the run's work directory as `eval_panel.json`.

The rule (version PANEL_RULE):
  1. Strata: the split's episodes are grouped by task: the ScienceWorld task or the corridor
     length (toy_keydoor); for ALFWorld, whose episodes are games, the task type
     ("pick_and_place_simple", ... taken from the game's folder name).
  2. Within a stratum, episodes are ordered by the SHA-256 hex digest of their identity string:
     "<task>/<variation>" for ScienceWorld and toy_keydoor; for ALFWorld the game id alone
     (e.g. "valid_seen/pick_and_place_simple-Mug-None-Cabinet-12/trial_T2019..."), because its
     variation is a position in the split's listing, which moves when games are added or removed.
  3. The panel takes episodes round-robin over the strata in alphabetical order, the next one of
     each stratum in digest order, skipping exhausted strata, until `size` are taken. Every task
     gets floor(size / tasks) or one more episode (while it has them); the first tasks
     alphabetically get the extra ones.
  4. A size of -1, or any size at least the split's length, is the whole split.

Panels are nested: the panel of size n is the first n episodes of any larger one.

Splits: ScienceWorld "iid" is its dev variations of tasks 0-28, "ood" its test variations (EPO's
protocol; epo_jax/envs/scienceworld.py); ALFWorld "iid" / "ood" are valid_seen / valid_unseen
(the panel depends on the game set: the official games and the generated ones give different
lists); toy_keydoor has its own splits (epo_jax/envs/toy_keydoor.py). Split aliases ("dev",
"valid_seen", ...) give the same panel as the canonical names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from epo_jax.envs.base import EpisodeSpec

PANEL_RULE = "stratified-by-task/sha256-order/round-robin/v1"
# The rule in one sentence, for reports.
RULE_SUMMARY = ("the split's episodes are grouped by task (ALFWorld: by task type) and taken round-robin over "
                "the tasks in alphabetical order, each task's episodes in the order of the SHA-256 digest of "
                "'<task>/<variation>' (ALFWorld: of the game id); the list depends on nothing but the benchmark, "
                "the split, the size and the task filter (not on seed, method, process count, pool size or the "
                "order the engine lists its episodes), and a smaller panel is the start of a larger one")
PANEL_FILE = "eval_panel.json"
ALL = -1  # the size that selects the whole split


def alfworld_task_type(game_id: str) -> str:
    """The task type of an ALFWorld game id "<split>/<task type>-<objects...>/<trial>"."""
    return game_id.split("/")[-2].split("-")[0]


def stratum(env_name: str, task: str) -> str:
    """The stratum (task, or ALFWorld task type) an episode's task belongs to."""
    return alfworld_task_type(task) if env_name == "alfworld" else task


def identity(env_name: str, spec: EpisodeSpec) -> str:
    """The string an episode is ordered by: stable across engines' listings and machines."""
    return spec.task if env_name == "alfworld" else f"{spec.task}/{spec.variation}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def select(env_name: str, specs: Sequence[EpisodeSpec], size: int) -> list[EpisodeSpec]:
    """The panel of `size` episodes (ALL or >= len: every episode) out of a split's `specs`."""
    if isinstance(size, bool) or not isinstance(size, int) or (size < 0 and size != ALL):
        raise ValueError(f"panel size={size!r} must be a non-negative integer, or {ALL} for the whole split "
                         "(config field eval.num_episodes)")
    strata: dict[str, list[EpisodeSpec]] = {}
    for spec in specs:
        strata.setdefault(stratum(env_name, spec.task), []).append(EpisodeSpec(spec.task, int(spec.variation)))
    queues = [sorted(strata[name], key=lambda s: _digest(identity(env_name, s))) for name in sorted(strata)]
    target = len(specs) if size == ALL else min(size, len(specs))
    panel: list[EpisodeSpec] = []
    depth = 0
    while len(panel) < target:
        for queue in queues:
            if depth < len(queue) and len(panel) < target:
                panel.append(queue[depth])
        depth += 1
    return panel


def panel(env_name: str, split: str, size: int, **split_options: Any) -> list[EpisodeSpec]:
    """The evaluation panel of a benchmark's split (`split_options`: tasks, ALFWorld's data_dir)."""
    from epo_jax import envs  # the engine modules load only when a panel is asked for

    return select(env_name, envs.episodes(env_name, split, **split_options), size)


def process_share(specs: Sequence[EpisodeSpec], process: int, num_processes: int) -> list[EpisodeSpec]:
    """The episodes one process of `num_processes` plays: every num_processes-th, from `process`.
    The shares of all processes partition the panel."""
    if not 0 <= process < num_processes:
        raise ValueError(f"process {process} is not one of 0..{num_processes - 1}")
    return list(specs[process::num_processes])


def waves(specs: Sequence[EpisodeSpec], pool_size: int) -> Iterator[list[EpisodeSpec]]:
    """`specs` in consecutive chunks of at most `pool_size` (one chunk per pool reset)."""
    if pool_size < 1:
        raise ValueError(f"pool_size={pool_size} must be at least 1")
    for start in range(0, len(specs), pool_size):
        yield list(specs[start:start + pool_size])


def digest(specs: Sequence[EpisodeSpec]) -> str:
    """A short fingerprint of a panel (its episodes in order), to compare runs' panels at a glance."""
    return _digest(json.dumps([[s.task, int(s.variation)] for s in specs]))[:16]


def to_json(env_name: str, size: int, panels: Mapping[str, Sequence[EpisodeSpec]], **split_options: Any) -> str:
    """The `eval_panel.json` text of a run: the rule, the size and each split's episodes."""
    options = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in split_options.items()}
    record = {"rule": PANEL_RULE, "env": env_name, "size": size, "split_options": options,
              "splits": {split: {"digest": digest(specs), "episodes": [[s.task, int(s.variation)] for s in specs]}
                         for split, specs in panels.items()}}
    # One episode per line: the file is read (and diffed) by people as much as by programs.
    return re.sub(r'\[\s+("(?:[^"\\]|\\.)*"),\s+(-?\d+)\s+\]', r"[\1, \2]", json.dumps(record, indent=1)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print evaluation panels: 'split task variation' per line, "
                                                 "or the eval_panel.json record a run writes.")
    parser.add_argument("env", help="scienceworld | alfworld | toy_keydoor")
    parser.add_argument("size", type=int, help=f"episodes per split ({ALL}: the whole split)")
    parser.add_argument("--splits", nargs="+", default=["iid", "ood"], help="splits (default: iid ood)")
    parser.add_argument("--tasks", nargs="*", default=(), help="restrict to these tasks (ALFWorld: task types)")
    parser.add_argument("--data-dir", default="", help="ALFWorld: the folder holding json_2.1.1")
    parser.add_argument("--json", action="store_true", help="print the eval_panel.json record instead")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"tasks": tuple(args.tasks)} if args.tasks else {}
    if args.data_dir:
        options["data_dir"] = args.data_dir
    chosen = {split: panel(args.env, split, args.size, **options) for split in args.splits}
    if args.json:
        print(to_json(args.env, args.size, chosen, **options), end="")
    else:
        print("\n".join(f"{split} {s.task} {s.variation}" for split, specs in chosen.items() for s in specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
