"""ScienceWorld behind the TextEnv protocol: splits, the gold path, rewards, arbitrary input."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import epo_jax.envs as envs
from epo_jax.envs import INFO_KEYS, EpisodeSpec
from epo_jax.envs import scienceworld as sw


# --- Splits (no engine needed) ------------------------------------------------------------

def test_split_sizes_match_the_spec():
    # Spec section 4: train = train variations of tasks 0-28 (3322), IID = dev (1661),
    # OOD = test (1684); the held-out task 29 has 540 variations.
    assert len(sw.TASK_NAMES) == 30 and sw.TASK_NAMES[29] == "use-thermometer"
    assert len(envs.episodes("scienceworld", "train")) == 3322
    assert len(envs.episodes("scienceworld", "iid")) == 1661
    assert len(envs.episodes("scienceworld", "ood")) == 1684
    assert len(envs.episodes("scienceworld", "unseen_task")) == 540
    assert envs.episodes("scienceworld", "dev") == envs.episodes("scienceworld", "iid")
    assert envs.episodes("scienceworld", "test") == envs.episodes("scienceworld", "ood")


def test_splits_are_disjoint_and_cover_every_variation():
    splits = {name: set(sw.episodes(name)) for name in sw.SPLITS}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    union = set().union(*splits.values())
    assert len(union) == 7207  # every variation of every task
    assert {spec.task for spec in splits["train"]} == set(sw.TASK_NAMES[:29])
    assert {spec.task for spec in splits["unseen_task"]} == {"use-thermometer"}


def test_split_restricted_to_tasks():
    boil = sw.episodes("train", tasks=["boil"])
    assert boil == [EpisodeSpec("boil", v) for v in range(14)]
    assert sw.episodes("iid", tasks=("boil",)) == [EpisodeSpec("boil", v) for v in range(14, 21)]
    with pytest.raises(ValueError, match="not part of split 'train'"):
        sw.episodes("train", tasks=["use-thermometer"])
    with pytest.raises(ValueError, match="'boiling' is not a ScienceWorld task"):
        sw.episodes("train", tasks=["boiling"])
    with pytest.raises(ValueError, match="split='validation'"):
        sw.episodes("validation")


def test_cached_table_of_another_version_is_read_from_disk(tmp_path):
    table = {"boil": {"train": [0, 1], "dev": [2], "test": [3, 4]}}
    (tmp_path / "scienceworld-0.0.0-variations.json").write_text(json.dumps(table))
    read = sw.variation_table(version="0.0.0", cache_dir=tmp_path)
    assert read == {"boil": sw.TaskVariations([0, 1], [2], [3, 4])}


def test_make_and_episodes_reject_unknown_names():
    with pytest.raises(ValueError, match=r"unknown environment 'webshop'.*scienceworld"):
        envs.make("webshop")
    with pytest.raises(ValueError, match="unknown environment"):
        envs.episodes("webshop", "train")


# --- The real engine -----------------------------------------------------------------------

# The start of the engine's gold path for boil, variation 0: it earns a partial score.
BOIL_GOLD_PREFIX = ("open door to kitchen", "go to kitchen", "look around", "pick up thermometer",
                    "open cupboard", "pick up metal pot", "look around", "move metal pot to sink",
                    "activate sink", "deactivate sink", "pick up metal pot",
                    "focus on substance in metal pot")


@pytest.fixture(scope="module")
def env():
    """One engine for the module; reset() without arguments samples the IID split."""
    environment = envs.make("scienceworld", split="iid", seed=3)
    yield environment
    environment.close()


@pytest.mark.slow
def test_gold_path_of_boil_wins_with_score_100(env):
    gold = env.gold_actions("boil", 0)
    observation, info = env.reset("boil", 0)
    assert set(INFO_KEYS) <= set(info)
    assert info["task"] == "boil" and info["variation"] == 0 and not info["won"]
    assert info["task_description"].startswith("Your task is to boil water")
    assert "This room is called" in observation
    rewards = []
    for action in gold:
        observation, reward, done, info = env.step(action)
        rewards.append(reward)
        if done:
            break
    assert done and info["won"] and info["score"] == 100.0
    assert tuple(gold[:len(BOIL_GOLD_PREFIX)]) == BOIL_GOLD_PREFIX
    assert rewards[-1] == 10.0 and sum(rewards[:-1]) == 0.0
    assert info["admissible_actions"] is None  # not asked for
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("look around")


@pytest.mark.slow
def test_failed_task_is_done_and_lost(env):
    env.reset("boil", 0)
    observation, reward, done, info = env.step("focus on inventory")
    assert done and not info["won"] and info["score"] < 0 and reward == 0.0


@pytest.mark.slow
def test_reset_rebuilds_the_world_and_samples_from_the_split(env):
    first, _ = env.reset("melt", 3)
    env.step("open door to kitchen")
    again, _ = env.reset("melt", 3)
    # The same world; the engine may list a container's contents in another order.
    assert sorted(first.splitlines()) == sorted(again.splitlines())
    iid = set(sw.episodes("iid"))
    env.seed(11)
    sampled = [(info["task"], info["variation"]) for _, info in (env.reset() for _ in range(3))]
    env.seed(11)
    resampled = [(info["task"], info["variation"]) for _, info in (env.reset() for _ in range(3))]
    assert sampled == resampled
    assert all(EpisodeSpec(*spec) in iid for spec in sampled)
    _, info = env.reset("boil")  # a variation of boil from the split
    assert EpisodeSpec("boil", info["variation"]) in iid


@pytest.mark.slow
def test_bad_episode_arguments(env):
    with pytest.raises(ValueError, match="variation=30 is out of range for task 'boil'"):
        env.reset("boil", 30)
    with pytest.raises(ValueError, match="'boiling' is not a ScienceWorld task"):
        env.reset("boiling", 0)
    env.reset("boil", 0)
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(None)


@pytest.mark.slow
def test_extreme_actions_get_an_answer(env):
    env.reset("boil", 1)
    for action in ["", " ", "\n\n", "x" * 3_000_000, "\ud800\udfff", "\x00", "0", "99",
                   "<action>go to kitchen</action>", "漢字 한국어", "look around\nopen door"]:
        observation, reward, done, info = env.step(action)
        assert isinstance(observation, str) and not done and reward == 0.0


@pytest.fixture(scope="module")
def fuzz_env(env):
    env.reset("freeze", 2)
    return env


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(action=st.text(max_size=200))
def test_fuzz_any_action_text(fuzz_env, action):
    observation, reward, done, info = fuzz_env.step(action)
    assert isinstance(observation, str) and isinstance(reward, float)
    assert set(INFO_KEYS) <= set(info)
    if done:
        fuzz_env.reset("freeze", 2)


@pytest.mark.slow
def test_action_lists_and_dense_reward():
    with envs.make("scienceworld", task="boil", variation=0, reward="dense", admissible=True,
                   available_actions=True) as rich:
        _, info = rich.reset()
        # The agent stands in the hallway; the thermometer lies in the kitchen.
        assert "go to kitchen" in info["admissible_actions"]
        assert not any("thermometer" in action for action in info["admissible_actions"])
        assert "look around" in info["action_templates"] and "open OBJ" in info["action_templates"]
        assert "door to kitchen" in info["objects"] and "thermometer" not in info["objects"]
        total = 0.0
        for action in BOIL_GOLD_PREFIX:
            _, reward, done, info = rich.step(action)
            total += reward
        assert not done and 0 < info["score"] < 100
        assert total == info["score"]  # dense rewards are score deltas


@pytest.mark.slow
def test_variation_table_read_from_the_live_engine_matches_and_is_cached(env, tmp_path):
    # A version without a shipped table is read from an engine and cached on disk.
    live = sw.variation_table(version="live-check", cache_dir=tmp_path, env=env)
    pinned = sw.variation_table()
    assert list(live) == list(sw.TASK_NAMES)
    for task in sw.TASK_NAMES:
        assert [list(s) for s in live[task]] == [list(s) for s in pinned[task]], task
    cached = json.loads((tmp_path / "scienceworld-live-check-variations.json").read_text())
    assert cached["boil"] == {"train": list(range(14)), "dev": list(range(14, 21)),
                              "test": list(range(21, 30))}
