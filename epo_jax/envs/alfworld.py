"""ALFWorld behind the TextEnv protocol, played by ALFWorld's own TextWorld/PDDL engine.

Each environment drives one `textworld.envs.pddl.PddlEnv` wrapped in ALFWorld's
`AlfredDemangler` (ALFRED ids -> "mug 1") and `AlfredInfos`, exactly the stack that ALFWorld's
`AlfredTWEnv` runs inside each of its batch workers, without the gym batching around it.

Games live in ALFWorld's directory structure, `<data_dir>/json_2.1.1/<split>/<task>/<trial>/`
holding `game.tw-pddl` and `traj_data.json`. The data directory is, in order: the `data_dir`
argument; `$ALFWORLD_DATA` when it holds `json_2.1.1` (the official games); otherwise the set
generated offline by `epo_jax.envs.alfworld_games` (created once, then cached).

    specs = episodes("train")
    env = AlfWorldEnv(admissible=True)
    obs, info = env.reset(specs[0].task, specs[0].variation)
    obs, reward, done, info = env.step(info["admissible_actions"][0])

Splits: train | iid | ood, or ALFWorld's names (valid_seen = eval_in_distribution = iid,
valid_unseen = eval_out_of_distribution = ood). An episode's task is its game folder relative
to `json_2.1.1` (e.g. "valid_seen/pick_and_place_simple-Mug-None-Cabinet-12/trial_T..."), its
variation the game's index in the split's sorted listing.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from epo_jax.envs import alfworld_games
from epo_jax.envs.base import EnvCrashed, EpisodeSpec, TextEnv
from epo_jax.envs.panels import alfworld_task_type

# alfworld_games points ALFWORLD_DATA at this project's cache before alfworld is imported.
import textworld  # noqa: E402
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos  # noqa: E402
from textworld.envs.pddl import PddlEnv  # noqa: E402

TASK_TYPES = alfworld_games.TASK_TYPES
SPLIT_ALIASES = {
    "train": "train",
    "iid": "valid_seen", "valid_seen": "valid_seen", "eval_in_distribution": "valid_seen",
    "ood": "valid_unseen", "valid_unseen": "valid_unseen",
    "eval_out_of_distribution": "valid_unseen",
}
REWARD_MODES = ("sparse",)
_TASK_PREFIX = "Your task is to: "


def split_dir(split: str) -> str:
    """ALFWorld's folder for a split name (train | iid | ood or ALFWorld's own names)."""
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split={split!r} is not an ALFWorld split; use one of "
                         f"{sorted(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[split]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding json_2.1.1: `data_dir`, else $ALFWORLD_DATA, else the generated set."""
    if data_dir:
        root = Path(data_dir).expanduser()
        if not (root / alfworld_games.GAMES_DIRNAME).is_dir():
            raise FileNotFoundError(
                f"data_dir={str(data_dir)!r} has no {alfworld_games.GAMES_DIRNAME}/ folder of "
                "ALFWorld games; point it at the folder holding json_2.1.1 (official data or "
                "`python -m epo_jax.envs.alfworld_games --out DIR`), or leave it empty to use "
                "the generated games")
        return root
    official = Path(os.environ.get("ALFWORLD_DATA", "")).expanduser()
    if os.environ.get("ALFWORLD_DATA") and (official / alfworld_games.GAMES_DIRNAME).is_dir():
        return official
    return alfworld_games.ensure_games()


