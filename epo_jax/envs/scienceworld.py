"""ScienceWorld (pip `scienceworld`) behind the TextEnv protocol, with a fast step.

The engine is a Scala simulator reached through py4j; every environment owns one JVM.
The package's own `ScienceWorldEnv.step()` rebuilds the full list of valid
action-object combinations after every action (thousands of strings, ~150 ms); here a
step is the server's `step` plus `getScore`/`getCompleted` (a few ms), and the lists
the prompt may show are computed only when asked for:

  - `admissible=True`: info["admissible_actions"] = every valid action-object
    combination (expensive: ~0.1-0.3 s per step);
  - `available_actions=True`: info["action_templates"] (e.g. "open OBJ") and
    info["objects"] (cheap), which is what EPO's ScienceWorld prompt shows.

Tasks and splits (EPO, arXiv 2509.22576, docs/algorithms.md section 4). The task ids 0-29 index the
engine's task list (`get_task_names()`, alphabetical; see TASK_NAMES). The official
variation splits are contiguous ranges per task (train, then dev, then test); EPO uses

  - "train": the train variations of tasks 0-28 (3322 episodes);
  - "iid" (alias "dev"): the dev variations of tasks 0-28 (1661);
  - "ood" (alias "test"): the test variations of tasks 0-28 (1684);
  - "unseen_task": every variation of task 29, `use-thermometer` (540), a task never
    trained on.

Rewards: "sparse" gives `success_reward * won` on the last step and 0 elsewhere (the
official wrappers, success_reward = 10); "dense" gives the engine's score delta
(0..100 points). An episode is done when the engine reports the task completed or
the score turns negative (a failed task); won = done and score > 0.

Determinism (`deterministic=True`, the default): the engine seeds its one global random
generator with the variation on every load, but it walks hash sets keyed by Java identity
hashes, which depend on everything the JVM did before. That order decides how a container's
contents are listed, which object a number picks in a disambiguation question, and the order
in which objects are updated each tick (a burning chair heats a room differently), so two
JVMs with different histories drift apart under the same actions. The JVM flag -XX:hashCode=2
gives every object the same identity hash, leaving iteration orders to insertion order alone;
with it an episode is a function of (task, variation, the sequence of engine calls), at about
15-20% more time per step. The calls include the info lists (`admissible`,
`available_actions`), which draw from the generator too, so environments meant to reproduce
each other's episodes must share their options (a pool's environments do).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
from py4j.protocol import Py4JError
from scienceworld.constants import BASEPATH, JAR_PATH

from epo_jax.envs.base import EnvCrashed, EpisodeSpec, TextEnv, canonical_split


class TaskVariations(NamedTuple):
    """The official train / dev / test variation indices of one task."""

    train: Sequence[int]
    dev: Sequence[int]
    test: Sequence[int]


# (task, number of variations, train count, dev count) for scienceworld 1.2.3, read from
# the engine with `ScienceWorldEnv.read_variation_table`; train, dev and test are
# consecutive ranges.
_PINNED_VERSION = "1.2.3"
_PINNED_TABLE = (
    ("boil", 30, 14, 7),
    ("change-the-state-of-matter-of", 30, 14, 7),
    ("chemistry-mix", 32, 16, 8),
    ("chemistry-mix-paint-secondary-color", 36, 18, 9),
    ("chemistry-mix-paint-tertiary-color", 36, 18, 9),
    ("find-animal", 300, 150, 75),
    ("find-living-thing", 300, 150, 75),
    ("find-non-living-thing", 300, 150, 75),
    ("find-plant", 300, 150, 75),
    ("freeze", 30, 14, 7),
    ("grow-fruit", 126, 62, 31),
    ("grow-plant", 126, 62, 31),
    ("identify-life-stages-1", 14, 6, 3),
    ("identify-life-stages-2", 10, 4, 2),
    ("inclined-plane-determine-angle", 168, 84, 42),
    ("inclined-plane-friction-named-surfaces", 1386, 692, 346),
    ("inclined-plane-friction-unnamed-surfaces", 162, 80, 40),
    ("lifespan-longest-lived", 125, 62, 31),
    ("lifespan-longest-lived-then-shortest-lived", 125, 62, 31),
    ("lifespan-shortest-lived", 125, 62, 31),
    ("measure-melting-point-known-substance", 436, 218, 109),
    ("measure-melting-point-unknown-substance", 300, 150, 75),
    ("melt", 30, 14, 7),
    ("mendelian-genetics-known-plant", 120, 60, 30),
    ("mendelian-genetics-unknown-plant", 480, 240, 120),
    ("power-component", 20, 10, 5),
    ("power-component-renewable-vs-nonrenewable-energy", 20, 10, 5),
    ("test-conductivity", 900, 450, 225),
    ("test-conductivity-of-unknown-substances", 600, 300, 150),
    ("use-thermometer", 540, 270, 135),
)

# The engine's task order; EPO's task ids index this tuple.
TASK_NAMES: tuple[str, ...] = tuple(row[0] for row in _PINNED_TABLE)
UNSEEN_TASK_ID = 29  # use-thermometer: held out of EPO's training tasks 0-28

SPLITS = ("train", "iid", "ood", "unseen_task")
_SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers",
                    "openDoors", "noElectricalAction")
_REWARDS = ("sparse", "dense")
_JVM_HEAP_PATTERN = re.compile(r"\d+[kKmMgG]?")
_RESET_ACTION = "look around"
DEFAULT_JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
# Constant identity hashes: iteration orders, and with them the episode, become reproducible.
DETERMINISTIC_JVM_OPTIONS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")


def _pinned_table() -> dict[str, TaskVariations]:
    table = {}
    for name, total, num_train, num_dev in _PINNED_TABLE:
        table[name] = TaskVariations(train=range(0, num_train),
                                     dev=range(num_train, num_train + num_dev),
                                     test=range(num_train + num_dev, total))
    return table


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "epo_jax"


_TABLES: dict[str, dict[str, TaskVariations]] = {}


def variation_table(version: str | None = None, cache_dir: str | os.PathLike | None = None,
                    env: ScienceWorldEnv | None = None) -> dict[str, TaskVariations]:
    """Returns {task name: TaskVariations} for the installed (or given) engine version.

    The table of scienceworld 1.2.3 ships in this module. For any other version it is
    read once from an engine (`env`, else a fresh one: ~10 s) and cached as JSON under
    `cache_dir` (default $XDG_CACHE_HOME/epo_jax or ~/.cache/epo_jax); nothing touches
    the network.
    """
    version = version or importlib.metadata.version("scienceworld")
    if version == _PINNED_VERSION:
        return _pinned_table()
    if version in _TABLES:
        return _TABLES[version]
    path = pathlib.Path(cache_dir or _cache_dir()) / f"scienceworld-{version}-variations.json"
    if path.exists():
        raw = json.loads(path.read_text())
    else:
        with contextlib.nullcontext(env) if env is not None else ScienceWorldEnv() as engine:
            raw = {name: variations._asdict()
                   for name, variations in engine.read_variation_table().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(raw))
        tmp_path.replace(path)  # atomic: concurrent first runs never read a partial file
    table = {name: TaskVariations(**{k: list(v) for k, v in splits.items()})
             for name, splits in raw.items()}
    _TABLES[version] = table
    return table


def _check_task(task: str) -> str:
    if task not in TASK_NAMES:
        raise ValueError(f"task={task!r} is not a ScienceWorld task; use one of {TASK_NAMES}.")
    return task


def episodes(split: str, tasks: Sequence[str] = ()) -> list[EpisodeSpec]:
    """Lists the (task, variation) episodes of one of EPO's splits, in task order.

    `tasks` restricts the list to those task names (empty: every task of the split).
    """
    split = canonical_split(split, SPLITS, "ScienceWorld")
    table = variation_table()
    if split == "unseen_task":
        split_tasks = (TASK_NAMES[UNSEEN_TASK_ID],)
    else:
        split_tasks = TASK_NAMES[:UNSEEN_TASK_ID]
    if tasks:
        if isinstance(tasks, str):
            raise TypeError(f"tasks={tasks!r} must be a sequence of task names, not a string.")
        for task in tasks:
            _check_task(task)
        outside = [task for task in tasks if task not in split_tasks]
        if outside:
            raise ValueError(f"tasks {outside} are not part of split {split!r}, whose tasks are "
                             f"{split_tasks}.")
        split_tasks = tuple(task for task in split_tasks if task in tasks)
    result = []
    for task in split_tasks:
        variations = table[task]
        if split == "unseen_task":
            indices = [*variations.train, *variations.dev, *variations.test]
        else:
            indices = {"train": variations.train, "iid": variations.dev,
                       "ood": variations.test}[split]
        result.extend(EpisodeSpec(task, int(v)) for v in indices)
    return result


def _check_simplification(simplification: str) -> str:
    for part in filter(None, simplification.split(",")):
        if part not in _SIMPLIFICATIONS:
            raise ValueError(f"simplification={simplification!r}: {part!r} is not a ScienceWorld "
                             f"simplification; use a comma-separated subset of {_SIMPLIFICATIONS} "
                             "or '' for none.")
    return simplification


def _shutdown_jvm(gateway: JavaGateway, process: subprocess.Popen) -> None:
    """Stops a JVM for good; safe on a dead or half-dead engine, never raises."""
    with contextlib.suppress(Py4JError, OSError, AttributeError):
        if process.poll() is None:
            gateway.shutdown()
        else:
            # py4j would try to reach the dead JVM (to shut it down, and later to free
            # the objects Python still holds) and log a connection error each time.
            gateway._gateway_client.is_connected = False
            gateway.close()
    # The JVM was launched with die_on_exit: closing its stdin ends it. A write to a
    # pipe whose reader already exited raises the harmless BrokenPipeError.
    with contextlib.suppress(OSError, ValueError):
        if process.stdin is not None:
            process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ScienceWorldEnv(TextEnv):
    """One ScienceWorld engine (one JVM) playing one episode at a time.

    Args:
      task, variation: the episode `reset()` plays when called without arguments.
        Without them, `reset()` samples an episode of `split` (restricted to `tasks`)
        with this environment's seeded generator.
      split, tasks: see `episodes`.
      simplification: ScienceWorld simplification string ("easy" = all of them).
      reward: "sparse" (success_reward * won at the end) or "dense" (score delta).
      success_reward: the sparse reward of a won episode.
      admissible: fill info["admissible_actions"] with every valid action.
      available_actions: fill info["action_templates"] and info["objects"].
      jvm_heap: maximum JVM heap (-Xmx), e.g. "512m".
      jvm_options: further JVM options. The serial collector keeps memory low; the
        C1-only compiler (TieredStopAtLevel=1) starts about twice as fast and leaves the
        cores to the other environments.
      max_action_chars: longer action texts are cut to this many characters before
        they reach the engine (no command is anywhere near as long).
      seed: seeds the episode sampling of `reset()` without arguments.
      deterministic: start the JVM with DETERMINISTIC_JVM_OPTIONS so that replaying an
        episode's actions reproduces it exactly (see the module docstring).
    """

    def __init__(self, task: str | None = None, variation: int | None = None, *,
                 split: str = "train", tasks: Sequence[str] = (),
                 simplification: str = "easy", reward: str = "sparse",
                 success_reward: float = 10.0, admissible: bool = False,
                 available_actions: bool = False, jvm_heap: str = "512m",
                 jvm_options: Sequence[str] = DEFAULT_JVM_OPTIONS,
                 max_action_chars: int = 1024, seed: int = 0, deterministic: bool = True):
        if task is not None:
            _check_task(task)
        if variation is not None and task is None:
            raise ValueError(f"variation={variation!r} was given without a task; name the task "
                             "too, or leave both out to sample episodes of the split.")
        if reward not in _REWARDS:
            raise ValueError(f"reward={reward!r} is not supported; use one of {_REWARDS}.")
        if not _JVM_HEAP_PATTERN.fullmatch(str(jvm_heap)):
            raise ValueError(f"jvm_heap={jvm_heap!r} is not a JVM heap size; use e.g. '512m' "
                             "or '2g'.")
        if max_action_chars < 1:
            raise ValueError(f"max_action_chars={max_action_chars!r} must be positive.")
        self._split = canonical_split(split, SPLITS, "ScienceWorld")
        self._split_episodes = episodes(self._split, tasks)
        self._default_task = task
        self._default_variation = variation
        if variation is not None:
            self._check_variation(task, variation)
        self._simplification = _check_simplification(simplification)
        self._reward = reward
        self._success_reward = float(success_reward)
        self._admissible = admissible
        self._available_actions = available_actions
        self._max_action_chars = max_action_chars
        self._rng = np.random.default_rng(seed)

        port, self._process = launch_gateway(
            classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH, return_proc=True,
            javaopts=[f"-Xmx{jvm_heap}", *jvm_options,
                      *(DETERMINISTIC_JVM_OPTIONS if deterministic else ())])
        self.deterministic = bool(deterministic)
        self._gateway = JavaGateway(
            gateway_parameters=GatewayParameters(auto_field=True, port=port),
            java_process=self._process)
        self._finalizer = weakref.finalize(self, _shutdown_jvm, self._gateway, self._process)
        self._server = self._call(
            lambda: self._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface())

        self._task: str | None = None
        self._variation: int | None = None
        self._task_description = ""
        self._last_score = 0
        self._done = True

    @property
    def jvm_pid(self) -> int:
        """The process id of this environment's JVM."""
        return self._process.pid

    def _call(self, fn):
        """Runs one engine call; a dead or failing engine surfaces as EnvCrashed."""
        try:
            return fn()
        except (Py4JError, OSError) as error:
            try:  # a JVM that just died may take a moment to be reaped
                exit_code = self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                exit_code = None
            state = "failed" if exit_code is None else f"exited with code {exit_code}"
            # A failed engine is discarded: end it now so that close() finds it dead.
            self.kill()
            self._process.wait()
            raise EnvCrashed(f"ScienceWorld engine (JVM pid {self._process.pid}) {state}: "
                             f"{type(error).__name__}: {error}") from error

    @staticmethod
    def _check_variation(task: str, variation: int) -> None:
        variations = variation_table()[task]
        total = len(variations.train) + len(variations.dev) + len(variations.test)
        if not isinstance(variation, (int, np.integer)) or not 0 <= variation < total:
            raise ValueError(f"variation={variation!r} is out of range for task {task!r}, which "
                             f"has variations 0..{total - 1}.")

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def _sample_episode(self, task: str | None) -> EpisodeSpec:
        candidates = self._split_episodes
        if task is not None:
            candidates = [spec for spec in candidates if spec.task == task]
            if not candidates:
                raise ValueError(f"task={task!r} has no variations in split {self._split!r}; "
                                 "name a variation explicitly.")
        return candidates[int(self._rng.integers(len(candidates)))]

    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        """Loads (task, variation) afresh and returns the first "look around".

        Every load builds the same world. With deterministic=False the engine may list the
        contents of a container in a different order from one load to the next (it walks
        hash sets keyed by identity hashes), so environments playing one variation see the
        same lines, not always in the same order; with deterministic=True (the default)
        they see the same text.
        """
        if task is None and variation is not None:
            raise ValueError(f"variation={variation!r} was given without a task.")
        if task is None:
            task, variation = self._default_task, self._default_variation
        if task is not None:
            _check_task(task)
        if variation is None:
            task, variation = self._sample_episode(task)
        self._check_variation(task, variation)
        variation = int(variation)
        self._call(lambda: self._server.load(task, variation, self._simplification, False))
        self._task, self._variation = task, variation
        self._task_description = self._call(self._server.getTaskDescription)
        self._last_score = 0
        self._done = False
        observation = self._call(lambda: self._server.step(_RESET_ACTION))
        return observation, self._info(score=0, won=False, done=False)

    def _engine_text(self, action: str) -> str:
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}: {action!r}")
        # Lone surrogates cannot be encoded for the socket; they become "?".
        return action[:self._max_action_chars].encode("utf-8", "replace").decode("utf-8")

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() was called on a finished (or never started) episode; "
                               "call reset() first.")
        text = self._engine_text(action)
        observation = self._call(lambda: self._server.step(text))
        score = int(round(100 * self._call(self._server.getScore)))
        completed = bool(self._call(self._server.getCompleted))
        done = completed or score < 0
        won = done and score > 0
        if self._reward == "dense":
            reward = float(score - self._last_score)
        else:
            reward = self._success_reward * float(won)
        self._last_score = score
        self._done = done
        return observation, reward, done, self._info(score=score, won=won, done=done)

    def _info(self, *, score: int, won: bool, done: bool) -> dict[str, Any]:
        live = not done
        return {
            "won": won,
            "score": float(score),
            "task": self._task,
            "variation": self._variation,
            "task_description": self._task_description,
            "admissible_actions": (
                list(self._call(self._server.getValidActionObjectCombinations))
                if self._admissible and live else None),
            "action_templates": (list(self._call(self._server.getPossibleActions))
                                 if self._available_actions and live else None),
            "objects": (list(self._call(self._server.getPossibleObjects))
                        if self._available_actions and live else None),
        }

    def gold_actions(self, task: str, variation: int) -> list[str]:
        """The engine's gold action sequence for an episode (it wins when followed).

        Planning it loads the episode with the engine's planner on (~2 s), which ends the
        episode in play: call reset() afterwards.
        """
        _check_task(task)
        self._check_variation(task, variation)
        self._done = True
        self._call(lambda: self._server.load(task, int(variation), self._simplification, True))
        return [str(action) for action in self._call(self._server.getGoldActionSequence)]

    def read_variation_table(self) -> dict[str, TaskVariations]:
        """Reads every task's official train/dev/test variations from this engine.

        Loads each task in turn, so the environment needs a `reset()` before it plays again.
        """
        table = {}
        for name in self._call(self._server.getTaskNames):
            self._call(lambda: self._server.load(name, 0, "", False))
            table[str(name)] = TaskVariations(
                train=[int(v) for v in self._call(self._server.getVariationsTrain)],
                dev=[int(v) for v in self._call(self._server.getVariationsDev)],
                test=[int(v) for v in self._call(self._server.getVariationsTest)])
        self._task = None
        self._done = True
        return table

    def kill(self) -> None:
        """Kills the JVM at once (any thread); a call blocked on it raises EnvCrashed."""
        with contextlib.suppress(OSError):
            self._process.kill()

    def close(self) -> None:
        """Stops the JVM and waits for it to exit; safe to call more than once."""
        self._finalizer()
