"""A toy key-and-door corridor: a small, fast, procedurally generated multi-turn text world.

Not a benchmark of its own: it exists so that the whole training stack (sampler, agent loop,
losses, trainer) can be exercised on a sparse-reward, long-horizon task in minutes on a CPU
(`bench/reproduce_mini.py`).

The world. A corridor of n rooms runs from west to east. At one end (east or west) a locked
door leads to the goal room. A key lies in one of the rooms and the agent starts in another.
To win the agent walks to the key, takes it, walks to the door's end of the corridor, opens
the door and goes through it; the reward comes only then. Every variation is placed so that
the shortest solution takes at least `MIN_OPTIMAL_TURNS` (10) turns.

    env = epo_jax.envs.make("toy_keydoor", task="corridor-6", variation=3)
    obs, info = env.reset()
    obs, reward, done, info = env.step("go east")

Commands (case and extra spaces do not matter): "go east", "go west", "go north",
"go south" (the four directions also alone: "east"), "take key", "open door", "look",
"wait". North and south are walls. Text that is no command does nothing ("Nothing
happens."); neither does a command that cannot apply (taking a key that is not there).

Observations are short and describe the whole state the agent needs, so the task is
solvable without memory of earlier turns: where the key is relative to the agent (here,
east, west, or carried), the door's direction once the key is carried, and the door's state
(locked or open) when the agent stands next to it. The task description names the door's
side too. Texts are terse so that prompts stay near 50 tokens.

Tasks and splits. A task is a corridor length, "corridor-<n>"; a variation is a seed that
fixes the door's side, the key's room and the start room, deterministically
(crc32 of "<task>/<variation>"):
  - "train": corridors of 5, 6 and 7 rooms, variations 0-199 of each (600 episodes);
  - "iid" (alias "dev"): the same tasks, variations 200-249 (150 episodes); the layouts of
    5-7 rooms are few (about 40 reach 10 turns), so most IID layouts also occur in training;
  - "ood" (alias "test"): longer corridors, 8 and 9 rooms, variations 0-49 (100 episodes),
    whose solutions take up to 18 turns.

Rewards: "sparse" gives `success_reward` on the winning step and 0 elsewhere; "dense" gives
the change of the progress score (info["score"]: 0, 30 with the key, 60 with the door open,
100 at the goal). Episodes end only by winning (the pool truncates them at its turn limit).
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from epo_jax.envs.base import EpisodeSpec, TextEnv, canonical_split

MIN_OPTIMAL_TURNS = 10
TRAIN_LENGTHS = (5, 6, 7)
OOD_LENGTHS = (8, 9)
TRAIN_TASKS = tuple(f"corridor-{n}" for n in TRAIN_LENGTHS)
OOD_TASKS = tuple(f"corridor-{n}" for n in OOD_LENGTHS)
TASK_NAMES = TRAIN_TASKS + OOD_TASKS
SPLITS = ("train", "iid", "ood")
_SPLIT_RANGES = {"train": (TRAIN_TASKS, range(0, 200)),
                 "iid": (TRAIN_TASKS, range(200, 250)),
                 "ood": (OOD_TASKS, range(0, 50))}
REWARDS = ("sparse", "dense")

COMMANDS = ("go north", "go south", "go east", "go west", "take key", "open door", "look", "wait")
_DIRECTIONS = ("north", "south", "east", "west")
SCORE_KEY, SCORE_DOOR, SCORE_GOAL = 30.0, 60.0, 100.0


class Layout(NamedTuple):
    """One variation: rooms 0 (west end) .. num_rooms - 1 (east end)."""

    num_rooms: int
    door_side: str   # "east" or "west": the end of the corridor with the door
    key_room: int
    start_room: int

    @property
    def door_room(self) -> int:
        return self.num_rooms - 1 if self.door_side == "east" else 0

    @property
    def optimal_turns(self) -> int:
        """Walk to the key, take it, walk to the door, open it, go through."""
        return abs(self.start_room - self.key_room) + 1 + abs(self.key_room - self.door_room) + 2


def _num_rooms(task: str) -> int:
    if task not in TASK_NAMES:
        raise ValueError(f"task={task!r} is not a toy_keydoor task; use one of {TASK_NAMES}.")
    return int(task.rsplit("-", 1)[1])


@functools.lru_cache(maxsize=4096)
def layout(task: str, variation: int) -> Layout:
    """The layout of (task, variation): a pure function of both (no global random state)."""
    num_rooms = _num_rooms(task)
    if isinstance(variation, bool) or not isinstance(variation, (int, np.integer)) or variation < 0:
        raise ValueError(f"variation={variation!r} must be a non-negative integer.")
    rng = np.random.default_rng(zlib.crc32(f"{task}/{int(variation)}".encode()))
    while True:  # rejection sampling; about a third of the draws qualify for 5 rooms
        door_side = ("east", "west")[int(rng.integers(2))]
        key_room, start_room = (int(x) for x in rng.integers(num_rooms, size=2))
        candidate = Layout(num_rooms, door_side, key_room, start_room)
        if key_room != start_room and candidate.optimal_turns >= MIN_OPTIMAL_TURNS:
            return candidate


def episodes(split: str, tasks: Sequence[str] = ()) -> list[EpisodeSpec]:
    """The (task, variation) episodes of a split, in task order; `tasks` restricts the tasks."""
    split_tasks, variations = _SPLIT_RANGES[canonical_split(split, SPLITS, "toy_keydoor")]
    if tasks:
        if isinstance(tasks, str):
            raise TypeError(f"tasks={tasks!r} must be a sequence of task names, not a string.")
        outside = [t for t in tasks if t not in split_tasks]
        if outside:
            raise ValueError(f"tasks {outside} are not part of split {split!r}, whose tasks are "
                             f"{split_tasks}.")
        split_tasks = tuple(t for t in split_tasks if t in tasks)
    return [EpisodeSpec(task, v) for task in split_tasks for v in variations]


def task_description(task: str, variation: int) -> str:
    side = layout(task, variation).door_side
    return f"Unlock the {side} door and go through it."


def _direction(source: int, target: int) -> str:
    return "here" if source == target else ("east" if target > source else "west")


class ToyKeyDoorEnv(TextEnv):
    """One corridor episode at a time (pure Python, microseconds per step).

    Args:
      task, variation: the episode `reset()` plays when called without arguments; without
        them such resets draw an episode of `split` (restricted to `tasks`) with the seeded
        generator.
      split, tasks: see `episodes`.
      reward: "sparse" or "dense" (see the module docstring).
      success_reward: the sparse reward of a won episode.
      admissible: fill info["admissible_actions"] with COMMANDS.
      expert_plan: add info["expert_plan"], a shortest solution from the current state.
      seed: seeds the draws of argument-less resets.
    """

    # An episode is a pure function of (task, variation, actions): branches can replay it.
    deterministic = True

    def __init__(self, task: str | None = None, variation: int | None = None, *,
                 split: str = "train", tasks: Sequence[str] = (), reward: str = "sparse",
                 success_reward: float = 10.0, admissible: bool = False,
                 expert_plan: bool = False, seed: int = 0) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward={reward!r} is not supported; use one of {REWARDS}.")
        self._split = canonical_split(split, SPLITS, "toy_keydoor")
        self._tasks = tuple(tasks)
        self._reward = reward
        self._success_reward = float(success_reward)
        self._admissible = bool(admissible)
        self._expert_plan = bool(expert_plan)
        self._rng = np.random.default_rng(seed)
        self._default = None
        if task is not None or variation is not None:
            self._default = (task or TRAIN_TASKS[0], int(variation or 0))
            layout(*self._default)  # fail early on a bad task or variation
        self._layout: Layout | None = None
        self._task, self._variation = "", -1
        self._done = True

    def seed(self, seed: int) -> None:
        """Reseeds the draws of argument-less resets (episodes themselves are deterministic)."""
        self._rng = np.random.default_rng(seed)

    # --- Episode -------------------------------------------------------------------------

    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        if task is not None or variation is not None:
            self._task, self._variation = task or TRAIN_TASKS[0], int(variation or 0)
        elif self._default is not None:
            self._task, self._variation = self._default
        else:
            specs = episodes(self._split, self._tasks)
            self._task, self._variation = specs[int(self._rng.integers(len(specs)))]
        self._layout = layout(self._task, self._variation)
        self._task_description = task_description(self._task, self._variation)
        self._room = self._layout.start_room
        self._has_key = False
        self._door_open = False
        self._won = False
        self._done = False
        return f"You are in a corridor. {self._describe()}", self._info()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() was called on a finished (or never started) episode; "
                               "call reset() first.")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}: {action!r:.100}")
        score_before = self.score
        event = self._apply(" ".join(action.lower().split()))
        self._done = self._won
        if self._won:
            observation = event
        else:
            observation = f"{event} {self._describe()}"
        if self._reward == "sparse":
            reward = self._success_reward if self._won else 0.0
        else:
            reward = self.score - score_before
        return observation, reward, self._done, self._info()

    def _apply(self, command: str) -> str:
        """Changes the state for one command; returns what happened."""
        lay = self._layout
        if command in _DIRECTIONS:
            command = f"go {command}"
        if command.startswith("go ") and command[3:] in _DIRECTIONS:
            direction = command[3:]
            if direction in ("north", "south"):
                return "You can not go that way."
            step = 1 if direction == "east" else -1
            if self._room == lay.door_room and direction == lay.door_side:
                if not self._door_open:
                    return "The door is locked."
                self._won = True
                return "You go through the door and reach the goal."
            target = self._room + step
            if not 0 <= target < lay.num_rooms:
                return "You can not go that way."
            self._room = target
            return "You walk."
        if command == "take key":
            if self._has_key or self._room != lay.key_room:
                return "There is no key here."
            self._has_key = True
            return "You take the key."
        if command == "open door":
            if self._room != lay.door_room:
                return "There is no door here."
            if self._door_open:
                return "The door is already open."
            if not self._has_key:
                return "You have no key."
            self._door_open = True
            return "You open the door."
        if command == "look":
            return "You look around."
        if command == "wait":
            return "Time passes."
        return "Nothing happens."

    def _describe(self) -> str:
        lay = self._layout
        if self._has_key:
            parts = ["You have the key."]
            if self._room != lay.door_room:
                parts.append(f"The door is to the {lay.door_side}.")
        elif self._room == lay.key_room:
            parts = ["A key is here."]
        else:
            parts = [f"The key is to the {_direction(self._room, lay.key_room)}."]
        if self._room == lay.door_room:
            state = "An open" if self._door_open else "A locked"
            parts.append(f"{state} door is to the {lay.door_side}.")
        return " ".join(parts)

    @property
    def score(self) -> float:
        if self._won:
            return SCORE_GOAL
        return SCORE_DOOR if self._door_open else (SCORE_KEY if self._has_key else 0.0)

    def expert_plan(self) -> list[str]:
        """A shortest solution from the current state."""
        lay = self._layout
        plan: list[str] = []
        room = self._room
        if not self._has_key:
            plan += [f"go {_direction(room, lay.key_room)}"] * abs(room - lay.key_room)
            plan.append("take key")
            room = lay.key_room
        plan += [f"go {_direction(room, lay.door_room)}"] * abs(room - lay.door_room)
        if not self._door_open:
            plan.append("open door")
        plan.append(f"go {lay.door_side}")
        return plan

    def _info(self) -> dict[str, Any]:
        info = {
            "won": self._won,
            "score": self.score,
            "task": self._task,
            "variation": self._variation,
            "task_description": self._task_description,
            "admissible_actions": list(COMMANDS) if self._admissible else None,
        }
        if self._expert_plan:
            info["expert_plan"] = [] if self._won else self.expert_plan()
        return info

    def close(self) -> None:
        self._done = True


def solve(task: str, variation: int) -> list[str]:
    """The scripted shortest solution of an episode (its length is `layout(...).optimal_turns`)."""
    env = ToyKeyDoorEnv(task, variation)
    env.reset()
    return env.expert_plan()


__all__ = ["COMMANDS", "Layout", "MIN_OPTIMAL_TURNS", "SPLITS", "TASK_NAMES", "ToyKeyDoorEnv",
           "episodes", "layout", "solve", "task_description"]
