"""AEPO's entropy-balanced rollout: formulas, bookkeeping, replays on the real engines, and
run_episodes with branching on ScienceWorld and ALFWorld (docs/algorithms.md section 2 (a), (b))."""
import importlib.util
import math
import pathlib
import re

import jax
import numpy as np
import pytest

import epo_jax.envs as envs
from epo_jax.envs import EnvPool, EpisodeSpec, Replay, ReplayError, TextEnv
from epo_jax.rollout import branching
from epo_jax.rollout.agent_loop import Generation, run_episodes
from epo_jax.rollout.branching import BranchingParams, EntropyBalancedBrancher, Fork

_BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"


def base_config():
    spec = importlib.util.spec_from_file_location("epo_base_config_branching", _BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --- Formulas against numpy written from the spec -------------------------------------------

def test_initial_rollouts_match_the_spec():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 33))
        h_root, h_tool = rng.uniform(0, 1, 2)
        beta = float(rng.choice([0.0, 0.5, 1.0, 5.0, 40.0]))
        want = int(np.clip(int(n * (1.0 / (1.0 + np.exp(-beta * (h_root - h_tool))))) + 1, 1, n))
        assert branching.initial_rollouts(n, h_root, h_tool, beta) == want
    # The default beta = 0.5 keeps m within [int(0.378 n) + 1, int(0.622 n) + 1] for H in [0, 1].
    assert branching.initial_rollouts(8, 0.0, 1.0, 0.5) == 4
    assert branching.initial_rollouts(8, 1.0, 0.0, 0.5) == 5
    assert branching.initial_rollouts(8, 0.3, 0.3, 0.5) == 5
    assert branching.initial_rollouts(1, 0.9, 0.0, 50.0) == 1
    assert branching.sigmoid(-800.0) == 0.0 and branching.sigmoid(800.0) == 1.0


def test_fixed_initial_rollouts():
    assert [branching.fixed_initial_rollouts(n, 0.5) for n in (1, 2, 3, 8, 12, 16)] == \
        [1, 1, 2, 4, 6, 8]
    assert branching.fixed_initial_rollouts(8, 1.0) == 8
    assert branching.fixed_initial_rollouts(8, 0.01) == 1


