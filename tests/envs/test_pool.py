"""EnvPool: groups, turn limit, seeds, parallel steps, and engine faults (toy and real)."""
import os
import signal
import time

import pytest

import epo_jax.envs as envs
from epo_jax.envs import INFO_KEYS, EnvCrashed, EnvPool, EpisodeSpec, TextEnv


class CountdownEnv(TextEnv):
    """A test-only engine: an episode (task, n) is won after n "advance" actions.

    "sleep S" sleeps S seconds (a hang), "exit" ends the engine's process, "crash" raises
    EnvCrashed, and a reset of task "broken" always fails.
    """

    def __init__(self):
        self.seed_value = None
        self.task, self.variation, self.remaining = None, None, 0

    def seed(self, seed):
        self.seed_value = seed

    def _info(self, won):
        return {"won": won, "score": float(won), "task": self.task, "variation": self.variation,
                "task_description": f"advance {self.variation} times", "admissible_actions": None,
                "pid": os.getpid(), "seed": self.seed_value}

    def reset(self, task=None, variation=None):
        if task == "broken":
            raise EnvCrashed("this engine cannot load task 'broken'")
        self.task, self.variation, self.remaining = task, variation, variation
        return f"start {task}:{variation}", self._info(False)

    def step(self, action):
        if action.startswith("sleep "):
            time.sleep(float(action.split()[1]))
        elif action == "exit":
            os._exit(3)
        elif action == "crash":
            raise EnvCrashed("toy engine failure")
        elif action == "advance":
            self.remaining -= 1
        won = self.remaining <= 0
        return f"echo {action}", 10.0 * won, won, self._info(won)


def _alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _same_world(observation, other):
    """Equal up to the order in which ScienceWorld lists a container's contents."""
    return sorted(observation.splitlines()) == sorted(other.splitlines())


@pytest.fixture(params=["thread", "process"])
def backend(request):
    return request.param


def test_groups_seeds_and_turn_limit(backend):
    with EnvPool(CountdownEnv, 4, group_size=2, backend=backend, seed=100, max_turns=3) as pool:
        assert pool.num_groups == 2 and pool.group_ids.tolist() == [0, 0, 1, 1]
        first = pool.reset([EpisodeSpec("a", 2), ("b", 5)])
        assert [r.observation for r in first] == ["start a:2"] * 2 + ["start b:5"] * 2
        assert [r.info["seed"] for r in first] == [100, 101, 102, 103]
        assert all(set(INFO_KEYS) <= set(r.info) for r in first)
        pids = {r.info["pid"] for r in first}
        assert len(pids) == (4 if backend == "process" else 1)
        assert pool.episodes == [("a", 2), ("a", 2), ("b", 5), ("b", 5)]

        out = pool.step({i: "advance" for i in range(4)})
        assert all(not r.done and not r.truncated for r in out.values())
        out = pool.step({0: "advance", 2: "advance", 3: "wait", 1: "wait"})
        assert list(out) == [0, 2, 3, 1]  # answers come back in the order asked
        assert out[0].done and out[0].reward == 10.0 and out[0].info["won"]
        assert not out[1].done and not out[2].done
        assert pool.active.tolist() == [False, True, True, True]
        with pytest.raises(ValueError, match="environment 0 is not active"):
            pool.step({0: "advance"})
        out = pool.step({1: "advance", 2: "advance", 3: "advance"})
        # Turn 3 is the limit: env 1 wins on it, envs 2 and 3 are cut short.
        assert out[1].done and not out[1].truncated
        assert out[2].truncated and not out[2].done and not out[2].crashed
        assert not pool.active.any() and pool.turns.tolist() == [2, 3, 3, 3]
        assert pool.restarts.tolist() == [0, 0, 0, 0]


def test_steps_run_in_parallel():
    with EnvPool(CountdownEnv, 8, backend="thread") as pool:
        pool.reset([("a", 9)] * 8)
        start = time.perf_counter()
        pool.step({i: "sleep 0.5" for i in range(8)})
        # Serially this takes 4 s.
        assert time.perf_counter() - start < 2.0