@functools.lru_cache(maxsize=32)
def _listing(root: Path, folder: str) -> tuple[tuple[str, str], ...]:
    """Sorted (game id, task type) of the playable games of one split folder.

    Applies AlfredTWEnv's own filter: the six task types, no movable/sliced variants, and only
    games marked solvable.
    """
    games_root = root / alfworld_games.GAMES_DIRNAME
    games = []
    for traj_path in sorted((games_root / folder).glob("*/*/traj_data.json")):
        game_id = traj_path.parent.relative_to(games_root).as_posix()
        task_type = alfworld_task_type(game_id)
        game_file = traj_path.parent / "game.tw-pddl"
        if (task_type not in TASK_TYPES or "movable" in game_id or "Sliced" in game_id
                or not game_file.exists()):
            continue
        with open(game_file) as f:
            if not json.load(f).get("solvable"):
                continue
        games.append((game_id, task_type))
    return tuple(games)


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise TypeError(f"tasks={tasks!r} must be a sequence of task types, e.g. ({tasks!r},)")
    unknown = sorted(set(tasks) - set(TASK_TYPES))
    if unknown:
        raise ValueError(f"tasks has {unknown}, which are not ALFWorld task types; use a "
                         f"subset of {list(TASK_TYPES)}")
    return tuple(tasks)


def episodes(split: str, data_dir: str | os.PathLike | None = None,
             tasks: Sequence[str] = ()) -> list[EpisodeSpec]:
    """The split's games as EpisodeSpec(task=<game id>, variation=<index>), deterministically.

    `tasks` keeps only games of those task types (indices stay those of the whole split);
    () keeps all six.
    """
    wanted = _check_tasks(tasks) or TASK_TYPES
    listing = _listing(resolve_data_dir(data_dir), split_dir(split))
    return [EpisodeSpec(game_id, index) for index, (game_id, task_type) in enumerate(listing)
            if task_type in wanted]


