"""The toy key-and-door corridor: its rules, splits, determinism, and the TextEnv protocol."""
import numpy as np
import pytest

from epo_jax import envs
from epo_jax.envs import toy_keydoor as toy
from epo_jax.rollout import prompts


def play(env, commands):
    return [env.step(c) for c in commands]


@pytest.mark.parametrize("split", toy.SPLITS)
def test_scripted_optimal_path_wins_in_the_expected_turns_with_reward_only_at_the_end(split):
    for spec in toy.episodes(split)[::7]:
        lay = toy.layout(*spec)
        plan = toy.solve(*spec)
        assert len(plan) == lay.optimal_turns >= toy.MIN_OPTIMAL_TURNS
        env = envs.make("toy_keydoor", task=spec.task, variation=spec.variation, success_reward=10.0)
        _, info = env.reset()
        assert not info["won"] and info["score"] == 0
        results = play(env, plan)
        rewards = [r[1] for r in results]
        dones = [r[2] for r in results]
        assert rewards[:-1] == [0.0] * (len(plan) - 1) and rewards[-1] == 10.0
        assert dones == [False] * (len(plan) - 1) + [True]
        assert results[-1][3]["won"] and results[-1][3]["score"] == toy.SCORE_GOAL


def test_optimal_path_lengths_cover_the_documented_ranges():
    train = [toy.layout(*s).optimal_turns for s in toy.episodes("train")]
    ood = [toy.layout(*s).optimal_turns for s in toy.episodes("ood")]
    assert min(train) == 10 and max(train) == 15
    assert min(ood) >= 10 and max(ood) == 18