def test_hung_step_is_truncated_and_the_engine_rebuilt(backend):
    with EnvPool(CountdownEnv, 3, backend=backend, step_timeout_s=1.0) as pool:
        first = pool.reset([("a", 2), ("b", 2), ("c", 2)])
        start = time.perf_counter()
        out = pool.step({0: "advance", 1: "sleep 60", 2: "advance"})
        assert time.perf_counter() - start < 10.0
        assert out[1].crashed and out[1].truncated and not out[1].done
        assert out[1].reward == 0.0 and not out[1].info["won"] and out[1].info["task"] == "b"
        assert "did not answer within 1 s" in out[1].info["crash_reason"]
        assert not out[0].crashed and not out[2].crashed
        assert pool.active.tolist() == [True, False, True]
        assert pool.restarts.tolist() == [0, 1, 0]
        assert pool.step({0: "advance", 2: "advance"})[2].done  # the others carry on
        again = pool.reset([("a", 1), ("b", 1), ("c", 1)])
        assert again[1].info["seed"] == first[1].info["seed"]  # reseeded after the restart
        if backend == "process":
            assert not _alive(first[1].info["pid"])
            assert again[1].info["pid"] != first[1].info["pid"]
        assert pool.step({1: "advance"})[1].done


def test_step_async_runs_beside_the_caller_and_keeps_the_turn_limit_and_faults():
    with EnvPool(CountdownEnv, 3, step_timeout_s=1.0, max_turns=2) as pool:
        pool.reset([("a", 5), ("b", 5), ("c", 5)])
        start = time.perf_counter()
        slow = pool.step_async(0, "sleep 0.5")
        hung = pool.step_async(1, "sleep 30")
        fast = pool.step_async(2, "advance")
        assert time.perf_counter() - start < 0.3  # submitted, not waited for
        with pytest.raises(ValueError, match="environment 2 has a step in progress"):
            pool.step_async(2, "advance")
        pool.wait_steps([slow, fast])
        assert fast.ready() and pool.finish_step(fast).observation == "echo advance"
        with pytest.raises(ValueError, match="environment 2 has no step in progress"):
            pool.finish_step(fast)
        assert pool.finish_step(slow).observation == "echo sleep 0.5"  # waits for it
        result = pool.finish_step(hung)  # past its deadline: a crash, the engine rebuilt
        assert result.crashed and result.truncated and "did not answer within 1 s" in result.info["crash_reason"]
        assert time.perf_counter() - start < 5.0
        assert pool.active.tolist() == [True, False, True] and pool.restarts.tolist() == [0, 1, 0]
        last = pool.finish_step(pool.step_async(2, "advance"))
        assert last.truncated and not last.done and pool.active.tolist() == [True, False, False]  # turn limit 2


def test_killed_engine_process_is_truncated_and_restarted():
    with EnvPool(CountdownEnv, 3, backend="process") as pool:
        pool.reset([("a", 5)] * 3)
        victim = pool.env(2).pid
        os.kill(victim, signal.SIGKILL)
        out = pool.step({0: "advance", 1: "exit", 2: "advance"})
        assert [out[i].crashed for i in range(3)] == [False, True, True]
        assert "died" in out[1].info["crash_reason"] and "exit code 3" in out[1].info[
            "crash_reason"]
        assert pool.restarts.tolist() == [0, 1, 1]
        fresh = pool.reset([("a", 1)] * 3)
        assert fresh[2].info["pid"] != victim
        assert all(r.done for r in pool.step({i: "advance" for i in range(3)}).values())
        pids = [pool.env(i).pid for i in range(3)]
    assert not any(_alive(pid) for pid in pids)


def test_engine_error_in_thread_backend_is_a_crash():
    with EnvPool(CountdownEnv, 2, backend="thread") as pool:
        pool.reset([("a", 3)] * 2)
        out = pool.step({0: "crash", 1: "advance"})
        assert out[0].crashed and "toy engine failure" in out[0].info["crash_reason"]
        assert not out[1].crashed


