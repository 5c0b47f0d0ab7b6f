"""AlfWorldEnv: the real ALFWorld (TextWorld/PDDL) engine behind the TextEnv protocol.

Games come from the offline generator; the engine, its planner (`policy_commands`) and its
admissible commands are ALFWorld's own, and serve as the references here.
"""
import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import epo_jax.envs
from epo_jax.envs import INFO_KEYS, EnvPool, EpisodeSpec, alfworld_games
from epo_jax.envs.alfworld import AlfWorldEnv, episodes, resolve_data_dir

SIX_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light",
                  "pick_clean_then_place_in_recep", "pick_heat_then_place_in_recep",
                  "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
COUNTS = {"train": 12, "valid_seen": 6, "valid_unseen": 6}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return alfworld_games.generate(tmp_path_factory.mktemp("alfworld"), seed=7, counts=COUNTS)


def _traj(data_dir, task):
    return json.loads((data_dir / "json_2.1.1" / task / "traj_data.json").read_text())


def _first_of_each_type(data_dir, split):
    firsts = {}
    for spec in episodes(split, data_dir=data_dir):
        firsts.setdefault(_traj(data_dir, spec.task)["task_type"], spec)
    return [firsts[task_type] for task_type in SIX_TASK_TYPES]


def test_episodes_list_each_split_deterministically(data_dir):
    for split, split_dir in (("train", "train"), ("iid", "valid_seen"), ("ood", "valid_unseen")):
        specs = episodes(split, data_dir=data_dir)
        assert all(isinstance(s, EpisodeSpec) for s in specs)
        folders = sorted(p.parent.relative_to(data_dir / "json_2.1.1").as_posix()
                         for p in (data_dir / "json_2.1.1" / split_dir).glob("*/*/game.tw-pddl"))
        assert [s.task for s in specs] == folders
        assert [s.variation for s in specs] == list(range(COUNTS[split_dir]))
    assert episodes("iid", data_dir=data_dir) == episodes("valid_seen", data_dir=data_dir) \
        == episodes("eval_in_distribution", data_dir=data_dir)
    assert episodes("ood", data_dir=data_dir) == episodes("eval_out_of_distribution",
                                                          data_dir=data_dir)
    heat = episodes("train", data_dir=data_dir, tasks=("pick_heat_then_place_in_recep",))
    assert len(heat) == 2
    assert all(_traj(data_dir, s.task)["task_type"] == "pick_heat_then_place_in_recep"
               for s in heat)
    assert epo_jax.envs.episodes("alfworld", "ood", data_dir=data_dir) == \
        episodes("ood", data_dir=data_dir)


def test_data_dir_is_the_argument_then_alfworld_data_then_the_generated_set(
        data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(data_dir))
    assert resolve_data_dir() == data_dir
    assert resolve_data_dir(data_dir) == data_dir
    # ALFWORLD_DATA without official games: the default generated set, written to the cache.
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "no_games"))
    monkeypatch.setenv(alfworld_games.CACHE_ENV_VAR, str(tmp_path / "cache"))
    root = resolve_data_dir()
    assert root.parent == tmp_path / "cache"
    assert [len(episodes(split)) for split in ("train", "iid", "ood")] == [300, 48, 48]


def test_bad_arguments_name_the_fix(data_dir, tmp_path):
    with pytest.raises(ValueError, match="split='test'"):
        episodes("test", data_dir=data_dir)
    with pytest.raises(ValueError, match="pick_and_place"):
        episodes("train", data_dir=data_dir, tasks=("pick_and_place",))
    with pytest.raises(FileNotFoundError, match="json_2.1.1"):
        episodes("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="reward='dense'"):
        AlfWorldEnv(data_dir=data_dir, reward="dense")
    env = AlfWorldEnv(data_dir=data_dir)
    with pytest.raises(ValueError, match=r"variation=12 is out of range .* use 0..11"):
        env.reset(variation=12)
    with pytest.raises(ValueError, match="task='train/nope'"):
        env.reset("train/nope")
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("look")


def test_reset_and_step_return_protocol_info(data_dir):
    spec = episodes("ood", data_dir=data_dir)[1]
    traj = _traj(data_dir, spec.task)
    with epo_jax.envs.make("alfworld", data_dir=data_dir, split="ood", admissible=True) as env:
        observation, info = env.reset(variation=1)
        assert set(INFO_KEYS) <= set(info)
        assert (info["task"], info["variation"]) == spec
        assert info["task_type"] == traj["task_type"]
        assert observation.startswith("-= Welcome to TextWorld, ALFRED! =-\n\n")
        assert observation.endswith(f"Your task is to: {info['task_description']}")
        assert info["won"] is False and info["score"] == 0.0
        # The room overview lists every receptacle the admissible "go to" commands reach.
        destinations = [a[len("go to "):] for a in info["admissible_actions"]
                        if a.startswith("go to ")]
        assert destinations and all(f"a {d}" in observation for d in destinations)
        target = destinations[0]
        observation, reward, done, info = env.step(f"go to {target}")
        assert observation.startswith(f"You arrive at {target}.")
        assert (reward, done, info["won"]) == (0.0, False, False)
        assert f"go to {target}" not in info["admissible_actions"]

    env = AlfWorldEnv(spec.task, data_dir=data_dir)
    _, info = env.reset()
    assert info["admissible_actions"] is None
    assert (info["task"], info["variation"]) == spec   # variation looked up from the listing


def test_argumentless_resets_sample_the_split_by_seed(data_dir):
    tasks = ("pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep")

    def played(seed):
        env = AlfWorldEnv(data_dir=data_dir, tasks=tasks, seed=seed)
        return [env.reset()[1] for _ in range(2)]
    first = played(0)
    assert [info["task"] for info in played(0)] == [info["task"] for info in first]
    assert {info["task_type"] for info in first} <= set(tasks)
    listing = episodes("train", data_dir=data_dir)
    assert all(listing[info["variation"]].task == info["task"] for info in first)


@settings(max_examples=30, deadline=None)
@given(action=st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "   ", "go to", "go to nowhere 1", "take mug 99 from cabinet 1",
                     "GO TO CABINET 1", "open", "heat", "use", "move", "\x00", "☃ 1",
                     "go to countertop 1 please", "look look", "examine"]),
))
def test_arbitrary_action_text_never_crashes(fuzz_env, action):
    env, admissible = fuzz_env
    observation, reward, done, info = env.step(action)
    assert isinstance(observation, str)
    if action.strip() not in admissible:
        assert observation == "Nothing happens."
        assert (reward, done, info["won"]) == (0.0, False, False)
        assert info["admissible_actions"] == admissible


