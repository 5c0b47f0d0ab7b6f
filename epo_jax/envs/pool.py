"""A pool of N text environments stepped in parallel, with groups, a turn limit and faults.

    pool = EnvPool(functools.partial(epo_jax.envs.make, "scienceworld"), num_envs=16,
                   group_size=8, max_turns=30)
    first = pool.reset([EpisodeSpec("boil", 3), EpisodeSpec("melt", 7)])  # one per group
    while pool.active.any():
        results = pool.step({i: policy(i) for i in np.flatnonzero(pool.active)})
    pool.close()

Every environment lives in a slot served by its own daemon thread, so the calls of all
slots run at once and the calls of one slot run in order. Two backends:

  - "thread": the environment object lives in this process. Right for engines that run
    out of process already (ScienceWorld: one JVM per environment via py4j) and release
    the GIL while they wait.
  - "process": the environment lives in a spawned child process (`SubprocessEnv`), for
    pure-Python engines (ALFWorld / TextWorld) that would otherwise share one GIL.

Groups: env i belongs to group i // group_size, and `reset` takes one episode per group,
so all members of a group play the same task and variation (GRPO, GiGPO).

Single environments: `step_async` submits one environment's action and returns at once
(`finish_step` gives its result), so an environment can step while the caller decodes other
replies; `stop` ends chosen environments' episodes without a step, and `replay`
starts chosen environments on episodes of their own, optionally replaying an action prefix on
a deterministic engine (TextEnv.replay) so that one environment continues another's episode
from where it stands (branching rollouts).

Faults: a call that raises (EnvCrashed when an engine process died) or does not answer
within `step_timeout_s` ends that environment's episode with a StepResult flagged
`crashed=True, truncated=True` (never counted as a policy failure); the engine is killed
and rebuilt in the background, and the other environments carry on. A reset that fails
is retried on a fresh engine.

Shutdown: `close()`, the context manager, or interpreter exit (atexit) close every
engine; a JVM also dies on its own when this process exits (py4j die_on_exit), and a
child process when its pipe closes, so no engine outlives the pool.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from epo_jax.envs.base import EnvCrashed, EpisodeSpec, ReplayCheck, ReplayError, TextEnv

logger = logging.getLogger(__name__)

BACKENDS = ("thread", "process")


class StepResult(NamedTuple):
    """What one environment returned for one action.

    done: the engine ended the episode (won or lost). truncated: the episode was cut
    short, by the turn limit or by an engine fault. crashed: the engine died or hung;
    the episode says nothing about the policy. A crashed step has observation "",
    reward 0, and the episode's last info with won=False and a "crash_reason".
    """

    observation: str
    reward: float
    done: bool
    truncated: bool
    crashed: bool
    info: dict[str, Any]


class ResetResult(NamedTuple):
    """The first observation of an episode and its info."""

    observation: str
    info: dict[str, Any]


class Replay(NamedTuple):
    """Start an environment on `episode` and play `actions` (see TextEnv.replay): no actions is
    a plain reset; `expected` holds the (observation, score) the original showed after its reset
    and after each action, which the replay must reproduce."""

    episode: EpisodeSpec
    actions: Sequence[str] = ()
    expected: Sequence[ReplayCheck] | None = None


class PendingStep(NamedTuple):
    """A step submitted with `EnvPool.step_async`; `EnvPool.finish_step` turns it into its StepResult."""

    index: int
    future: concurrent.futures.Future
    deadline: float  # time.monotonic() after which the step counts as hung

    def ready(self) -> bool:
        """Whether finish_step returns at once (the engine answered, or the step is past its deadline)."""
        return self.future.done() or time.monotonic() >= self.deadline


class _SlotThread:
    """A daemon thread running one slot's calls in submission order.

    Daemon, unlike ThreadPoolExecutor's workers: a call stuck in a dead engine must not
    hold up interpreter exit.
    """

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future

    def stop(self) -> None:
        """Ends the thread after the call it is running (if any)."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)
            else:
                future.set_result(result)


