"""Turn samples -> training arrays, and the per-step advantages, against hand computations."""
import pathlib
import runpy

import numpy as np
import pytest

from epo_jax.rollout.samples import TurnSample
from epo_jax.train.batch_advantages import make_advantage_fn, trajectory_returns
from epo_jax.train.batch import bucket, build_batch, micro_batches_per_minibatch, update_rows

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sample(prompt_len, response_len, traj, group, turn, penalty=0.0, episode_reward=0.0, last=False):
    return TurnSample(prompt_ids=np.arange(3, 3 + prompt_len, dtype=np.int32),
                      response_ids=np.arange(100, 100 + response_len, dtype=np.int32),
                      response_logprobs=-np.arange(1, response_len + 1, dtype=np.float32),
                      response_entropy=np.full(response_len, 0.5, np.float32),
                      traj_id=traj, group_id=group, turn_index=turn, anchor_id=turn,
                      valid_format=penalty == 0.0, penalty=penalty, episode_reward=episode_reward,
                      last_turn=last)


def test_bucket():
    assert bucket(1, (4, 8)) == 4 and bucket(4, (4, 8)) == 4 and bucket(5, (4, 8)) == 8
    with pytest.raises(ValueError, match="largest bucket 8"):
        bucket(9, (4, 8))


def test_build_batch_layout():
    samples = [sample(3, 2, 0, 0, 0), sample(5, 4, 0, 0, 1, last=True)]
    b = build_batch(samples, prompt_buckets=(4, 8), response_len=4, rows=4, pad_id=0, padding_id_start=1000)
    assert b["tokens"].shape == (4, 12)  # prompt bucket 8 + response 4
    # Row 0: prompt left-padded into [5, 8), response right-padded in [8, 10).
    np.testing.assert_array_equal(b["tokens"][0], [0, 0, 0, 0, 0, 3, 4, 5, 100, 101, 0, 0])
    np.testing.assert_array_equal(b["attention_mask"][0], [0] * 5 + [1] * 5 + [0] * 2)
    np.testing.assert_array_equal(b["response_mask"][0], [1, 1, 0, 0])
    np.testing.assert_array_equal(b["old_logprobs"][1], [-1, -2, -3, -4])
    np.testing.assert_array_equal(b["valid"], [True, True, False, False])
    np.testing.assert_array_equal(b["response_mask"][2:], 0)
    assert len(set(b["traj_id"][2:]) & {0}) == 0  # padding joins no real trajectory
    np.testing.assert_array_equal(b["last_turn"], [False, True, False, False])


def test_build_batch_with_an_agreed_shape_for_multi_host_runs():
    """Each process of a multi-host run pads its rows to the shape all agreed on; padding ids start
    where the process says, so no two processes' padding rows share a group."""
    samples = [sample(3, 2, 0, 0, 0)]
    b = build_batch(samples, prompt_buckets=(4, 8), response_len=4, pad_id=0,
                    rows=6, prompt_len=8, padding_id_start=2_000_000)
    assert b["tokens"].shape == (6, 12) and b["valid"].sum() == 1
    np.testing.assert_array_equal(b["group_id"][1:], 2_000_000 + np.arange(1, 6))
    # A process whose episodes all crashed still contributes its (all-padding) share.
    empty = build_batch([], prompt_buckets=(4,), response_len=4, pad_id=0, rows=2, prompt_len=4,
                        padding_id_start=1000)
    assert empty["tokens"].shape == (2, 8) and not empty["valid"].any()
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        build_batch([sample(5, 2, 0, 0, 0)], prompt_buckets=(8,), response_len=4, rows=1, pad_id=0,
                    prompt_len=4, padding_id_start=1000)
    with pytest.raises(ValueError, match="cannot hold 1 samples"):
        build_batch(samples, prompt_buckets=(4,), response_len=4, pad_id=0, rows=0, padding_id_start=1000)


@pytest.mark.parametrize("minibatches,micro,samples,rows", [
    (1, 2, 1, 2), (1, 2, 2, 2), (1, 2, 3, 4), (1, 2, 5, 8), (1, 2, 9, 16),  # micro-batches 1, 1, 2, 4, 8
    (2, 4, 8, 8), (2, 4, 9, 16), (2, 4, 17, 32), (3, 1, 4, 6)])
def test_update_rows_round_micro_batches_up_to_a_power_of_two(minibatches, micro, samples, rows):
    """rows = minibatches x micro-batch size x 2^ceil(log2(ceil(samples / (minibatches x micro))))."""
    assert update_rows(samples, num_minibatches=minibatches, micro_batch_size=micro) == rows
    assert micro_batches_per_minibatch(rows, num_minibatches=minibatches, micro_batch_size=micro) \
        == rows // (minibatches * micro)
    with pytest.raises(ValueError, match="not a multiple of algo.num_minibatches"):
        micro_batches_per_minibatch(rows + 1, num_minibatches=minibatches, micro_batch_size=micro)


def test_trajectory_returns_sum_penalties_once():
    # Trajectory 0: turns with penalties -0.1, 0, -0.1, episode reward 10; trajectory 1: 0.
    episode = np.array([10, 10, 10, 0, 0], np.float32)
    penalty = np.array([-0.1, 0, -0.1, 0, -0.1], np.float32)
    traj = np.array([0, 0, 0, 1, 1], np.int32)
    valid = np.array([True] * 5)
    np.testing.assert_allclose(trajectory_returns(episode, penalty, traj, valid),
                               [9.8, 9.8, 9.8, -0.1, -0.1], rtol=1e-6)


def config_with(advantage):
    c = runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"]()
    c.algo.advantage = advantage
    return c