@pytest.fixture(scope="module")
def fuzz_env(data_dir):
    env = AlfWorldEnv(data_dir=data_dir, split="train", admissible=True)
    _, info = env.reset(variation=0)
    yield env, info["admissible_actions"]
    env.close()


def _play_expert(env, spec):
    """Plays the planner's solution; returns the rewards, the last result and the actions."""
    _, info = env.reset(*spec)
    rewards, actions, done = [], [], False
    while not done:
        assert info["expert_plan"], "the planner found no solution"
        action = info["expert_plan"][0]
        assert action in info["admissible_actions"]
        observation, reward, done, info = env.step(action)
        rewards.append(reward)
        actions.append(action)
        assert len(actions) <= 30
    return rewards, observation, info, actions


@pytest.mark.slow
def test_planner_solution_wins_every_task_type(data_dir):
    env = AlfWorldEnv(data_dir=data_dir, admissible=True, expert_plan=True, success_reward=10.0)
    for spec in _first_of_each_type(data_dir, "train"):
        traj = _traj(data_dir, spec.task)
        rewards, observation, info, actions = _play_expert(env, spec)
        assert info["won"] and info["score"] == 1.0
        assert rewards == [0.0] * (len(rewards) - 1) + [10.0]
        target = traj["pddl_params"]["object_target"].lower()
        final = {"look_at_obj_in_light": f"use {traj['pddl_params']['toggle_target'].lower()} ",
                 "pick_clean_then_place_in_recep": "clean ",
                 "pick_heat_then_place_in_recep": "heat ",
                 "pick_cool_then_place_in_recep": "cool "}
        assert any(a.startswith(f"take {target} ") for a in actions), actions
        if traj["task_type"] in final:
            assert any(a.startswith(final[traj["task_type"]]) for a in actions), actions
        if traj["task_type"] == "pick_two_obj_and_place":
            assert sum(a.startswith(f"take {target} ") for a in actions) == 2
        if traj["task_type"] != "look_at_obj_in_light":
            assert actions[-1].startswith(f"move {target} ")
            assert observation.startswith(f"You move the {target} ")
        with pytest.raises(RuntimeError, match="finished"):
            env.step("look")
    env.close()


@pytest.mark.slow
def test_a_process_pool_plays_a_batch_of_games_to_a_win(data_dir):
    """Four engines, one per process, each winning an OOD game of a different task type."""
    specs = _first_of_each_type(data_dir, "ood")[2:]
    factory = functools.partial(epo_jax.envs.make, "alfworld", data_dir=str(data_dir),
                                split="ood", admissible=True, expert_plan=True)
    with EnvPool(factory, num_envs=4, backend="process", max_turns=30) as pool:
        results = pool.reset(specs)
        assert [r.info["task"] for r in results] == [s.task for s in specs]
        pids = {pool.env(i).pid for i in range(4)}
        assert len(pids) == 4
        infos = {i: r.info for i, r in enumerate(results)}
        final = {}
        while pool.active.any():
            actions = {int(i): infos[int(i)]["expert_plan"][0] for i in pool.active.nonzero()[0]}
            for index, result in pool.step(actions).items():
                assert not result.crashed
                infos[index] = result.info
                if result.done:
                    final[index] = result
    assert sorted(final) == [0, 1, 2, 3]
    assert all(r.info["won"] and r.reward == 10.0 for r in final.values())
