"""Environment steps/s: our ScienceWorld step against the package's own step(), 1-8 engines.

Every variant runs N ScienceWorld engines (one JVM each) in epo_jax's EnvPool (thread
backend), stepped together, each replaying the same cycle of actions in its own variation
of "boil"; only batched steps are timed (not JVM start-up, warm-up or loading), best of
`--repeats` timings of `--rounds` batched steps:

  - ours: `ScienceWorldEnv.step` (the server's step + score + completed);
  - ours + EPO prompt lists: the same with `available_actions=True` (action templates and
    objects, which EPO's ScienceWorld prompt shows);
  - reference: the package's `ScienceWorldEnv.step()`, which also rebuilds every valid
    action, the look-around text, the inventory and the task description each step.
    Its JVMs get the same options as ours (through JAVA_TOOL_OPTIONS).

The ALFWorld rows come from `alfworld_rows(n_envs_list)` in bench/envs_alfworld.py when
that file is present (rows are dicts: environment, num_envs, steps_per_s,
reference_steps_per_s, ratio, reference).

    python bench/envs.py [--envs 1 4 8] [--rounds 30] [--repeats 3] [--skip-alfworld]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import scienceworld

from epo_jax.envs import EnvPool, TextEnv
from epo_jax.envs.scienceworld import DEFAULT_JVM_OPTIONS, ScienceWorldEnv

JVM_HEAP = "512m"
# A tour of the boil world: moves, looks, pick-ups, and a few commands the engine rejects.
ACTIONS = ("look around", "open door to kitchen", "go to kitchen", "look around",
           "pick up thermometer", "open cupboard", "look at stove", "inventory",
           "fly to the moon", "go to hallway", "look around", "go to art studio",
           "look at table", "go to hallway", "wait1")
WARMUP_ROUNDS = 2 * len(ACTIONS)


class PackageStepEnv(TextEnv):
    """The package's ScienceWorldEnv, driven through its own load/reset/step()."""

    def __init__(self):
        self._env = scienceworld.ScienceWorldEnv("", envStepLimit=10**9)

    def reset(self, task=None, variation=None):
        self._env.load(task, variation, "easy")
        return self._env.reset()

    def step(self, action):
        return self._env.step(action)

    def kill(self):
        self._env._gateway.java_process.kill()

    def close(self):
        process = self._env._gateway.java_process
        # Its close() writes to the JVM's stdin, which raises BrokenPipeError once the JVM
        # has exited; wait for the exit so that its __del__ finds nothing left to do.
        with contextlib.suppress(BrokenPipeError):
            self._env.close()
        process.wait(timeout=30)


@contextlib.contextmanager
def _java_tool_options(options: Sequence[str]) -> Iterator[None]:
    previous = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = " ".join(options)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["JAVA_TOOL_OPTIONS"]
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = previous


def _steps_per_s(pool: EnvPool, num_envs: int, rounds: int, repeats: int) -> float:
    """Batched steps/s of the first `num_envs` engines of the pool, best of `repeats`."""
    pool.reset([("boil", i) for i in range(pool.num_envs)])
    active = range(num_envs)
    for turn in range(WARMUP_ROUNDS):
        pool.step({i: ACTIONS[(turn + i) % len(ACTIONS)] for i in active})
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for turn in range(rounds):
            results = pool.step({i: ACTIONS[(turn + i) % len(ACTIONS)] for i in active})
            if any(r.crashed or r.done for r in results.values()):
                raise RuntimeError(f"an engine stopped during the benchmark: {results}")
        best = max(best, num_envs * rounds / (time.perf_counter() - start))
    return best


def _measure(factory: Callable[[], TextEnv], n_envs_list: Sequence[int], rounds: int,
             repeats: int) -> dict[int, float]:
    with EnvPool(factory, max(n_envs_list), max_turns=10**9, step_timeout_s=600.0) as pool:
        return {n: _steps_per_s(pool, n, rounds, repeats) for n in n_envs_list}


def scienceworld_rows(n_envs_list: Sequence[int] = (1, 4, 8), rounds: int = 30,
                      repeats: int = 3) -> list[dict[str, Any]]:
    """Rows for ours, ours + EPO prompt lists, each against the package's step()."""
    ours_factory = functools.partial(ScienceWorldEnv, jvm_heap=JVM_HEAP,
                                     jvm_options=DEFAULT_JVM_OPTIONS)
    ours = _measure(ours_factory, n_envs_list, rounds, repeats)
    lists = _measure(functools.partial(ours_factory, available_actions=True), n_envs_list,
                     rounds, repeats)
    with _java_tool_options([f"-Xmx{JVM_HEAP}", *DEFAULT_JVM_OPTIONS]):
        reference = _measure(PackageStepEnv, n_envs_list, rounds, repeats)
    rows = []
    for variant, measured in (("ours", ours), ("ours + EPO prompt lists", lists)):
        for n in n_envs_list:
            rows.append({"environment": "scienceworld", "variant": variant, "num_envs": n,
                         "steps_per_s": measured[n], "reference_steps_per_s": reference[n],
                         "ratio": measured[n] / reference[n],
                         "reference": "scienceworld.ScienceWorldEnv.step()"})
    return rows


def _alfworld_rows(n_envs_list: Sequence[int]) -> list[dict[str, Any]]:
    path = pathlib.Path(__file__).with_name("envs_alfworld.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("envs_alfworld", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.alfworld_rows(n_envs_list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=30, help="batched steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per size (best kept)")
    parser.add_argument("--skip-alfworld", action="store_true")
    args = parser.parse_args()
    rows = scienceworld_rows(args.envs, args.rounds, args.repeats)
    if not args.skip_alfworld:
        rows += _alfworld_rows(args.envs)
    print(f"Environment steps/s (summed over the batch), {os.cpu_count()} CPUs, "
          f"scienceworld {scienceworld.__version__}")
    print(f"{'environment':<13} {'variant':<24} {'envs':>4} {'steps/s':>9} "
          f"{'reference':>10} {'ratio':>6}  reference")
    for row in rows:
        print(f"{row['environment']:<13} {row.get('variant', 'ours'):<24} {row['num_envs']:>4} "
              f"{row['steps_per_s']:>9.1f} {row['reference_steps_per_s']:>10.1f} "
              f"{row['ratio']:>6.2f}  {row['reference']}")


if __name__ == "__main__":
    main()
