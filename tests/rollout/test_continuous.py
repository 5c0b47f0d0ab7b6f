"""The continuous engine against the turn engine: the same episodes and samples whatever the number
of slots, AEPO's branching trees too, and environments that never wait for each other."""
import importlib.util
import pathlib
import threading

import jax
import numpy as np
import pytest

import epo_jax.envs as envs
from epo_jax.envs import EnvPool, EpisodeSpec, TextEnv
from epo_jax.models import transformer
from epo_jax.models.config import ModelConfig
from epo_jax.rollout import agent_loop
from epo_jax.rollout.agent_loop import run_episodes

_BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"
SPECS = [EpisodeSpec("corridor-5", 3), EpisodeSpec("corridor-6", 8)]


def base_config(**rollout):
    spec = importlib.util.spec_from_file_location("epo_base_config_continuous", _BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.env.name = "toy_keydoor"
    config.env.history_length = 0  # the corridor's observation holds its whole state
    config.env.show_actions = False
    config.env.max_turns = 4
    config.rollout.max_prompt_len = 256  # one bucket: few compiles
    config.rollout.prompt_buckets = (256,)
    config.rollout.max_response_len = 10
    # A one-letter stop string ends the random model's replies after 1 to 10 tokens.
    config.rollout.stop_strings = ("</action>", "o")
    for key, value in rollout.items():
        config.rollout[key] = value
    return config


@pytest.fixture(scope="module")
def tokenizer(make_chatml_tokenizer):
    corpus = ["You are in room 2 of a corridor. The key is east. A locked door is at the west end.",
              "<think> the key is east </think> <action> go east </action> take key open door look",
              "Your task is to take the key, open the door and go through it."] * 20
    return make_chatml_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def make_policy(tokenizer):
    """A tiny random Llama over the tokenizer's vocabulary, as a rollout Policy factory."""
    model_config = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                               eos_token_ids=(tokenizer.eos_token_id,))
    graphdef, params = transformer.init_params(model_config, jax.random.key(3))
    factory = agent_loop.make_policy(base_config(), graphdef, model_config, tokenizer)
    return lambda temperature=1.0: factory(params, temperature=temperature)


def play(policy, tokenizer, config, group_size=2, specs=SPECS, env="toy_keydoor"):
    with envs.make_pool(env, group_size * len(specs), group_size=group_size,
                        max_turns=config.env.max_turns) as pool:
        return run_episodes(pool, policy, tokenizer, specs, jax.random.key(11), config=config)


def assert_same_rollouts(a, b, exact=False):
    key = lambda e: (e.traj_id, e.group_id, e.num_turns, e.won, e.reward, e.parent, e.branch_turn, e.invalid_turns)
    assert [key(e) for e in a.episodes] == [key(e) for e in b.episodes]
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples):
        assert (x.traj_id, x.turn_index, x.anchor_id, x.valid_format) == (y.traj_id, y.turn_index, y.anchor_id,
                                                                         y.valid_format)
        np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
        np.testing.assert_array_equal(x.response_ids, y.response_ids)
        check = np.testing.assert_array_equal if exact else lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5)
        check(x.response_logprobs, y.response_logprobs)
        check(x.response_entropy, y.response_entropy)


@pytest.fixture(scope="module")
def turn_rollout(make_policy, tokenizer):
    return play(make_policy(), tokenizer, base_config(engine="turns"))


@pytest.mark.parametrize("num_slots, chunk_len", [(1, 3), (0, 8)])
def test_continuous_engine_plays_the_turn_engines_episodes(make_policy, tokenizer, turn_rollout, num_slots,
                                                           chunk_len):
    """With sampling at temperature 1: one slot for four environments (every episode waits for
    a slot), and one per environment (num_slots=0)."""
    config = base_config(engine="continuous", num_slots=num_slots, chunk_len=chunk_len)
    rollout = play(make_policy(), tokenizer, config)
    assert_same_rollouts(rollout, turn_rollout)
    lengths = {len(s.response_ids) for s in rollout.samples}
    assert len(lengths) > 2  # replies of several lengths: the slots really drift apart
    stats = rollout.stats
    assert stats["rollout/new_tokens"] == turn_rollout.stats["rollout/new_tokens"]
    assert stats["rollout/active_row_steps"] == sum(len(s.response_ids) - 1 for s in rollout.samples)
    assert 0.0 <= stats["rollout/idle_row_fraction"] < 1.0
    assert stats["rollout/turns"] == max(e.num_turns for e in rollout.episodes)


def test_branching_trees_are_the_same_in_both_engines(make_policy, tokenizer):
    """AEPO's branching with forks forced by a large w: the groups decide after each of their
    turns in both engines, from their own random streams."""
    branching = dict(branching=True, branch_w=50.0, branch_monitor_turns=2)
    config = base_config(engine="turns", **branching)
    config.env.group_size = 3
    turns = play(make_policy(), tokenizer, config, group_size=3)
    assert any(e.parent >= 0 for e in turns.episodes)
    config = base_config(engine="continuous", num_slots=2, chunk_len=4, **branching)
    config.env.group_size = 3
    rollout = play(make_policy(), tokenizer, config, group_size=3)
    assert_same_rollouts(rollout, turns)
    for key in ("rollout/branches", "rollout/fresh_rollouts", "branching/h_root", "branching/initial_rollouts"):
        assert rollout.stats[key] == pytest.approx(turns.stats[key], abs=1e-6)


_GATES: dict[str, threading.Event] = {}


class GatedWorld(TextEnv):
    """A test-only engine. In task "gated", the first step of the episode of variation 0 blocks
    until the episode of variation 1 has taken its third step; every other step is instant."""

    deterministic = True

    def reset(self, task=None, variation=None):
        self.task, self.variation, self.turn = task, int(variation), 0
        return f"Turn 0 of episode {self.variation}.", self._info()

    def _info(self):
        return {"won": False, "score": 0.0, "task": self.task, "variation": self.variation,
                "task_description": "wait", "admissible_actions": None}

    def step(self, action):
        self.turn += 1
        gate = _GATES[self.task]
        if self.variation == 0 and self.turn == 1 and not gate.wait(timeout=120):
            raise TimeoutError("the other episode never reached its third step")
        if self.variation == 1 and self.turn == 3:
            gate.set()
        return f"Turn {self.turn} of episode {self.variation}.", 0.0, False, self._info()


def test_an_environment_that_is_slow_to_answer_holds_up_no_other(make_policy, tokenizer):
    """Episode 1 plays its turns while episode 0's first step is still running; the turn
    engine would wait for episode 0 at every turn (and here never get anywhere)."""
    config = base_config(engine="continuous", num_slots=1, chunk_len=4)
    _GATES["gated"] = threading.Event()
    with EnvPool(GatedWorld, 2, group_size=1, max_turns=4, step_timeout_s=150.0) as pool:
        rollout = run_episodes(pool, make_policy(), tokenizer, [EpisodeSpec("gated", 0), EpisodeSpec("gated", 1)],
                               jax.random.key(0), config=config)
    assert [(e.num_turns, e.crashed) for e in rollout.episodes] == [(4, False), (4, False)]
    assert _GATES["gated"].is_set()


def test_the_continuous_engine_needs_a_model_policy(tokenizer):
    def generate(prompt_ids, keys):
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="rollout.engine='continuous' decodes in slots"):
        play(generate, tokenizer, base_config(engine="continuous"))