def test_branch_probability_matches_the_spec():
    rng = np.random.default_rng(1)
    u = rng.uniform(0, 1, 500)
    h_now, h_first = rng.uniform(0, 1, (2, 500))
    streak = rng.integers(0, 30, 500)
    want = (u + 0.2 * (h_now - h_first)) * np.maximum(0.0, 1.0 - 0.05 * streak)
    got = [branching.branch_probability(*args, weight=0.2, decay=0.05)
           for args in zip(u, h_now, h_first, streak)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # After 20 consecutive forking turns the decay forbids any further fork.
    assert branching.branch_probability(0.99, 1.0, 0.0, 20, 0.2, 0.05) == 0.0


def test_turn_entropy_is_the_normalised_mean_of_the_first_tokens():
    entropy = np.array([3.0, 1.0, 2.0, 8.0, 9.0], np.float32)
    assert branching.turn_entropy(entropy, 3, 49152) == pytest.approx(2.0 / np.log(49152))
    assert branching.turn_entropy(entropy, 20, 100) == pytest.approx(entropy.mean() / np.log(100))
    assert branching.turn_entropy(np.zeros(0), 20, 100) == 0.0
    # The largest possible entropy (uniform over the vocabulary) normalises to 1.
    assert branching.turn_entropy([np.log(50.0)] * 4, 20, 50) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        branching.turn_entropy(entropy, 0, 100)


def test_config_fields_defaults_and_validation():
    from epo_jax.config import ConfigError, validate
    config = base_config()
    assert config.rollout.branching is False
    params = BranchingParams.from_config(config.rollout)
    assert params == BranchingParams()  # the config's defaults are AEPO's
    assert (params.beta, params.weight, params.decay, params.threshold, params.initial_fraction) == \
        (0.5, 0.2, 0.05, 0.5, 0.5)
    config.rollout.branching = True
    validate(config)
    for field, value, words in (
            ("env.group_size", 1, "rollout.branching"),
            ("rollout.branch_monitor_turns", 31, "env.max_turns"),
            ("rollout.branch_monitor_turns", 1, ">= 2"),
            ("rollout.branch_threshold", 0.0, "> 0.0"),
            ("rollout.branch_initial_fraction", 1.5, "<= 1.0"),
            ("rollout.branch_w", -0.1, ">= 0.0"),
            ("rollout.branch_fill", 1, "True or False")):
        bad = base_config()
        bad.rollout.branching = True
        section, name = field.split(".")
        with bad.ignore_type():  # a command line can hand over a value of another type
            bad[section][name] = value
        with pytest.raises(ConfigError, match=re.escape(words)):
            validate(bad)


# --- Bookkeeping ------------------------------------------------------------------------------

def _params(**overrides):
    return BranchingParams(**overrides)


def test_premonitoring_probe_then_m_minus_one_fresh_rollouts():
    n = 8
    # w = 0 and threshold 1: p = U < 1, so nothing forks and only the starts are seen.
    brancher = EntropyBalancedBrancher(2, n, _params(weight=0.0, threshold=1.0, fill=False),
                                       np.random.default_rng(0))
    assert brancher.start() == [0, 8]  # one probe per group
    probe_entropy = {0: [0.1, 0.7, 0.9], 8: [0.6, 0.2, 0.1]}
    for turn in range(3):
        for slot in (0, 8):
            brancher.observe(slot, probe_entropy[slot][turn])
        plan = brancher.after_turn({0, 8})
        if turn < 2:  # still monitoring: nothing starts, nothing forks
            assert plan.starts == [] and plan.forks == []
            assert brancher.monitoring(0) and brancher.monitoring(1)
    m0 = branching.initial_rollouts(n, 0.1, np.mean([0.7, 0.9]), 0.5)
    m1 = branching.initial_rollouts(n, 0.6, np.mean([0.2, 0.1]), 0.5)
    assert (m0, m1) == (4, 5)
    assert plan.starts == list(range(1, m0)) + list(range(9, 8 + m1))
    assert brancher.initial_rollouts == [m0, m1]
    assert brancher.h_root == [0.1, 0.6]
    assert brancher.h_tool == pytest.approx([0.8, 0.15])
    assert plan.forks == []


def test_probe_that_ends_early_falls_back_to_h_root():
    brancher = EntropyBalancedBrancher(1, 4, _params(), np.random.default_rng(0))
    brancher.start()
    brancher.observe(0, 0.4)
    plan = brancher.after_turn(set())  # the probe's episode ended on turn 0
    assert brancher.h_tool == [0.4]
    m = branching.initial_rollouts(4, 0.4, 0.4, 0.5)
    assert plan.starts == list(range(1, m))


def test_forced_forks_respect_the_budget_and_one_fork_per_rollout():
    n = 4
    assert np.random.default_rng(2).random() < 0.5  # the first draw below
    brancher = EntropyBalancedBrancher(1, n, _params(premonitor=False, initial_fraction=0.25,
                                                     weight=10.0), np.random.default_rng(2))
    assert brancher.start() == [0]
    brancher.observe(0, 0.1)
    assert brancher.after_turn({0}).forks == []  # dH = 0 on a rollout's first turn: p = U < 0.5
    running = {0}
    forks_per_turn = []
    for turn in range(6):
        for slot in running:
            brancher.observe(slot, 0.9)  # dH = 0.8: p = U + 8 >= 0.5 until the decay bites
        plan = brancher.after_turn(running)
        forks_per_turn.append(plan.forks)
        parents = [f.parent for f in plan.forks]
        assert len(parents) == len(set(parents)) and set(parents) <= running
        running |= {f.child for f in plan.forks}
        assert brancher.used(0) <= n
    assert forks_per_turn[0] == [Fork(0, 1)]
    assert forks_per_turn[1] == [Fork(0, 2), Fork(1, 3)]
    assert all(not forks for forks in forks_per_turn[2:])  # budget spent
    assert brancher.used(0) == n and brancher.num_forks == 3
    assert brancher.h_first(3) == brancher.h_first(1) == brancher.h_first(0) == 0.1


def test_consecutive_branch_decay_and_streak_reset():
    # One rollout keeps running (its branches are left out of `active`): one draw per turn.
    # w = 0 and decay 0.25: p = U * max(0, 1 - 0.25 l), so a third forking turn in a row is
    # impossible (p <= 0.5 U) and l must fall back to 0 after it.
    params = _params(premonitor=False, initial_fraction=1 / 64, weight=0.0, decay=0.25)
    brancher = EntropyBalancedBrancher(1, 64, params, np.random.default_rng(3))
    draws = np.random.default_rng(3)
    brancher.start()
    streak, next_child, streaks = 0, 1, []
    for turn in range(40):
        brancher.observe(0, 0.5)
        plan = brancher.after_turn({0})
        fork = draws.random() * max(0.0, 1.0 - 0.25 * streak) >= 0.5
        assert plan.forks == ([Fork(0, next_child)] if fork else [])
        next_child += fork
        streak = streak + 1 if fork else 0
        assert brancher.streak(0) == streak <= 2
        streaks.append(streak)
    assert 2 in streaks and 1 in streaks  # the decay was reached, not just avoided


def test_fill_starts_one_fresh_rollout_when_a_group_has_none_running():
    brancher = EntropyBalancedBrancher(2, 3, _params(premonitor=False, initial_fraction=0.34,
                                                     threshold=1.0), np.random.default_rng(0))
    assert brancher.start() == [0, 3]
    brancher.observe(0, 0.2)
    brancher.observe(3, 0.2)
    plan = brancher.after_turn({3})  # group 0's only rollout ended
    assert plan.starts == [1] and plan.forks == []
    brancher.observe(1, 0.2)
    brancher.observe(3, 0.2)
    assert brancher.after_turn({1, 3}).starts == []
    brancher.observe(1, 0.2)
    assert brancher.after_turn(set()).starts == [2, 4]
    brancher.observe(2, 0.2)
    brancher.observe(4, 0.2)
    assert brancher.after_turn(set()).starts == [5]  # group 0 is spent
    assert brancher.used(0) == 3 and brancher.used(1) == 3
    off = EntropyBalancedBrancher(1, 3, _params(premonitor=False, initial_fraction=0.34,
                                                fill=False), np.random.default_rng(0))
    off.start()
    off.observe(0, 0.2)
    assert off.after_turn(set()).starts == []


def test_random_schedules_keep_every_invariant():
    rng = np.random.default_rng(7)
    for trial in range(200):
        groups, n = int(rng.integers(1, 4)), int(rng.integers(2, 9))
        params = _params(premonitor=bool(rng.integers(2)), monitor_turns=int(rng.integers(2, 5)),
                         weight=float(rng.choice([0.2, 2.0])), fill=bool(rng.integers(2)))
        brancher = EntropyBalancedBrancher(groups, n, params, np.random.default_rng(trial))
        running = set(brancher.start())
        used = set(running)
        for _ in range(30):
            for slot in running:
                brancher.observe(slot, float(rng.uniform()))
            still = {s for s in running if rng.uniform() > 0.2}
            plan = brancher.after_turn(still)
            new = plan.starts + [f.child for f in plan.forks]
            assert len(new) == len(set(new)) and not set(new) & used  # slots are used once
            for parent, child in plan.forks:
                assert parent in still and parent // n == child // n
            assert len({f.parent for f in plan.forks}) == len(plan.forks)
            used |= set(new)
            for g in range(groups):
                assert brancher.used(g) == sum(s // n == g for s in used) <= n
            running = still | set(new)
            if not running:
                break


# --- Test engines and a scripted sampler ----------------------------------------------------

class LineWorld(TextEnv):
    """A test-only deterministic engine: walk a line from 0; reaching `variation` wins."""

    deterministic = True

    def reset(self, task=None, variation=None):
        self.task, self.goal, self.pos = task, int(variation), 0
        return self._observation(), self._info(False)

    def _observation(self):
        return f"You stand at {self.pos}."

    def _info(self, won):
        return {"won": won, "score": float(self.pos), "task": self.task, "variation": self.goal,
                "task_description": f"walk to {self.goal}",
                "admissible_actions": ["go left", "go right", "wait"]}

    def step(self, action):
        self.pos += {"go left": -1, "go right": 1}.get(action, 0)
        won = self.pos == self.goal
        return self._observation(), 10.0 * won, won, self._info(won)


class NoisyWorld(LineWorld):
    """Claims determinism but shows a fresh random number every turn."""

    def _observation(self):
        return f"You stand at {self.pos}; the wind blows {np.random.default_rng().integers(1 << 30)}."


class UndeclaredWorld(LineWorld):
    deterministic = False


@pytest.fixture(scope="module")
def tokenizer(make_chatml_tokenizer):
    corpus = ["You are an expert agent. Your task is to boil water. Your admissible actions",
              "This room is called the kitchen. In it, you see: a stove, a sink, a counter.",
              "<think> reason </think> <action> go to kitchen </action> look around inventory",
              "You are at loc 1. On the countertop 1, you see a mug 1. go to cabinet 2, take"] * 20
    return make_chatml_tokenizer(corpus, vocab_size=600)


_STEPS = re.compile(r"You have already taken (\d+) step")
_ADMISSIBLE = re.compile(r"admissible actions for the current step are:\n\[\n(.*?)\n\]", re.S)
_OBJECTS = re.compile(r"Objects and places you can name: \[(.*?)\]\n", re.S)


def admissible_choice(prompt, rng):
    """Any action the prompt lists as admissible (ALFWorld, the line world)."""
    listed = [a.strip().strip("'") for a in _ADMISSIBLE.search(prompt).group(1).split(",\n")]
    return listed[int(rng.integers(len(listed)))]


def scienceworld_choice(prompt, rng):
    """A command on an object the prompt names (never "focus on", which can end the episode)."""
    objects = [o.strip() for o in _OBJECTS.search(prompt).group(1).split(",") if o.strip()]
    target = objects[int(rng.integers(len(objects)))]
    verb = rng.choice(["look at", "open", "go to", "pick up", "look around"],
                      p=[0.35, 0.2, 0.2, 0.15, 0.1])
    return "look around" if verb == "look around" else f"{verb} {target}"


class ScriptedSampler:
    """A test-only policy: a valid reply naming an action chosen by `choose` from the prompt.

    Its entropies are chosen, not computed: H = 0.1 of the maximum on a rollout's first turn and
    0.9 on later turns, so the probe measures H_root = 0.1, H_tool = 0.9, and every later turn
    has dH = 0.8, which with a large w forces a fork whenever the budget allows.
    """

    def __init__(self, tokenizer, choose):
        self.tokenizer = tokenizer
        self.choose = choose
        self.vocab_size = len(tokenizer)
        self.calls = []

    def __call__(self, prompt_ids, keys):
        out = []
        for row, ids in enumerate(prompt_ids):
            prompt = self.tokenizer.decode(ids)
            steps = _STEPS.search(prompt)
            h = 0.1 if steps is None else 0.9
            seed = np.asarray(jax.random.key_data(keys[row])).tolist()  # the reply's own key
            action = self.choose(prompt, np.random.default_rng(seed))
            text = f"<think>step {0 if steps is None else steps.group(1)}</think> <action>{action}</action>"
            reply = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)
            out.append(Generation(ids=reply, logprobs=np.full(len(reply), -1.0, np.float32),
                                  entropy=np.full(len(reply), h * math.log(self.vocab_size),
                                                  np.float32), text=text))
        self.calls.append(len(prompt_ids))
        return out


def branching_config(env_name, group_size, num_groups, max_turns, **rollout):
    config = base_config()
    config.env.name = env_name
    config.env.group_size = group_size
    config.env.num_groups = num_groups
    config.env.max_turns = max_turns
    config.rollout.max_prompt_len = 16384
    config.rollout.engine = "turns"  # the scripted sampler answers whole turns (a GenerateFn)
    config.rollout.branching = True
    for key, value in rollout.items():
        config.rollout[key] = value
    return config


def check_rollout(rollout, *, num_groups, group_size, specs, fill):
    """The rollout is well formed: ids, turns, rewards, groups and the branch tree agree."""
    episodes, samples = rollout.episodes, rollout.samples
    # An episode's id is its pool slot, fixed when it starts: episodes come in slot order, and
    # slot i belongs to group i // group_size.
    ids = [e.traj_id for e in episodes]
    assert ids == sorted(set(ids)) and all(0 <= i < num_groups * group_size for i in ids)
    assert all(e.group_id == e.traj_id // group_size for e in episodes)
    by_id = {e.traj_id: e for e in episodes}
    by_traj = {}
    for s in samples:
        by_traj.setdefault(s.traj_id, []).append(s)
    assert sorted(by_traj) == ids
    sizes = np.bincount([e.group_id for e in episodes], minlength=num_groups)
    assert sizes.max() <= group_size  # never more than the budget
    if fill:
        assert sizes.tolist() == [group_size] * num_groups
    for e in episodes:
        turns = by_traj[e.traj_id]
        assert [s.turn_index for s in turns] == list(range(e.num_turns)) and e.num_turns >= 1
        assert all(s.group_id == e.group_id for s in turns)
        assert all(s.episode_reward == e.reward for s in turns)
        assert [s.last_turn for s in turns] == [False] * (e.num_turns - 1) + [True]
        assert (e.task, e.variation) == tuple(specs[e.group_id])
        assert sum(not s.valid_format for s in turns) == e.invalid_turns == 0
        if e.parent < 0:
            assert e.branch_turn == 0
            continue
        parent = by_id[e.parent]
        assert parent.group_id == e.group_id and 1 <= e.branch_turn < parent.num_turns
        ancestors = by_traj[parent.traj_id]
        for mine, theirs in zip(turns[:e.branch_turn], ancestors[:e.branch_turn]):
            # The shared turns are the parent's, sample for sample.
            assert mine is not theirs
            for field in ("prompt_ids", "response_ids", "response_logprobs", "response_entropy"):
                np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))
            assert (mine.anchor_id, mine.turn_index, mine.penalty) == \
                (theirs.anchor_id, theirs.turn_index, theirs.penalty)
        # The branch's first own turn saw exactly the prompt its parent saw at that turn.
        np.testing.assert_array_equal(turns[e.branch_turn].prompt_ids,
                                      ancestors[e.branch_turn].prompt_ids)
    branches = [e for e in episodes if e.parent >= 0]
    assert rollout.stats["rollout/branches"] == len(branches)
    assert rollout.stats["rollout/fresh_rollouts"] == len(episodes) - len(branches)
    assert rollout.stats["rollout/replayed_steps"] == sum(e.branch_turn for e in branches)
    return branches