def test_walkthrough_of_one_variation():
    env = toy.ToyKeyDoorEnv("corridor-6", 3)
    obs, info = env.reset()
    assert obs == "You are in a corridor. The key is to the east."
    assert info["task_description"] == "Unlock the west door and go through it."
    assert env.step("go east")[0] == "You walk. The key is to the east."
    assert env.step("  GO   East ")[0] == "You walk. A key is here."
    assert env.step("take key")[0] == "You take the key. You have the key. The door is to the west."
    for _ in range(4):
        assert env.step("west")[0] == "You walk. You have the key. The door is to the west."
    obs, reward, done, _ = env.step("go west")
    assert obs == "You walk. You have the key. A locked door is to the west."
    assert env.step("go west")[:3] == ("The door is locked. You have the key. A locked door is to the west.",
                                       0.0, False)
    assert env.step("open door")[0] == "You open the door. You have the key. An open door is to the west."
    obs, reward, done, info = env.step("go west")
    assert (obs, reward, done, info["won"]) == ("You go through the door and reach the goal.", 10.0, True, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")


def state(env):
    return env._room, env._has_key, env._door_open, env.score


def test_invalid_and_inapplicable_commands_change_nothing():
    env = toy.ToyKeyDoorEnv("corridor-7", 11)
    obs0, _ = env.reset()
    lay = toy.layout("corridor-7", 11)
    before = state(env)
    for command in ("", "jump", "go up", "take", "take door", "open key", "</action>", "x" * 1000,
                    "go north", "go south", "look", "wait", "take key", "open door"):
        obs, reward, done, info = env.step(command)
        assert (reward, done, info["won"]) == (0.0, False, False)
        assert state(env) == before, command
    assert env.step("fly")[0].startswith("Nothing happens.")
    assert env.step("take key")[0].startswith("There is no key here.")
    assert env.step("open door")[0].startswith("There is no door here." if lay.start_room != lay.door_room
                                               else "You have no key.")
    # Walking into the corridor's closed end is no move either.
    far_end = "west" if lay.door_side == "east" else "east"
    for _ in range(lay.num_rooms + 1):
        env.step(f"go {far_end}")
    assert env.step(f"go {far_end}")[0].startswith("You can not go that way.")


def test_door_needs_the_key_and_the_goal_needs_the_open_door():
    spec = toy.episodes("train")[5]
    lay = toy.layout(*spec)
    env = toy.ToyKeyDoorEnv(*spec)
    env.reset()
    toward = "east" if lay.door_side == "east" else "west"
    for _ in range(lay.num_rooms):
        env.step(f"go {toward}")
    assert env._room == lay.door_room
    if lay.key_room != lay.door_room:
        obs, reward, done, _ = env.step("open door")
        assert obs.startswith("You have no key.") and not done
    assert env.step(f"go {lay.door_side}")[0].startswith("The door is locked.")


def test_dense_reward_is_the_score_delta():
    spec = toy.episodes("iid")[0]
    env = toy.ToyKeyDoorEnv(*spec, reward="dense")
    env.reset()
    rewards = [r[1] for r in play(env, toy.solve(*spec))]
    assert sum(rewards) == toy.SCORE_GOAL
    assert [r for r in rewards if r] == [toy.SCORE_KEY, toy.SCORE_DOOR - toy.SCORE_KEY,
                                         toy.SCORE_GOAL - toy.SCORE_DOOR]


def test_deterministic_per_variation_and_variations_differ():
    for spec in toy.episodes("train")[:50]:
        assert toy.layout(*spec) == toy.layout(*spec)
        a, b = toy.ToyKeyDoorEnv(seed=1), toy.ToyKeyDoorEnv(seed=2)
        assert a.reset(*spec) == b.reset(*spec)
        assert play(a, ["go east", "take key", "go west"]) == play(b, ["go east", "take key", "go west"])
    layouts = {toy.layout("corridor-7", v) for v in range(200)}
    assert len(layouts) > 10
    assert len({lay.door_side for lay in layouts}) == 2


def test_splits_are_disjoint_and_ood_is_longer():
    train, iid, ood = (set(toy.episodes(s)) for s in ("train", "iid", "ood"))
    assert (len(train), len(iid), len(ood)) == (600, 150, 100)
    assert not train & iid and not train & ood and not iid & ood
    assert {s.task for s in train} == {s.task for s in iid} == set(toy.TRAIN_TASKS)
    assert {s.task for s in ood} == set(toy.OOD_TASKS)
    assert max(toy.layout(*s).num_rooms for s in train) < min(toy.layout(*s).num_rooms for s in ood)
    assert toy.episodes("dev") == toy.episodes("iid") and toy.episodes("test") == toy.episodes("ood")
    assert envs.episodes("toy_keydoor", "train", tasks=("corridor-5",)) == [
        s for s in toy.episodes("train") if s.task == "corridor-5"]
    with pytest.raises(ValueError, match="split"):
        toy.episodes("valid")
    with pytest.raises(ValueError, match="not part of split"):
        toy.episodes("train", tasks=("corridor-9",))
    with pytest.raises(ValueError, match="task"):
        toy.layout("corridor-3", 0)


def test_argumentless_reset_draws_from_the_split_with_the_seed():
    a, b = toy.ToyKeyDoorEnv(split="ood", seed=4), toy.ToyKeyDoorEnv(split="ood")
    b.seed(4)
    drawn = [a.reset()[1]["task"] for _ in range(10)]
    assert drawn == [b.reset()[1]["task"] for _ in range(10)]
    assert set(drawn) <= set(toy.OOD_TASKS)
    fixed = toy.ToyKeyDoorEnv("corridor-5", 2)
    assert fixed.reset()[1]["variation"] == 2


def test_info_keys_admissible_actions_and_expert_plan():
    env = toy.ToyKeyDoorEnv(admissible=True, expert_plan=True)
    _, info = env.reset("corridor-6", 0)
    assert set(envs.INFO_KEYS) <= set(info)
    assert info["admissible_actions"] == list(toy.COMMANDS)
    assert info["expert_plan"] == toy.solve("corridor-6", 0)
    _, _, _, info = env.step(info["expert_plan"][0])
    assert info["expert_plan"] == toy.solve("corridor-6", 0)[1:]
    assert toy.ToyKeyDoorEnv().reset("corridor-6", 0)[1]["admissible_actions"] is None


def test_pool_plays_groups_of_the_registered_env():
    assert "toy_keydoor" in envs.ENV_NAMES and envs.default_backend("toy_keydoor") == "thread"
    specs = toy.episodes("train")[:2]
    with envs.make_pool("toy_keydoor", 4, group_size=2, max_turns=30) as pool:
        first = pool.reset(specs)
        assert first[0] == first[1] and first[2] == first[3]
        plans = {i: toy.solve(*specs[i // 2]) for i in range(4)}
        turn = 0
        while pool.active.any():
            results = pool.step({int(i): plans[int(i)][turn] for i in np.flatnonzero(pool.active)})
            turn += 1
        assert all(r.done and r.info["won"] for r in results.values())


def test_prompt_is_short():
    class Template:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[0]["content"]

    _, info = toy.ToyKeyDoorEnv().reset("corridor-9", 1)
    text = prompts.build_prompt(Template(), "toy_keydoor", info, "You open the door. You have the key. "
                                "An open door is to the east.", history_length=0, show_actions=False)
    assert text.startswith("A text world.\nYour task is: Unlock the")
    assert text.endswith("Reply <think> </think> then <action> command </action>.")
    assert len(text.split()) <= 40


def test_replay_of_an_episode_prefix_reproduces_its_state():
    """The corridor declares itself deterministic, so AEPO's branches can replay it."""
    original = toy.ToyKeyDoorEnv()
    observation, info = original.reset("corridor-6", 4)
    actions = ["go east", "look", "go west", "take key", "xyzzy"]
    trace = [(observation, float(info["score"]))]
    for action in actions:
        observation, _, _, info = original.step(action)
        trace.append((observation, float(info["score"])))
    replayed = toy.ToyKeyDoorEnv()
    assert replayed.replay("corridor-6", 4, actions, trace) == (observation, info)
    with pytest.raises(envs.ReplayError, match="diverged at step 2"):
        replayed.replay("corridor-6", 4, actions, trace[:2] + [("another room", 0.0)] + trace[3:])