class AlfWorldEnv(TextEnv):
    """One ALFWorld game at a time on TextWorld's PDDL engine.

    Args:
      task, variation: the game `reset()` plays when called without arguments (see `reset`);
        when both are None, such resets sample a game of the split.
      split: the split that `variation` indexes and resets sample from (train | iid | ood).
      tasks: task types that sampled games are drawn from; () = all six.
      data_dir: folder holding json_2.1.1 (see `resolve_data_dir`).
      reward: "sparse": success_reward on the winning step, 0 elsewhere. ALFWorld's engine
        scores only the win itself, so it has no denser signal to offer.
      success_reward: reward for winning.
      admissible: fill info["admissible_actions"] (the engine computes them every step anyway).
      expert_plan: add info["expert_plan"], the planner's solution from the current state
        (TextWorld's policy_commands; it replans after every step, which costs time).
      seed: seeds the sampling of games by argument-less resets.
    """

    def __init__(self, task: str | None = None, variation: int | None = None, *,
                 split: str = "train", tasks: Sequence[str] = (),
                 data_dir: str | os.PathLike | None = None, reward: str = "sparse",
                 success_reward: float = 10.0, admissible: bool = False,
                 expert_plan: bool = False, seed: int = 0) -> None:
        if reward not in REWARD_MODES:
            raise ValueError(f"reward={reward!r} is not supported for ALFWorld; use 'sparse' "
                             "(its engine scores only the win, so there is no dense signal)")
        if not isinstance(success_reward, (int, float)):
            raise TypeError(f"success_reward={success_reward!r}; pass a number such as 10.0")
        self._split_dir = split_dir(split)
        self._tasks = _check_tasks(tasks)
        self._root = resolve_data_dir(data_dir)
        self._success_reward = float(success_reward)
        self._admissible = bool(admissible)
        self._expert_plan = bool(expert_plan)
        self._rng = np.random.default_rng(seed)
        self._default = None
        if task is not None or variation is not None:
            self._default = self._resolve(task, variation)
        request = textworld.EnvInfos(won=True, admissible_commands=True,
                                     policy_commands=self._expert_plan)
        self._engine = AlfredInfos(AlfredDemangler(PddlEnv(request)))
        # The PDDL engine has no randomness and names objects by sorted ids, so a game replays
        # identically in any process (whatever its string-hash seed).
        self.deterministic = True
        self._loaded_game: str | None = None
        self._task = ""
        self._variation = -1
        self._task_type = ""
        self._task_description = ""
        self._done = True

    def seed(self, seed: int) -> None:
        """Reseeds the sampling of games by argument-less resets."""
        self._rng = np.random.default_rng(seed)

    def _resolve(self, task: str | None, variation: int | None) -> tuple[str, int]:
        """(game id, variation) for explicit reset arguments; see `reset`."""
        if task is None:
            listing = _listing(self._root, self._split_dir)
            if not isinstance(variation, (int, np.integer)) or not 0 <= variation < len(listing):
                raise ValueError(f"variation={variation!r} is out of range for split "
                                 f"{self._split_dir!r}, which has {len(listing)} games under "
                                 f"{self._root}; use 0..{len(listing) - 1}")
            return listing[variation][0], int(variation)
        if not isinstance(task, str):
            raise TypeError(f"task={task!r}; pass a game id such as episodes(split)[i].task")
        game_file = self._root / alfworld_games.GAMES_DIRNAME / task / "game.tw-pddl"
        if not game_file.is_file():
            raise ValueError(f"task={task!r} names no game: {game_file} does not exist; use "
                             "a task from episodes(split)")
        if variation is None:
            folder = task.split("/", 1)[0]
            ids = ([game_id for game_id, _ in _listing(self._root, folder)]
                   if folder in SPLIT_ALIASES.values() else [])
            variation = ids.index(task) if task in ids else 0
        return task, int(variation)

    def _sample(self) -> tuple[str, int]:
        candidates = episodes(self._split_dir, self._root, self._tasks)
        if not candidates:
            raise ValueError(f"split {self._split_dir!r} under {self._root} has no games of "
                             f"task types {self._tasks}; choose other tasks or another split")
        task, variation = candidates[int(self._rng.integers(len(candidates)))]
        return task, variation

    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        """Starts a game and returns its welcome text, room overview and task.

        `task` (a game id, see `episodes`) plays that game; `variation` alone plays the split's
        variation-th game; with neither, the constructor's game if it named one, else a game
        of the split drawn with the environment's seed.
        """
        if self._engine is None:
            raise RuntimeError("reset() called after close(); create a new AlfWorldEnv")
        self._done = True
        if task is not None or variation is not None:
            self._task, self._variation = self._resolve(task, variation)
        else:
            self._task, self._variation = self._default or self._sample()
        try:
            if self._loaded_game != self._task:
                self._loaded_game = None
                self._engine.load(str(self._root / alfworld_games.GAMES_DIRNAME / self._task
                                      / "game.tw-pddl"))
                self._loaded_game = self._task
            state = self._engine.reset()
        except Exception as error:
            raise EnvCrashed(f"ALFWorld failed to start game {self._task!r}: {error!r}") from error
        self._task_type = Path(self._task).parent.name.split("-")[0]
        intro = state.feedback
        self._task_description = intro.split(_TASK_PREFIX, 1)[-1].strip()
        self._done = False
        return intro, self._info(state)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Plays one action text; text the game does not accept gives "Nothing happens."."""
        if self._done:
            raise RuntimeError("step() was called on a finished (or never started) episode; "
                               "call reset() first")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}: {action!r:.100}")
        try:
            state, _, done = self._engine.step(action)
        except Exception as error:
            self._done = True
            raise EnvCrashed(f"ALFWorld failed on action {action!r:.100} in {self._task!r}: "
                             f"{error!r}") from error
        self._done = bool(done)
        reward = self._success_reward if state["won"] else 0.0
        return state.feedback, reward, self._done, self._info(state)

    def _info(self, state) -> dict[str, Any]:
        info = {
            "won": bool(state["won"]),
            "score": float(state["won"]),
            "task": self._task,
            "variation": self._variation,
            "task_description": self._task_description,
            "admissible_actions": list(state["admissible_commands"]) if self._admissible else None,
            "task_type": self._task_type,
        }
        if self._expert_plan:
            info["expert_plan"] = list(state["policy_commands"])
        return info

    def close(self) -> None:
        """Drops the engine; its PDDL state and private planner library go with it."""
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        self._loaded_game = None
        self._done = True