def test_reset_that_keeps_failing_raises():
    with EnvPool(CountdownEnv, 2, group_size=2, max_reset_attempts=2) as pool:
        with pytest.raises(EnvCrashed, match="reset failed 2 times.*cannot load task 'broken'"):
            pool.reset([("broken", 0)])
        assert pool.restarts.tolist() == [2, 2]
        assert pool.reset([("a", 1)])[0].observation == "start a:1"


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="group_size=3 must be positive and divide num_envs=4"):
        EnvPool(CountdownEnv, 4, group_size=3)
    with pytest.raises(ValueError, match="backend='fiber'"):
        EnvPool(CountdownEnv, 2, backend="fiber")
    with pytest.raises(ValueError, match="unknown environment 'nethack'"):
        envs.make_pool("nethack", 2)
    with EnvPool(CountdownEnv, 2, group_size=2) as pool:
        with pytest.raises(ValueError, match="one episode per group: 1"):
            pool.reset([("a", 1), ("b", 1)])
        pool.reset([("a", 1)])
        with pytest.raises(TypeError, match=r"actions\[0\] must be a str"):
            pool.step({0: 3})
        with pytest.raises(ValueError, match="key 5"):
            pool.step({5: "advance"})


# --- Real ScienceWorld engines ---------------------------------------------------------------

EPISODES = [EpisodeSpec("boil", 0), EpisodeSpec("melt", 1), EpisodeSpec("find-animal", 5),
            EpisodeSpec("chemistry-mix", 2)]


@pytest.mark.slow
def test_eight_scienceworld_engines_step_together_and_survive_faults():
    pool = envs.make_pool("scienceworld", 8, group_size=2, max_turns=30, step_timeout_s=120.0)
    try:
        first = pool.reset(EPISODES)
        pids = [pool.env(i).jvm_pid for i in range(8)]
        assert len(set(pids)) == 8 and all(_alive(pid) for pid in pids)
        for i, result in enumerate(first):
            assert (result.info["task"], result.info["variation"]) == EPISODES[i // 2]
            assert _same_world(result.observation, first[i ^ 1].observation)  # group partners
        out = pool.step({i: "look around" for i in range(8)})
        assert sorted(out) == list(range(8))
        assert all(not r.crashed and "This room is called" in r.observation for r in out.values())

        # A JVM killed mid-episode: that episode is truncated as a crash, the rest go on.
        os.kill(pids[5], signal.SIGKILL)
        out = pool.step({i: "look around" for i in range(8)})
        assert [out[i].crashed for i in range(8)] == [i == 5 for i in range(8)]
        assert out[5].truncated and out[5].info["task"] == "find-animal"
        assert "exited" in out[5].info["crash_reason"]

        # A JVM that stops answering (SIGSTOP): the step times out the same way.
        pool.step_timeout_s = 5.0
        os.kill(pids[2], signal.SIGSTOP)
        out = pool.step({i: "inventory" for i in range(8) if i != 5})
        pool.step_timeout_s = 120.0
        assert [out[i].crashed for i in sorted(out)] == [i == 2 for i in sorted(out)]
        assert "did not answer within 5 s" in out[2].info["crash_reason"]
        assert pool.active.tolist() == [True, True, False, True, True, False, True, True]
        assert pool.restarts.tolist() == [0, 0, 1, 0, 0, 1, 0, 0]

        # Both engines come back with new JVMs and play their group's episode again.
        again = pool.reset(EPISODES)
        new_pids = [pool.env(i).jvm_pid for i in range(8)]
        assert new_pids[2] not in pids and new_pids[5] not in pids
        assert not _alive(pids[2]) and not _alive(pids[5])
        assert _same_world(again[5].observation, again[4].observation)
        assert _same_world(again[2].observation, again[3].observation)
        out = pool.step({i: "look around" for i in range(8)})
        assert all(not r.crashed for r in out.values())
        final_pids = [pool.env(i).jvm_pid for i in range(8)]
    finally:
        pool.close()
    assert not any(_alive(pid) for pid in final_pids)
    pool.close()  # closing twice is harmless
