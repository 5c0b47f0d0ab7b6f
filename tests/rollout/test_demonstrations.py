"""Expert demonstrations on the real engines: each turn's prompt is the rollout's prompt for the
same state (the same actions played through `run_episodes`), the targets parse as the expert's
actions, and only episodes the expert wins within the turn limit are kept."""
import pathlib
import runpy

import jax
import numpy as np
import pytest

from epo_jax import envs
from epo_jax.envs import alfworld_games
from epo_jax.models import tokenizer as tokenizer_lib
from epo_jax.models.gguf_file import read_gguf
from epo_jax.models.loading import embedded_gguf_path
from epo_jax.rollout import demonstrations
from epo_jax.rollout.actions import parse_action
from epo_jax.rollout.agent_loop import Generation, run_episodes
from epo_jax.train import environments

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (the one the cold start renders with)."""
    return tokenizer_lib.gguf_tokenizer(read_gguf(embedded_gguf_path()).metadata)


def cpu_config(env: str, **env_fields):
    config = runpy.run_path(str(ROOT / "configs" / f"{env}.py"))["get_config"]()
    for key, value in env_fields.items():
        setattr(config.env, key, value)
    return config


def scripted_generate(tokenizer, actions_by_slot, pool):
    """A GenerateFn that answers each active slot with the reply for its next scripted action."""
    cursor = [0] * len(actions_by_slot)

    def generate(prompt_ids, rng):
        del rng
        out = []
        for slot, _ in zip(np.flatnonzero(pool.active), prompt_ids):
            action = actions_by_slot[slot][cursor[slot]]
            cursor[slot] += 1
            ids = demonstrations.target_ids(tokenizer, action)
            out.append(Generation(ids=ids, logprobs=np.zeros(len(ids), np.float32),
                                  entropy=np.zeros(len(ids), np.float32),
                                  text=demonstrations.target_reply(action)))
        return out

    return generate


def assert_prompts_equal_the_rollouts(config, env, pool, specs, tokenizer):
    recording = demonstrations.record(env, specs, tokenizer, config, max_episodes=len(specs))
    assert [e.skipped for e in recording.episodes] == [""] * len(specs)
    assert all(e.won for e in recording.episodes)
    actions = [e.actions for e in recording.episodes]
    rollout = run_episodes(pool, scripted_generate(tokenizer, actions, pool), tokenizer, specs,
                           jax.random.key(0), config=config)
    assert [e.won for e in rollout.episodes] == [True] * len(specs)
    assert len(rollout.samples) == len(recording.demonstrations) == sum(map(len, actions))
    for sample, demo in zip(rollout.samples, recording.demonstrations):  # both in episode, then turn order
        assert sample.turn_index == demo.turn_index and sample.valid_format
        np.testing.assert_array_equal(sample.prompt_ids, demo.prompt_ids)
        np.testing.assert_array_equal(sample.response_ids, demo.target_ids)
    return recording


def test_scienceworld_demonstrations_have_the_rollouts_prompts(tokenizer):
    config = cpu_config("scienceworld", max_turns=8, tasks=("find-non-living-thing", "lifespan-longest-lived"))
    # Constant JVM identity hashes on both sides: two engines then list a room's contents in the
    # same order, so the prompts can be compared text for text.
    options = {**environments.env_options(config), "deterministic": True}
    specs = [envs.EpisodeSpec("find-non-living-thing", 0), envs.EpisodeSpec("lifespan-longest-lived", 1)]
    with envs.make("scienceworld", **options) as env, \
            envs.make_pool("scienceworld", 2, max_turns=config.env.max_turns, **options) as pool:
        recording = assert_prompts_equal_the_rollouts(config, env, pool, specs, tokenizer)
    # The gold paths: the first kitchen-bound door, then the last action puts the thing in the box.
    assert recording.episodes[0].actions[:2] == ["open door to kitchen", "go to kitchen"]
    assert recording.episodes[0].actions[-1].startswith("move ")
    assert recording.episodes[1].actions[-1].startswith("focus on ")


def test_alfworld_demonstrations_have_the_rollouts_prompts(tokenizer, tmp_path):
    data_dir = alfworld_games.generate(tmp_path / "alfworld", seed=3,
                                       counts={"train": 2, "valid_seen": 1, "valid_unseen": 1})
    config = cpu_config("alfworld", max_turns=30, data_dir=str(data_dir))
    specs = envs.episodes("alfworld", "train", data_dir=str(data_dir))
    options = environments.env_options(config)
    with envs.make("alfworld", expert_plan=True, **options) as env, \
            envs.make_pool("alfworld", len(specs), max_turns=config.env.max_turns, **options) as pool:
        recording = assert_prompts_equal_the_rollouts(config, env, pool, specs, tokenizer)
    assert all(len(e.actions) >= 2 for e in recording.episodes)


@pytest.mark.parametrize("action", ["go to kitchen", "focus on baby baby brown bear", "wait1",
                                    "move flower pot 6 containing apple tree and soil in inventory to red box"])
def test_target_reply_is_the_trained_format(tokenizer, action):
    reply = demonstrations.target_reply(action)
    assert parse_action(reply) == (action, True)
    ids = demonstrations.target_ids(tokenizer, action)
    assert ids[-1] == tokenizer.eos_token_id == 2  # <|im_end|>
    assert tokenizer.decode(ids[:-1]) == reply
    assert reply.endswith("</action>")  # the rollout's stop string ends the sampled reply


def test_episodes_the_expert_cannot_win_in_time_are_skipped(tokenizer, tmp_path):
    config = cpu_config("scienceworld", max_turns=2, tasks=("find-non-living-thing",))
    specs = [envs.EpisodeSpec("find-non-living-thing", 0)]  # its gold path takes 5 actions
    with envs.make("scienceworld", **environments.env_options(config)) as env:
        recording = demonstrations.record(env, specs, tokenizer, config, max_episodes=1)
        assert recording.demonstrations == [] and not recording.kept
        assert "env.max_turns=2" in recording.episodes[0].skipped
        config.env.max_turns = 8
        recording = demonstrations.record(env, specs, tokenizer, config, max_episodes=1)
    assert len(recording.demonstrations) == 5 and recording.kept[0].won
    path = str(tmp_path / "demos.npz")
    demonstrations.save(recording, path)
    loaded = demonstrations.load(path)
    assert [(d.episode, d.turn_index) for d in loaded] == [(0, t) for t in range(5)]
    for a, b in zip(loaded, recording.demonstrations):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