# --- run_episodes with toy engines (fast) ---------------------------------------------------

@pytest.mark.parametrize("premonitor", [True, False])
def test_run_episodes_with_branching_on_a_deterministic_toy_engine(tokenizer, premonitor):
    specs = [EpisodeSpec("line", 9), EpisodeSpec("line", 7)]
    config = branching_config("alfworld", 4, 2, 8, branch_w=20.0, branch_premonitor=premonitor,
                              branch_initial_fraction=0.25)
    sampler = ScriptedSampler(tokenizer, admissible_choice)
    with EnvPool(LineWorld, 8, group_size=4, max_turns=8) as pool:
        rollout = run_episodes(pool, sampler, tokenizer, specs, jax.random.key(0), config=config)
        again = run_episodes(pool, ScriptedSampler(tokenizer, admissible_choice), tokenizer,
                             specs, jax.random.key(0), config=config)
    branches = check_rollout(rollout, num_groups=2, group_size=4, specs=specs, fill=True)
    assert branches  # w = 20 forces forks
    if premonitor:
        # The probe measured H_root = 0.1, H_tool = 0.9: m = int(4 sigmoid(-0.4)) + 1 = 2.
        assert rollout.stats["branching/h_root"] == pytest.approx(0.1, rel=1e-5)
        assert rollout.stats["branching/h_tool"] == pytest.approx(0.9, rel=1e-5)
        assert rollout.stats["branching/initial_rollouts"] == 2
        assert sampler.calls[:3] == [2, 2, 2]  # the two probes play alone for three turns
    else:
        assert "branching/h_root" not in rollout.stats
        assert sampler.calls[0] == 2  # one rollout per group from the start (0.25 x 4)
    # The same key gives the same tree.
    assert [(e.parent, e.branch_turn, e.num_turns) for e in again.episodes] == \
        [(e.parent, e.branch_turn, e.num_turns) for e in rollout.episodes]