def test_grpo_step_matches_numpy():
    """Two groups of two trajectories; GRPO over trajectory returns, broadcast to tokens."""
    samples = [sample(2, 2, 0, 0, 0, episode_reward=10, last=True),
               sample(2, 3, 1, 0, 0, penalty=-0.1), sample(2, 1, 1, 0, 1, last=True),
               sample(2, 2, 2, 1, 0, episode_reward=10, last=True),
               sample(2, 2, 3, 1, 0, episode_reward=10, last=True)]
    b = build_batch(samples, prompt_buckets=(4,), response_len=3, rows=8, pad_id=0, padding_id_start=1000)
    adv = np.asarray(make_advantage_fn(config_with("grpo"))(b)["advantages"])
    returns = {0: 10.0, 1: -0.1}
    mean, std = np.mean(list(returns.values())), np.std(list(returns.values()), ddof=1)
    expected0 = (10.0 - mean) / (std + 1e-6)
    np.testing.assert_allclose(adv[0], [expected0, expected0, 0], rtol=1e-5)
    np.testing.assert_allclose(adv[1], [-expected0] * 3, rtol=1e-5)
    np.testing.assert_allclose(adv[2], [-expected0, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(adv[3:], 0, atol=1e-6)  # equal returns in group 1; padding rows


def test_ppo_gae_with_zero_values_is_the_turn_reward_then_whitened():
    samples = [sample(2, 2, 0, 0, 0, penalty=-0.1, episode_reward=10),
               sample(2, 3, 0, 0, 1, episode_reward=10, last=True)]
    b = build_batch(samples, prompt_buckets=(4,), response_len=3, rows=2, pad_id=0, padding_id_start=1000)
    c = config_with("ppo_gae")
    c.algo.whiten_advantages = False
    out = make_advantage_fn(c)(b, np.zeros((2, 3), np.float32))
    # gamma = lambda = 1, V = 0: every token's advantage is its turn's reward.
    np.testing.assert_allclose(out["advantages"], [[9.9, 9.9, 0], [10, 10, 10]], rtol=1e-6)
    np.testing.assert_allclose(out["returns"], out["advantages"])


def official_group_norm(scores, index, *, singleton_own_mean, remove_std, eps=1e-6):
    """verl-agent's group loop with compute_mean_std_cross_all_data=True: every row joins its group;
    a one-member group has std 1 and mean 0 (GRPO, episode_norm_reward) or its own score
    (step_norm_reward)."""
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        group = [scores[j] for j in range(len(scores)) if index[j] == index[i]]
        if len(group) == 1:
            mean, std = (group[0] if singleton_own_mean else 0.0), 1.0
        else:
            mean, std = np.mean(group), np.std(group, ddof=1)
        out[i] = scores[i] - mean if remove_std else (scores[i] - mean) / (std + eps)
    return out


def verl_agent_samples():
    """Group 0: trajectory 0 plays two turns (a format penalty on the second) and wins; trajectory 1
    fails in one turn. Every turn sample carries its episode's reward."""
    return [sample(2, 2, 0, 0, 0, episode_reward=10),
            sample(2, 2, 0, 0, 1, penalty=-0.1, episode_reward=10, last=True),
            sample(2, 2, 1, 0, 0, episode_reward=0, last=True)]


def test_grpo_counting_every_turn_sample_is_verl_agents_rule():
    b = build_batch(verl_agent_samples(), prompt_buckets=(4,), response_len=2, rows=4, pad_id=0,
                    padding_id_start=1000)
    c = config_with("grpo")
    c.algo.group_count = "turn"
    adv = np.asarray(make_advantage_fn(c)(b)["advantages"])
    # Each row's score is its token-level reward sum: episode reward + its own penalty.
    expected = official_group_norm([10.0, 9.9, 0.0], [0, 0, 0], singleton_own_mean=False, remove_std=False)
    np.testing.assert_allclose(adv[:3, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(adv[3], 0.0)


def test_gigpo_with_verl_agents_rules():
    """group_count=turn, gigpo_mode=mean_norm, gigpo_step_penalty=own_turn: verl-agent's episode_norm_reward
    and step_norm_reward on compute_step_discounted_returns, with apply_invalid_action_penalty's
    penalty subtracted from the turn's step reward after discounting."""
    b = build_batch(verl_agent_samples(), prompt_buckets=(4,), response_len=2, rows=4, pad_id=0,
                    padding_id_start=1000)
    c = config_with("gigpo")
    c.algo.group_count, c.algo.gigpo_mode, c.algo.gigpo_step_penalty = "turn", "mean_norm", "own_turn"
    adv = np.asarray(make_advantage_fn(c)(b)["advantages"])
    episode = official_group_norm([10.0, 9.9, 0.0], [0, 0, 0], singleton_own_mean=False, remove_std=True)
    env_returns = [0.95 * 10.0, 10.0, 0.0]              # the environment's reward, discounted
    step_rewards = [env_returns[0], env_returns[1] - 0.1, env_returns[2]]
    anchors = [0, 1, 0]                                  # sample() uses the turn index as anchor
    step = official_group_norm(step_rewards, anchors, singleton_own_mean=True, remove_std=True)
    assert step[1] == 0.0  # the lone observation of turn 1
    np.testing.assert_allclose(adv[:3, 0], episode + step, rtol=1e-5)
    # The default discounts turn 1's penalty into turn 0's return as well: 9.5 - 0.95 x 0.1.
    c.algo.gigpo_step_penalty = "discounted"
    discounted = np.asarray(make_advantage_fn(c)(b)["advantages"])
    step_rewards[0] = env_returns[0] - 0.95 * 0.1
    step = official_group_norm(step_rewards, anchors, singleton_own_mean=True, remove_std=True)
    np.testing.assert_allclose(discounted[:3, 0], episode + step, rtol=1e-5)