def _subprocess_main(conn, factory: Callable[[], TextEnv]) -> None:
    """Child side of SubprocessEnv: build the environment, then serve calls until told."""
    try:
        env = factory()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", bool(env.deterministic)))
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # the parent is gone
                return
            if method == "close":
                return
            try:
                result = getattr(env, method)(*args)
            except EnvCrashed as error:
                conn.send(("crashed", str(error)))
            except ReplayError as error:
                conn.send(("replay_error", str(error)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", result))
    finally:
        env.close()


class SubprocessEnv(TextEnv):
    """A TextEnv built by `factory` inside a spawned child process.

    `factory` must be picklable (a module-level function or class, or a
    functools.partial of one). The child dies with its pipe, so it cannot outlive this
    process. As with any spawned process, scripts must guard their entry point with
    `if __name__ == "__main__":`.
    """

    def __init__(self, factory: Callable[[], TextEnv]):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_subprocess_main, args=(child_conn, factory),
                                        name="epo-jax-env", daemon=True)
        self._process.start()
        child_conn.close()
        self._finalizer = weakref.finalize(self, _stop_subprocess, self._process, self._conn)
        self.deterministic = bool(self._receive())  # the child's engine's declaration

    @property
    def pid(self) -> int:
        """The child process's id."""
        return self._process.pid

    def _receive(self) -> Any:
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as error:
            self._process.join(timeout=1)
            raise EnvCrashed(f"environment process pid {self._process.pid} died (exit code "
                             f"{self._process.exitcode})") from error
        if status == "crashed":
            raise EnvCrashed(payload)
        if status == "replay_error":
            raise ReplayError(payload)
        if status == "error":
            raise RuntimeError(f"environment process pid {self._process.pid} raised:\n{payload}")
        return payload

    def _request(self, method: str, *args: Any) -> Any:
        try:
            self._conn.send((method, args))
        except (OSError, ValueError) as error:
            raise EnvCrashed(f"environment process pid {self._process.pid} is gone (exit "
                             f"code {self._process.exitcode})") from error
        return self._receive()

    def reset(self, task: str | None = None,
              variation: int | None = None) -> tuple[str, dict[str, Any]]:
        return self._request("reset", task, variation)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        return self._request("step", action)

    def seed(self, seed: int) -> None:
        self._request("seed", seed)

    def replay(self, task: str, variation: int, actions: Sequence[str],
               expected: Sequence[ReplayCheck] | None = None) -> tuple[str, dict[str, Any]]:
        # In the child: one round trip instead of one per action.
        return self._request("replay", task, variation, list(actions),
                             None if expected is None else list(expected))

    def kill(self) -> None:
        """Kills the child at once (any thread); a call blocked on it raises EnvCrashed."""
        with contextlib.suppress(OSError, ValueError):
            self._process.kill()

    def close(self) -> None:
        self._finalizer()


def _stop_subprocess(process, conn) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(("close", ()))
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


class _Slot:
    """One environment's place in the pool; `env` is replaced when the engine restarts."""

    def __init__(self, index: int, seed: int):
        self.index = index
        self.seed = seed
        self.worker: _SlotThread | None = None
        self.env: TextEnv | None = None
        self.created: concurrent.futures.Future | None = None
        self.restarts = 0


def _build_slot_env(slot: _Slot, make_env: Callable[[], TextEnv]) -> None:
    env = make_env()
    slot.env = env
    env.seed(slot.seed)


def _kill_quietly(env: TextEnv) -> None:
    try:
        env.kill()
    except Exception:  # the engine is being discarded; nothing more can go wrong with it
        logger.debug("kill() of a discarded environment raised", exc_info=True)


def _close_slot_env(slot: _Slot) -> None:
    if slot.env is not None:
        slot.env.close()


def _close_slots(slots: list[_Slot], timeout_s: float) -> None:
    """Closes every slot's environment, killing those that do not close in time."""
    closing = {}
    for slot in slots:
        if slot.worker is None:
            continue
        # Queued behind a pending build, so an engine still starting is closed too.
        closing[slot.index] = slot.worker.submit(
            functools.partial(_close_slot_env, slot))
        slot.worker.stop()
    _, late = concurrent.futures.wait(list(closing.values()), timeout=timeout_s)
    for slot in slots:
        if slot.index in closing and closing[slot.index] in late and slot.env is not None:
            _kill_quietly(slot.env)
        slot.env = None
        slot.worker = None


class EnvPool:
    """N environments with batched reset/step over the active ones (see module doc).

    Args:
      factory: builds one environment, e.g. functools.partial(epo_jax.envs.make, name,
        **options); must be picklable for the process backend.
      num_envs: number of environments, a multiple of group_size.
      group_size: environments per group; `reset` takes num_envs // group_size episodes.
      backend: "thread" or "process".
      seed: environment i is seeded with seed + i (again after a restart).
      max_turns: turns after which a running episode is truncated.
      step_timeout_s: a reset or step that takes longer counts as a hung engine.
      start_timeout_s: time allowed to build one environment.
      max_reset_attempts: fresh engines tried for one failing reset before giving up.
    """

    def __init__(self, factory: Callable[[], TextEnv], num_envs: int, *, group_size: int = 1,
                 backend: str = "thread", seed: int = 0, max_turns: int = 30,
                 step_timeout_s: float = 60.0, start_timeout_s: float = 600.0,
                 max_reset_attempts: int = 3):
        if not callable(factory):
            raise TypeError(f"factory={factory!r} must be callable and return a TextEnv.")
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be at least 1.")
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size={group_size!r} must be positive and divide "
                             f"num_envs={num_envs}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}.")
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} must be at least 1.")
        for name, value in (("step_timeout_s", step_timeout_s),
                            ("start_timeout_s", start_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be positive.")
        if max_reset_attempts < 1:
            raise ValueError(f"max_reset_attempts={max_reset_attempts!r} must be at least 1.")
        self._make_env = (functools.partial(SubprocessEnv, factory) if backend == "process"
                          else factory)
        self.num_envs = num_envs
        self.group_size = group_size
        self.backend = backend
        self.max_turns = max_turns
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.max_reset_attempts = max_reset_attempts
        self._slots = [_Slot(i, seed + i) for i in range(num_envs)]
        self._active = np.zeros(num_envs, dtype=bool)
        self._turns = np.zeros(num_envs, dtype=np.int32)
        self._episodes: list[EpisodeSpec | None] = [None] * num_envs
        self._last_info: list[dict[str, Any]] = [{} for _ in range(num_envs)]
        self._stepping: set[int] = set()  # environments with a step_async not yet finished
        self._finalizer = weakref.finalize(self, _close_slots, self._slots, 30.0)
        for slot in self._slots:
            self._start(slot)
        failed = self._wait_created(self._slots)
        if failed:
            self.close()
            raise EnvCrashed("could not build environments "
                             + "; ".join(f"{i}: {reason}" for i, reason in failed.items()))

    # --- Slots -------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        slot.worker = _SlotThread(f"epo-jax-env-{slot.index}")
        slot.env = None
        slot.created = slot.worker.submit(functools.partial(_build_slot_env, slot,
                                                            self._make_env))

    def _restart(self, slot: _Slot, reason: str) -> None:
        """Discards a slot's engine and builds a fresh one in the background."""
        logger.warning("environment %d: %s; restarting its engine", slot.index, reason)
        old_env, old_worker = slot.env, slot.worker
        if old_env is not None:
            # A hung close()/kill() must not block the pool.
            threading.Thread(target=_kill_quietly, args=(old_env,), daemon=True).start()
        if old_worker is not None:
            old_worker.stop()
        slot.restarts += 1
        self._start(slot)

    def _wait_created(self, slots: Sequence[_Slot]) -> dict[int, str]:
        """Waits until the given slots hold an environment; returns {index: failure}."""
        outcomes = self._gather({slot.index: slot.created for slot in slots},
                                self.start_timeout_s, "start")
        return {i: reason for i, (ok, reason) in outcomes.items() if not ok}

    @staticmethod
    def _gather(futures: Mapping[int, concurrent.futures.Future], timeout_s: float,
                what: str, reraise: tuple[type[BaseException], ...] = (), limit_s: float | None = None,
                ) -> dict[int, tuple[bool, Any]]:
        """Waits for the futures (timeout_s at most); {index: (True, result) | (False, failure text)}.

        An error of a type in `reraise` is raised instead of being reported as a failure. A late
        future is reported as not answering within `limit_s` (default timeout_s).
        """
        _, late = concurrent.futures.wait(list(futures.values()), timeout=timeout_s)
        outcomes = {}
        for index, future in futures.items():
            if future in late:
                outcomes[index] = (False, f"{what} did not answer within {limit_s or timeout_s:g} s")
                continue
            error = future.exception()
            if error is None:
                outcomes[index] = (True, future.result())
            elif isinstance(error, reraise):
                raise error
            else:
                if not isinstance(error, EnvCrashed):
                    logger.warning("environment %d: %s raised", index, what,
                                   exc_info=(type(error), error, error.__traceback__))
                outcomes[index] = (False, f"{what} raised {type(error).__name__}: {error}")
        return outcomes

    # --- Public API --------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return self.num_envs // self.group_size

    @property
    def group_ids(self) -> np.ndarray:
        """int32 [num_envs]: the group of each environment."""
        return np.arange(self.num_envs, dtype=np.int32) // self.group_size

    @property
    def active(self) -> np.ndarray:
        """bool [num_envs]: environments whose episode is still running (a copy)."""
        return self._active.copy()

    @property
    def turns(self) -> np.ndarray:
        """int32 [num_envs]: actions taken in the current episode (a copy)."""
        return self._turns.copy()

    @property
    def episodes(self) -> list[EpisodeSpec | None]:
        """The episode each environment plays (None before the first reset)."""
        return list(self._episodes)

    @property
    def restarts(self) -> np.ndarray:
        """int32 [num_envs]: how often each environment's engine was rebuilt."""
        return np.array([slot.restarts for slot in self._slots], dtype=np.int32)

    def env(self, index: int) -> TextEnv:
        """The environment now in slot `index`; it is replaced when its engine restarts.

        Waits for a restarting slot's new engine.
        """
        slot = self._slots[index]
        slot.created.result(timeout=self.start_timeout_s)
        return slot.env

    def _check_index(self, index: Any, what: str) -> None:
        """Raises "<what> <index>; environment indices are 0..N-1." unless 0 <= index < N."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_envs:
            raise ValueError(f"{what} {index!r}; environment indices are 0..{self.num_envs - 1}.")

    def _start_with_retries(self, indices, start, timeout_s: float, what: str,
                            reraise: tuple[type[BaseException], ...] = ()) -> dict[int, ResetResult]:
        """Runs start(index, env) -> (obs, info) on the named slots' workers. A slot whose
        engine fails or hangs is rebuilt and tried again, up to max_reset_attempts times, then
        EnvCrashed is raised; exceptions of the `reraise` types propagate as they are."""
        results: dict[int, ResetResult] = {}
        pending = [self._slots[index] for index in indices]
        failures: dict[int, str] = {}
        for _ in range(self.max_reset_attempts):
            failures = self._wait_created(pending)
            futures = {slot.index: slot.worker.submit(functools.partial(start, slot.index, slot.env))
                       for slot in pending if slot.index not in failures}
            for index, (ok, value) in self._gather(futures, timeout_s, what, reraise=reraise).items():
                if ok:
                    results[index] = ResetResult(*value)
                else:
                    failures[index] = value
            for index, reason in failures.items():
                self._restart(self._slots[index], reason)
            pending = [self._slots[index] for index in sorted(failures)]
            if not pending:
                break
        if pending:
            raise EnvCrashed(f"{what} failed {self.max_reset_attempts} times for environments "
                             + "; ".join(f"{i}: {reason}" for i, reason in failures.items()))
        return results

    def reset(self, episodes: Sequence[EpisodeSpec | tuple[str, int]]) -> list[ResetResult]:
        """Starts one episode per group (environment i plays episodes[i // group_size]).

        Returns one ResetResult per environment. An environment whose reset fails is
        rebuilt and tried again, up to max_reset_attempts times, then EnvCrashed is raised.
        """
        if isinstance(episodes, (str, bytes)) or len(episodes) != self.num_groups:
            raise ValueError(f"reset() takes one episode per group: {self.num_groups} "
                             f"(num_envs={self.num_envs} / group_size={self.group_size}), got "
                             f"{episodes!r:.200}.")
        specs = [EpisodeSpec(str(task), int(variation)) for task, variation in episodes]

        def start(index: int, env: TextEnv):
            spec = specs[index // self.group_size]
            return env.reset(spec.task, spec.variation)

        started = self._start_with_retries(range(self.num_envs), start, self.step_timeout_s, "reset")
        results = [started[index] for index in range(self.num_envs)]
        for index, result in enumerate(results):
            self._episodes[index] = specs[index // self.group_size]
            self._last_info[index] = result.info
        self._active[:] = True
        self._turns[:] = 0
        return results

    def step(self, actions: Mapping[int, str]) -> dict[int, StepResult]:
        """Steps the named active environments in parallel: {env index: action text}.

        Returns {env index: StepResult}. An environment leaves the active set when its
        result is done or truncated (turn limit or crash).
        """
        if not isinstance(actions, Mapping):
            raise TypeError(f"actions must map environment index -> action text, got "
                            f"{type(actions).__name__}.")
        for index, action in actions.items():
            self._check_step(index, action, "actions has key", f"actions[{index}]")
        pending = [self.step_async(int(index), action) for index, action in actions.items()]
        return {step.index: self.finish_step(step) for step in pending}

    def _check_step(self, index: Any, action: Any, what_index: str, what_action: str) -> None:
        self._check_index(index, what_index)
        if not self._active[index]:
            raise ValueError(f"environment {index} is not active (its episode ended); "
                             "reset() before stepping it again.")
        if int(index) in self._stepping:
            raise ValueError(f"environment {index} has a step in progress; finish_step() it first.")
        if not isinstance(action, str):
            raise TypeError(f"{what_action} must be a str, got {type(action).__name__}: {action!r:.100}")

    def step_async(self, index: int, action: str) -> PendingStep:
        """Submits one active environment's action to its worker and returns at once; the step
        runs while the caller does other work. `finish_step` gives its StepResult, with the same
        turn limit and fault handling as `step` (a step that has not answered within
        step_timeout_s of its submission counts as hung)."""
        self._check_step(index, action, "step_async() got index", "action")
        slot = self._slots[int(index)]
        self._stepping.add(int(index))
        return PendingStep(int(index), slot.worker.submit(functools.partial(slot.env.step, action)),
                           time.monotonic() + self.step_timeout_s)

    def finish_step(self, pending: PendingStep) -> StepResult:
        """Waits for a step of `step_async` (until its deadline at most) and returns its result; the
        environment leaves the active set when the result is done or truncated."""
        index = pending.index
        if index not in self._stepping:
            raise ValueError(f"environment {index} has no step in progress (finish_step() was called twice?).")
        remaining = max(0.0, pending.deadline - time.monotonic())
        ok, value = self._gather({index: pending.future}, remaining, "step", limit_s=self.step_timeout_s)[index]
        self._stepping.discard(index)
        if ok:
            observation, reward, done, info = value
            self._turns[index] += 1
            truncated = bool(not done and self._turns[index] >= self.max_turns)
            self._last_info[index] = info
            self._active[index] = not (done or truncated)
            return StepResult(observation, float(reward), bool(done), truncated, False, info)
        info = {**self._last_info[index], "won": False, "crash_reason": value}
        self._active[index] = False
        self._restart(self._slots[index], value)
        return StepResult("", 0.0, False, True, True, info)

    @staticmethod
    def wait_steps(pending: Sequence[PendingStep]) -> None:
        """Blocks until one of the pending steps is ready (answered or past its deadline)."""
        if pending and not any(step.ready() for step in pending):
            timeout = max(0.0, min(step.deadline for step in pending) - time.monotonic())
            concurrent.futures.wait([step.future for step in pending], timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def stop(self, indices: Sequence[int]) -> None:
        """Ends the named environments' episodes without a step: they leave the active set
        (until `reset` or `replay` starts them again)."""
        for index in indices:
            self._check_index(index, "stop() got index")
            self._active[int(index)] = False

    def replay(self, requests: Mapping[int, Replay]) -> dict[int, ResetResult]:
        """Starts each named environment on its own episode, replaying its action prefix.

        {env index: Replay} -> {env index: ResetResult} holding the observation and info after
        the last replayed action. The environments then count as active with len(actions)
        turns taken (the turn limit applies to the whole episode). A replay whose engine
        crashes or hangs is retried on a fresh engine, like a failing reset, up to
        max_reset_attempts times, then EnvCrashed is raised; ReplayError (an engine that is
        not deterministic, or a replay that diverged) is raised as it is.
        """
        if not isinstance(requests, Mapping):
            raise TypeError(f"requests must map environment index -> Replay, got "
                            f"{type(requests).__name__}.")
        for index, request in requests.items():
            self._check_index(index, "replay() got index")
            if not isinstance(request, Replay):
                raise TypeError(f"requests[{index}] must be a Replay, got {request!r:.200}")
            if self._active[index]:
                raise ValueError(f"environment {index} is still playing an episode; stop() it "
                                 "before replaying another into it.")
            if len(request.actions) >= self.max_turns:
                raise ValueError(f"requests[{index}] replays {len(request.actions)} actions, "
                                 f"which reaches the turn limit max_turns={self.max_turns}.")
        requests = {int(index): request for index, request in requests.items()}

        def start(index: int, env: TextEnv):
            request = requests[index]
            task, variation = str(request.episode[0]), int(request.episode[1])
            if request.actions or request.expected is not None:
                return env.replay(task, variation, list(request.actions), request.expected)
            return env.reset(task, variation)  # a plain start works on any engine, deterministic or not

        # The timeout grows with the prefix: each replayed action is one step.
        longest = max((len(request.actions) for request in requests.values()), default=0)
        results = self._start_with_retries(requests, start, self.step_timeout_s * (1 + longest), "replay",
                                           reraise=(ReplayError,))
        for index, result in results.items():
            request = requests[index]
            self._episodes[index] = EpisodeSpec(str(request.episode[0]), int(request.episode[1]))
            self._last_info[index] = result.info
            self._active[index] = True
            self._turns[index] = len(request.actions)
        return {index: results[index] for index in requests}

    def close(self) -> None:
        """Closes every environment (killing those that hang); safe to call twice."""
        self._finalizer()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