def test_branching_off_or_groups_of_one_play_every_slot_from_the_start(tokenizer):
    specs = [EpisodeSpec("line", 3)]
    for branching_on, group_size in ((False, 3), (True, 1)):
        config = branching_config("alfworld", group_size, 1, 4, branch_w=20.0)
        config.rollout.branching = branching_on
        with EnvPool(LineWorld, group_size, group_size=group_size, max_turns=4) as pool:
            rollout = run_episodes(pool, ScriptedSampler(tokenizer, admissible_choice), tokenizer,
                                   specs, jax.random.key(1), config=config)
        assert len(rollout.episodes) == group_size
        assert all(e.parent == -1 for e in rollout.episodes)
        assert "rollout/branches" not in rollout.stats


@pytest.mark.parametrize("backend", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_an_engine_that_does_not_replay_fails_with_a_clear_error(tokenizer, backend):
    specs = [EpisodeSpec("line", 9)]
    config = branching_config("alfworld", 3, 1, 6, branch_w=20.0, branch_premonitor=False,
                              branch_initial_fraction=0.34)
    with EnvPool(NoisyWorld, 3, group_size=3, max_turns=6, backend=backend) as pool:
        with pytest.raises(ReplayError, match=r"diverged at the reset.*not deterministic"):
            run_episodes(pool, ScriptedSampler(tokenizer, admissible_choice), tokenizer, specs,
                         jax.random.key(0), config=config)
    with EnvPool(UndeclaredWorld, 3, group_size=3, max_turns=6, backend=backend) as pool:
        with pytest.raises(ReplayError, match="does not declare deterministic episodes"):
            run_episodes(pool, ScriptedSampler(tokenizer, admissible_choice), tokenizer, specs,
                         jax.random.key(0), config=config)
        # Starting fresh episodes never needs a replay: a plain run still works on such engines.
        config.rollout.branching = False
        assert len(run_episodes(pool, ScriptedSampler(tokenizer, admissible_choice), tokenizer,
                                specs, jax.random.key(0), config=config).episodes) == 3


def test_pool_replay_rebuilds_state_and_rejects_busy_slots():
    with EnvPool(LineWorld, 2, group_size=2, max_turns=10) as pool:
        pool.reset([("line", 5)])
        for action in ("go right", "go right", "wait"):
            pool.step({0: action, 1: "go left"})
        with pytest.raises(ValueError, match="still playing"):
            pool.replay({1: Replay(EpisodeSpec("line", 5), ("go right",))})
        pool.stop([1])
        expected = [("You stand at 0.", 0.0), ("You stand at 1.", 1.0), ("You stand at 2.", 2.0),
                    ("You stand at 2.", 2.0)]
        out = pool.replay({1: Replay(EpisodeSpec("line", 5), ("go right", "go right", "wait"),
                                     expected)})
        assert out[1].observation == "You stand at 2." and out[1].info["score"] == 2.0
        assert pool.active.tolist() == [True, True] and pool.turns.tolist() == [3, 3]
        assert pool.step({0: "go right", 1: "go right"})[1].observation == "You stand at 3."
        pool.stop([1])
        with pytest.raises(ReplayError, match=r"diverged at step 2 \('wait'\).*expected score 2"):
            pool.replay({1: Replay(EpisodeSpec("line", 5), ("go right", "wait"),
                                   expected[:3])})
        with pytest.raises(ValueError, match="turn limit"):
            pool.replay({1: Replay(EpisodeSpec("line", 5), ("wait",) * 10)})


# --- The real engines -----------------------------------------------------------------------

# Action sequences of a random walk on which two loads of ScienceWorld without constant
# identity hashes drifted apart: "2" answers a disambiguation question whose options come in
# hash order (power-component), and heat flows from a burning chair in hash order, changing the
# thermometer's reading (lifespan-longest-lived).
POWER_COMPONENT_1 = (
    "connect yellow paint in cup to cup containing yellow paint in art studio",
    "connect inventory to cup containing red paint in cupboard", "connect hallway to paint", "2",
    "connect table to paint on wood cup containing yellow paint",
    "connect art studio to cup containing red paint in cupboard",
    "dunk cup containing yellow paint in cupboard into cup containing red paint in art studio",
    "go to kitchen", "0", "connect cupboard to yellow paint in cup containing yellow paint",
    "go to kitchen", "pour bowl into cup containing yellow paint in art studio", "pick up table",
    "connect red paint on cup containing red paint to table")
LIFESPAN_2 = (
    "pour cup containing nothing in table into chair", "move apple to sink",
    "move cup containing orange juice to chair", "look around", "move orange in inventory to counter",
    "close door to outside", "1", "move tin cup to ceramic cup", "move drawer in cupboard to table",
    "pour ceramic cup into bathroom", "use lighter on chair", "1", "move soap to bowl",
    "move sewer to table", "pour ceramic cup into hallway", "move lighter to cup containing orange juice",
    "move counter to kitchen", "look at door to hallway", "inventory", "0",
    "use lighter on door to hallway", "use lighter on banana", "look in sewer", "look around",
    "use thermometer on outside")


def _play_and_replay(pool, spec, detour, actions, choose=None, rng=None, num_actions=0):
    """Plays `actions` (or `num_actions` chosen ones) in slot 0, replays them into slot 1,
    and checks that both then stand in the same state.

    Slot 1 first plays a turn of another episode (`detour`), as a branch's environment has a
    history of its own: two engines with identical call histories can agree even where the
    engine is not reproducible (ScienceWorld's identity hashes follow the JVM's history)."""
    pool.stop(range(pool.num_envs))
    pool.replay({1: Replay(detour)})
    pool.step({1: "look around"})
    pool.stop([1])
    first = pool.replay({0: Replay(spec)})[0]
    trace, played = [(first.observation, float(first.info["score"]))], []
    info = first.info
    for k in range(len(actions) if actions else num_actions):
        action = actions[k] if actions else choose(info, rng)
        result = pool.step({0: action})[0]
        assert not result.crashed
        if result.done or result.truncated:
            break
        played.append(action)
        trace.append((result.observation, float(result.info["score"])))
        info = result.info
    assert len(played) >= 5
    branch = pool.replay({1: Replay(spec, tuple(played), tuple(trace))})[1]
    # The branch stands where the parent stands: same observation, same score...
    assert (branch.observation, float(branch.info["score"])) == trace[-1]
    assert pool.turns[1] == pool.turns[0] == len(played) and pool.active[1]
    # ... and the same action leads both to the same next state.
    probe = "look around" if "admissible_actions" not in info or not info["admissible_actions"] \
        else info["admissible_actions"][0]
    out = pool.step({0: probe, 1: probe})
    assert out[0].observation == out[1].observation
    assert out[0].info["score"] == out[1].info["score"]
    assert out[0].info.get("admissible_actions") == out[1].info.get("admissible_actions")
    return played


@pytest.mark.slow
def test_scienceworld_replays_reproduce_the_parent_state():
    pool = envs.make_pool("scienceworld", 2, group_size=2, max_turns=40, admissible=True,
                          step_timeout_s=120.0)
    try:
        assert all(pool.env(i).deterministic for i in range(2))
        detour = EpisodeSpec("melt", 3)
        _play_and_replay(pool, EpisodeSpec("power-component", 1), detour, POWER_COMPONENT_1)
        _play_and_replay(pool, EpisodeSpec("lifespan-longest-lived", 2), detour, LIFESPAN_2)

        def choose(info, rng):  # a random walk over the engine's own valid actions
            valid = [a for a in info["admissible_actions"] if not a.startswith("focus on")]
            return valid[int(rng.integers(len(valid)))]

        rng = np.random.default_rng(0)
        for spec in (EpisodeSpec("chemistry-mix", 6), EpisodeSpec("grow-plant", 3),
                     EpisodeSpec("find-animal", 5)):
            _play_and_replay(pool, spec, detour, (), choose, rng, num_actions=20)
    finally:
        pool.close()


@pytest.fixture(scope="module")
def alfworld_dir(tmp_path_factory):
    from epo_jax.envs import alfworld_games
    return alfworld_games.generate(tmp_path_factory.mktemp("alfworld"), seed=7,
                                   counts={"train": 6, "valid_seen": 1, "valid_unseen": 1})


@pytest.mark.slow
def test_alfworld_replays_reproduce_the_parent_state(alfworld_dir):
    from epo_jax.envs.alfworld import episodes
    pool = envs.make_pool("alfworld", 2, group_size=2, max_turns=40, admissible=True,
                          data_dir=str(alfworld_dir))
    try:
        assert all(pool.env(i).deterministic for i in range(2))  # through the child processes

        def choose(info, rng):
            valid = [a for a in info["admissible_actions"] if a not in ("help", "look")]
            return valid[int(rng.integers(len(valid)))]

        rng = np.random.default_rng(1)
        specs = episodes("train", data_dir=alfworld_dir)
        for spec in specs[:4]:
            _play_and_replay(pool, spec, specs[-1], (), choose, rng, num_actions=15)
    finally:
        pool.close()


@pytest.mark.slow
def test_run_episodes_branches_in_scienceworld(tokenizer):
    specs = [EpisodeSpec("boil", 0)]
    config = branching_config("scienceworld", 4, 1, 6, branch_w=20.0)
    sampler = ScriptedSampler(tokenizer, scienceworld_choice)
    pool = envs.make_pool("scienceworld", 4, group_size=4, max_turns=6, available_actions=True,
                          step_timeout_s=120.0)
    try:
        rollout = run_episodes(pool, sampler, tokenizer, specs, jax.random.key(0), config=config)
    finally:
        pool.close()
    branches = check_rollout(rollout, num_groups=1, group_size=4, specs=specs, fill=True)
    assert branches
    assert rollout.stats["branching/initial_rollouts"] == 2
    assert sampler.calls[:3] == [1, 1, 1]  # the probe plays alone while it is monitored
    assert all(not e.crashed for e in rollout.episodes)


@pytest.mark.slow
def test_run_episodes_branches_in_alfworld(tokenizer, alfworld_dir):
    from epo_jax.envs.alfworld import episodes
    specs = episodes("train", data_dir=alfworld_dir)[:2]
    config = branching_config("alfworld", 3, 2, 6, branch_w=20.0)
    sampler = ScriptedSampler(tokenizer, admissible_choice)
    pool = envs.make_pool("alfworld", 6, group_size=3, max_turns=6, admissible=True,
                          data_dir=str(alfworld_dir))
    try:
        rollout = run_episodes(pool, sampler, tokenizer, specs, jax.random.key(2), config=config)
    finally:
        pool.close()
    branches = check_rollout(rollout, num_groups=2, group_size=3, specs=specs, fill=True)
    assert branches
    assert {e.group_id for e in branches} <= {0, 1}
    assert all(not e.crashed for e in rollout.episodes)
