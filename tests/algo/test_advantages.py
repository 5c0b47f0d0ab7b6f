"""Advantage estimators against numpy loops written from the spec (verl's conventions)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.algo import (
    expand_to_tokens,
    gae_advantages,
    gigpo_advantages,
    grpo_advantages,
    place_reward_on_last_token,
    rloo_advantages,
    step_discounted_returns,
    whiten_advantages,
)


def numpy_gae(rewards, values, mask, gamma, lam):
    """Right-to-left over each row's valid tokens: delta = r + gamma V_next - V, A = delta + gamma lam A_next."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t] = next_advantage
    returns = np.where(mask > 0, advantages + values, 0.0)
    return advantages, returns


jit_gae = jax.jit(gae_advantages, static_argnames=("gamma", "lam"))


def test_gae_hand_computed():
    # one turn, 3 tokens, reward 1 on the last, gamma = lam = 1: A_t = R - V_t, R = 1
    rewards = jnp.array([[0.0, 0.0, 1.0, 0.0]])
    values = jnp.array([[0.2, 0.5, 0.9, 7.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages, [[0.8, 0.5, 0.1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0, 0.0]], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.sampled_from([1.0, 0.9]), lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_gae_matches_numpy_loop(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    shape = (4, 6)
    mask = (rng.random(shape) < 0.7).astype(np.float32)
    rewards = np.asarray(place_reward_on_last_token(jnp.asarray(rng.normal(size=4), jnp.float32), jnp.asarray(mask)))
    rewards = rewards + (rng.random(shape) < 0.2) * rng.normal(size=shape).astype(np.float32) * mask
    values = rng.normal(size=shape).astype(np.float32)
    advantages, returns = jit_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    want_advantages, want_returns = numpy_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, want_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-5)


def test_place_reward_on_last_token():
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], jnp.float32)
    rewards = place_reward_on_last_token(jnp.array([10.0, -0.1, 5.0, 2.0]), mask)
    expected = np.zeros((4, 4))
    expected[0, 1], expected[1, 3], expected[3, 2] = 10.0, -0.1, 2.0
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    expanded = expand_to_tokens(jnp.array([1.0, 2.0, 3.0, 4.0]), mask)
    np.testing.assert_allclose(expanded, mask * np.array([[1], [2], [3], [4]]))


def test_whitening_matches_numpy():
    rng = np.random.default_rng(0)
    advantages = rng.normal(loc=3.0, scale=2.0, size=(3, 5)).astype(np.float32)
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    valid = advantages[mask > 0].astype(np.float64)
    expected = (advantages - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    got = whiten_advantages(jnp.asarray(advantages), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[mask > 0], expected[mask > 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[mask == 0], 0.0)
    unshifted = whiten_advantages(jnp.asarray(advantages), jnp.asarray(mask), shift_mean=False)
    np.testing.assert_allclose(np.asarray(unshifted)[mask > 0], expected[mask > 0] + valid.mean(), rtol=1e-4)


def numpy_group_normalize(scores, groups, members, normalize_by_std, eps=1e-6, singleton_mean="zero"):
    """verl's GRPO statistics: mean and unbiased std over each group's members. A one-member group
    has std 1 and mean 0 (verl's GRPO; singleton_mean="zero") or its own score (GiGPO's
    step_norm_reward; singleton_mean="own")."""
    by_group = collections.defaultdict(list)
    for i in np.nonzero(members)[0]:
        by_group[groups[i]].append(scores[i])
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        group = by_group[groups[i]]
        if len(group) > 1:
            mean, std = np.mean(group), np.std(group, ddof=1)
        else:
            mean, std = (group[0] if singleton_mean == "own" else 0.0), 1.0
        out[i] = (scores[i] - mean) / (std + eps) if normalize_by_std else scores[i] - mean
    return out


def official_norm_reward(scores, index, traj_index, *, cross_all_data, singleton_own_mean, remove_std, eps=1e-6):
    """The loop of verl-agent's compute_grpo_outcome_advantage / episode_norm_reward /
    step_norm_reward (gigpo/core_gigpo.py), in numpy: rows join id2score[index] unless their
    (index, traj_index) pair was seen and cross_all_data is False; a one-member group has std 1
    and mean 0 (GRPO, episode level) or mean = its own score (step level)."""
    id2score = collections.defaultdict(list)
    seen_pairs = set()
    for i in range(len(scores)):
        if (index[i], traj_index[i]) in seen_pairs:
            continue
        id2score[index[i]].append(scores[i])
        if not cross_all_data:
            seen_pairs.add((index[i], traj_index[i]))
    id2mean, id2std = {}, {}
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx] = float(np.mean(group)) if singleton_own_mean else 0.0
            id2std[idx] = 1.0
        else:
            id2mean[idx] = float(np.mean(group))
            id2std[idx] = float(np.std(group, ddof=1))  # torch.std: unbiased
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        if remove_std:
            out[i] = scores[i] - id2mean[index[i]]
        else:
            out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return out


def test_grpo_hand_computed():
    # group 0: scores 0, 10, 10, 0 (mean 5, unbiased std sqrt(100/3)); group 1: a single trajectory
    scores = jnp.array([0.0, 10.0, 10.0, 0.0, 3.0])
    groups = jnp.array([4, 4, 4, 4, 9])
    std = np.sqrt(100.0 / 3.0)
    z = 5 / (std + 1e-6)
    np.testing.assert_allclose(grpo_advantages(scores, groups), [-z, z, z, -z, 3.0 / (1 + 1e-6)], rtol=1e-5)
    np.testing.assert_allclose(grpo_advantages(scores, groups, normalize_by_std=False), [-5, 5, 5, -5, 3.0], rtol=1e-6)


MAX_ROWS = 36
jit_grpo = jax.jit(grpo_advantages, static_argnames=("normalize_by_std",))
jit_rloo = jax.jit(rloo_advantages)
jit_gigpo = jax.jit(gigpo_advantages, static_argnames=("omega", "gamma", "normalize_by_std", "group_count"))
jit_step_returns = jax.jit(step_discounted_returns, static_argnames=("gamma",))


@st.composite
def turn_batches(draw):
    """Turn samples of trajectories in episode groups: (scores, group, traj, turn, anchor, valid)."""
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    rows = []
    for group in range(draw(st.integers(1, 3))):
        for traj in range(draw(st.integers(1, 4))):
            traj_id = 100 * group + traj
            score = float(rng.choice([0.0, 10.0, 3.0]))
            for turn in range(int(rng.integers(1, 4))):
                rows.append((score, group, traj_id, turn, int(rng.integers(0, 3)), bool(rng.random() < 0.9)))
    # Pad to a fixed row count with invalid rows so that one compilation serves every example.
    rows += [(7.0, int(rng.integers(0, 3)), int(rng.integers(0, 300)), 0, 0, False)] * (MAX_ROWS - len(rows))
    order = rng.permutation(len(rows))
    columns = list(zip(*[rows[i] for i in order]))
    return [np.array(c) for c in columns]


@settings(max_examples=30, deadline=None)
@given(batch=turn_batches(), normalize_by_std=st.booleans())
def test_grpo_counts_each_trajectory_once(batch, normalize_by_std):
    scores, groups, trajs, _, _, valid = batch
    # members: the first valid row of each trajectory
    members = np.zeros(len(scores), bool)
    seen = set()
    for i in range(len(scores)):
        if valid[i] and trajs[i] not in seen:
            members[i] = True
            seen.add(trajs[i])
    expected = np.where(valid, numpy_group_normalize(scores, groups, members, normalize_by_std), 0.0)
    got = jit_grpo(
        scores.astype(np.float32), groups, traj_id_N=trajs, valid_N=valid, normalize_by_std=normalize_by_std
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(batch=turn_batches())
def test_rloo_is_score_minus_mean_of_the_others(batch):
    scores, groups, trajs, _, _, valid = batch
    first = {}
    for i in range(len(scores)):
        if valid[i]:
            first.setdefault(trajs[i], i)
    expected = np.zeros(len(scores))
    for i in np.nonzero(valid)[0]:
        others = [scores[j] for t, j in first.items() if groups[j] == groups[i] and t != trajs[i]]
        expected[i] = scores[i] - np.mean(others) if others else scores[i]
    got = jit_rloo(scores.astype(np.float32), groups, traj_id_N=trajs, valid_N=valid)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def numpy_step_returns(rewards, trajs, turns, valid, gamma):
    """G_t = r_t + gamma G_{t+1} along each trajectory's turns."""
    returns = np.zeros(len(rewards))
    for traj in set(trajs[valid]):
        rows = sorted((turns[i], i) for i in np.nonzero((trajs == traj) & valid)[0])
        running, previous_turn = 0.0, None
        for turn, i in reversed(rows):
            if previous_turn is not None:
                running *= gamma ** (previous_turn - turn)
            running = rewards[i] + running
            returns[i] = running
            previous_turn = turn
    return returns


def test_step_discounted_returns_hand_computed():
    # one trajectory with turns 0, 1, 2 (shuffled rows) and rewards -0.1, 0, 10
    rewards = jnp.array([10.0, -0.1, 0.0])
    turns = jnp.array([2, 0, 1])
    got = step_discounted_returns(rewards, jnp.zeros(3, jnp.int32), turns, gamma=0.95)
    np.testing.assert_allclose(got, [10.0, -0.1 + 0.95**2 * 10.0, 0.95 * 10.0], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(batch=turn_batches())
def test_grpo_counting_every_turn_sample_matches_the_official_loop(batch):
    """algo.group_count="turn": verl-agent's compute_mean_std_cross_all_data=True, row by row."""
    scores, groups, trajs, _, _, valid = batch
    scores = scores + np.random.default_rng(len(scores)).choice([0.0, -0.1], size=len(scores))  # per-turn scores
    rows = np.nonzero(valid)[0]
    for remove_std in (False, True):
        expected = np.zeros(len(scores))
        expected[rows] = official_norm_reward(scores[rows], groups[rows], trajs[rows], cross_all_data=True,
                                              singleton_own_mean=False, remove_std=remove_std)
        got = jit_grpo(scores.astype(np.float32), groups, valid_N=valid, normalize_by_std=not remove_std)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_grpo_counting_rules_by_hand():
    # One group: trajectory 0 has three turns scored 10, trajectory 1 one turn scored 0.
    scores = jnp.array([10.0, 10.0, 10.0, 0.0])
    groups = jnp.zeros(4, jnp.int32)
    trajs = jnp.array([0, 0, 0, 1])
    # Each trajectory once: mean 5, std sqrt(50).
    np.testing.assert_allclose(grpo_advantages(scores, groups, traj_id_N=trajs, normalize_by_std=False),
                               [5.0, 5.0, 5.0, -5.0], rtol=1e-6)
    # Every turn sample (verl-agent): mean 7.5 -- the longer trajectory weighs three times.
    np.testing.assert_allclose(grpo_advantages(scores, groups, normalize_by_std=False),
                               [2.5, 2.5, 2.5, -7.5], rtol=1e-6)


def test_gigpo_one_member_step_groups_get_step_advantage_zero():
    """GiGPO's step_norm_reward: a step group of one member is centred on its own return."""
    scores = jnp.array([10.0, 0.0, 0.0])
    step_rewards = jnp.array([10.0, 0.0, 3.0])
    groups = jnp.zeros(3, jnp.int32)
    trajs = jnp.array([0, 1, 2])
    turns = jnp.zeros(3, jnp.int32)
    anchors = jnp.array([7, 7, 8])  # rows 0, 1 share an observation; row 2 saw one nobody else saw
    for normalize_by_std in (True, False):
        got = gigpo_advantages(scores, step_rewards, groups, trajs, turns, anchors, omega=1.0,
                               normalize_by_std=normalize_by_std)
        episode = np.asarray(grpo_advantages(scores, groups, traj_id_N=trajs, normalize_by_std=normalize_by_std))
        step = np.array([5.0, -5.0, 0.0]) / ((np.sqrt(50.0) + 1e-6) if normalize_by_std else 1.0)
        np.testing.assert_allclose(got, episode + step, rtol=1e-5)
    # The lone row's step advantage is 0, not its return of 3 (what mean 0, std 1 would give).
    np.testing.assert_allclose(got[2] - episode[2], 0.0, atol=1e-6)


def test_gigpo_own_turn_rewards_are_added_after_discounting():
    # One trajectory, turns 0, 1, 2; penalty -0.1 at turn 0 and 1; reward 10 at the end. A second
    # trajectory with the same observations makes each step group two members.
    step_rewards = jnp.array([0.0, 0.0, 10.0, 0.0, 0.0, 0.0])
    penalties = jnp.array([-0.1, -0.1, 0.0, 0.0, 0.0, 0.0])
    trajs = jnp.array([0, 0, 0, 1, 1, 1])
    turns = jnp.array([0, 1, 2, 0, 1, 2])
    groups = jnp.zeros(6, jnp.int32)
    anchors = turns
    scores = jnp.array([10.0, 10.0, 10.0, 0.0, 0.0, 0.0])
    got = gigpo_advantages(scores, step_rewards, groups, trajs, turns, anchors, omega=1.0, gamma=0.5,
                           normalize_by_std=False, own_turn_rewards_N=penalties)
    episode = np.array([5.0, 5.0, 5.0, -5.0, -5.0, -5.0])
    returns_0 = np.array([2.5 - 0.1, 5.0 - 0.1, 10.0])  # discounted 10, then the turn's own penalty
    step = np.concatenate([returns_0 / 2, -returns_0 / 2])
    np.testing.assert_allclose(got, episode + step, rtol=1e-5)


def test_gigpo_step_groups_of_equal_returns_get_exactly_zero():
    """Turn samples whose discounted returns are equal in exact arithmetic form a step group with
    A_step = 0 exactly, wherever their rows sit: returns follow the recursion G = r + gamma G_next
    (one rounding path per reward sequence) and the group mean of equal returns is that return.
    Trajectories 0..3 share turn 0's anchor and the rewards -0.1, -0.1 (2 and 3 add a turn of reward
    0); their rows are spread over 36 so that a position-dependent sum would split them."""
    num_rows = 36
    traj_N, turn_N = np.full(num_rows, 99), np.zeros(num_rows, np.int32)
    rewards_N, valid_N = np.zeros(num_rows, np.float32), np.zeros(num_rows, bool)
    layout = {0: [2, 7], 1: [9, 13], 2: [4, 28, 22], 3: [30, 11, 35]}  # traj -> its rows, turn by turn
    for traj, rows in layout.items():
        for turn, row in enumerate(rows):
            traj_N[row], turn_N[row], valid_N[row] = traj, turn, True
            rewards_N[row] = -0.1 if turn < 2 else 0.0
    anchor_N = np.where(turn_N == 0, 0, 1 + turn_N * 10 + traj_N)  # only turn 0 shares an anchor
    got = jit_gigpo(np.zeros(num_rows, np.float32), rewards_N, np.zeros(num_rows, np.int32), traj_N, turn_N,
                    anchor_N, omega=1.0, gamma=0.95, normalize_by_std=True, valid_N=valid_N)
    returns = np.asarray(jit_step_returns(rewards_N, traj_N, turn_N, gamma=0.95, valid_N=valid_N))
    first_turns = [rows[0] for rows in layout.values()]
    assert len(set(returns[first_turns].tolist())) == 1, returns[first_turns]
    np.testing.assert_array_equal(np.asarray(got), np.zeros(num_rows))


@settings(max_examples=30, deadline=None)
@given(batch=turn_batches(), normalize_by_std=st.booleans(), omega=st.sampled_from([1.0, 0.5]),
       group_count=st.sampled_from(["trajectory", "turn"]))
def test_gigpo_matches_the_official_rules(batch, normalize_by_std, omega, group_count):
    """Episode level: episode_norm_reward (each trajectory once, or every turn sample as verl-agent's
    cross_all_data=True); step level: step_norm_reward over (episode group, anchor) groups."""
    scores, groups, trajs, turns, anchors, valid = batch
    rng = np.random.default_rng(len(scores))
    step_rewards = rng.choice([0.0, -0.1, 10.0], size=len(scores))
    gamma = 0.95
    rows = np.nonzero(valid)[0]
    episode = np.zeros(len(scores))
    episode[rows] = official_norm_reward(scores[rows], groups[rows], trajs[rows],
                                         cross_all_data=group_count == "turn", singleton_own_mean=False,
                                         remove_std=not normalize_by_std)
    step_returns = numpy_step_returns(step_rewards, trajs, turns, valid, gamma)
    step_groups = np.array([hash((g, a)) for g, a in zip(groups, anchors)])
    step = np.zeros(len(scores))
    step[rows] = official_norm_reward(step_returns[rows], step_groups[rows], rows, cross_all_data=True,
                                      singleton_own_mean=True, remove_std=not normalize_by_std)
    expected = np.where(valid, episode + omega * step, 0.0)
    got = jit_gigpo(
        scores.astype(np.float32), step_rewards.astype(np.float32), groups, trajs, turns, anchors,
        omega=omega, gamma=gamma, normalize_by_std=normalize_by_std, valid_N=valid, group_count=group_count,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        jit_step_returns(step_rewards.astype(np.float32), trajs, turns, gamma=gamma, valid_N=valid),
        np.where(valid, step_returns, 0.0), rtol=1e-5, atol=1e-5,
    )


def test_gigpo_step_groups_need_the_same_episode_group_and_anchor():
    # two episode groups, identical anchor id 5 in both: step groups must not mix across episode groups
    scores = jnp.array([10.0, 0.0, 10.0, 0.0])
    step_rewards = jnp.array([10.0, 0.0, 4.0, 2.0])
    groups = jnp.array([0, 0, 1, 1])
    trajs = jnp.array([0, 1, 2, 3])
    anchors = jnp.array([5, 5, 5, 5])
    turns = jnp.zeros(4, jnp.int32)
    got = gigpo_advantages(scores, step_rewards, groups, trajs, turns, anchors, normalize_by_std=False)
    # episode: +-5 in each group; step: group 0 returns 10, 0 -> +-5; group 1 returns 4, 2 -> +-1
    np.testing.assert_allclose(got, [10.0, -10.0, 6.0, -6.0], rtol=1e-6)


def test_group_methods_are_jittable_and_accept_numpy():
    scores = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    groups = np.array([3, 3, 7, 7])
    eager = grpo_advantages(scores, groups)
    jitted = jax.jit(grpo_advantages, static_argnames=("normalize_by_std", "eps"))(scores, groups)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    trajs = np.arange(4)
    turns = np.zeros(4, np.int32)
    gigpo_args = (scores, scores, groups, trajs, turns, groups)
    jitted_gigpo = jax.jit(lambda *a: gigpo_advantages(*a, omega=1.0, gamma=0.95))(*gigpo_args)
    np.testing.assert_allclose(jitted_gigpo, gigpo_advantages(*gigpo_args), rtol=1e-6)


def test_shape_mismatch_is_rejected():
    with pytest.raises(AssertionError):
        grpo_advantages(jnp.zeros(3), jnp.zeros(4, jnp.int32))
