"""EPO's phase weight, smoothing penalty and entropy history against the paper's formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_jax.algo import (
    code_phase_weight,
    code_smoothing_penalty,
    entropy_history_init,
    entropy_history_reference,
    entropy_history_turn_reference,
    entropy_history_update,
    entropy_sums,
    phase_weight,
    smoothing_penalty,
)


def test_phase_weight_values():
    # Eq. 5 with K = 125: k_mid = 62, beta_0 = 2, beta_kmid = 1 + e^-3
    np.testing.assert_allclose(phase_weight(0, 125, 3.0), 2.0, rtol=1e-7)
    np.testing.assert_allclose(phase_weight(62, 125, 3.0), 1.0 + math.exp(-3.0), rtol=1e-6)
    np.testing.assert_allclose(phase_weight(124, 125, 3.0), 1.0 + math.exp(-6.0), rtol=1e-6)
    np.testing.assert_allclose(phase_weight(75, 150, 2.0), 1.0 + math.exp(-2.0), rtol=1e-6)
    steps = jnp.arange(125)
    weights = jax.jit(lambda k: phase_weight(k, 125, 3.0))(steps)
    assert np.all(np.diff(np.asarray(weights)) < 0)


def test_phase_weight_rejects_a_run_too_short_for_a_midpoint():
    with pytest.raises(ValueError, match="total_steps"):
        phase_weight(0, 1, 3.0)


def test_code_phase_weight_curve():
    # official curve: 1 - 0.2 (1 - e^{-2p}) up to epoch 75, then 0.8 e^{-3p}
    np.testing.assert_allclose(code_phase_weight(0), 1.0, rtol=1e-7)
    np.testing.assert_allclose(code_phase_weight(30), 1.0 - 0.2 * (1.0 - math.exp(-2.0 * 30 / 75)), rtol=1e-6)
    np.testing.assert_allclose(code_phase_weight(75), 1.0 - 0.2 * (1.0 - math.exp(-2.0)), rtol=1e-6)
    np.testing.assert_allclose(code_phase_weight(76), 0.8 * math.exp(-3.0 / 75), rtol=1e-6)
    np.testing.assert_allclose(code_phase_weight(150), 0.8 * math.exp(-3.0), rtol=1e-6)
    np.testing.assert_allclose(code_phase_weight(400), 0.8 * math.exp(-3.0), rtol=1e-6)


def test_smoothing_penalty_values():
    # reference 1.0, corridor [0.5, 1.5]
    entropy = jnp.array([0.1, 0.5, 1.0, 1.5, 2.5])
    np.testing.assert_allclose(smoothing_penalty(entropy, 1.0, 0.5, 1.5), [0.4, 0.0, 0.0, 0.0, 1.0], rtol=1e-6)


def test_smoothing_penalty_gradient_outside_and_inside_the_corridor():
    entropy = jnp.array([0.1, 0.7, 1.2, 2.5])
    grad = jax.grad(lambda h: jnp.sum(smoothing_penalty(h, 1.0, 0.5, 1.5)))(entropy)
    np.testing.assert_array_equal(grad, [-1.0, 0.0, 0.0, 1.0])
    # the reference is a constant: no gradient flows into it
    ref_grad = jax.grad(lambda r: jnp.sum(smoothing_penalty(entropy, r, 0.5, 1.5)))(1.0)
    np.testing.assert_array_equal(ref_grad, 0.0)


def test_smoothing_penalty_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        entropy = jnp.array([0.05, 0.3, 0.9, 1.7, 3.0], jnp.float64)
        weights = jnp.array([1.0, -2.0, 0.5, 3.0, 1.5], jnp.float64)

        def objective(h):
            return jnp.sum(weights * smoothing_penalty(h, 1.1, 0.4, 1.6))

        grad = np.asarray(jax.grad(objective)(entropy))
        step = 1e-6
        numeric = [
            (objective(entropy + step * e) - objective(entropy - step * e)) / (2 * step) for e in jnp.eye(5)
        ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_code_smoothing_penalty_is_a_gradient_free_indicator():
    entropy = jnp.array([0.5, 0.81, 1.0, 1.19, 1.2, 3.0])
    penalty = code_smoothing_penalty(entropy, jnp.ones(6), 0.8, 1.2, 0.1)
    # strict corridor (0.8, 1.2): the boundary value 1.2 is outside
    np.testing.assert_allclose(penalty, [0.1, 0.0, 0.0, 0.0, 0.1, 0.1], rtol=1e-6)
    grad = jax.grad(lambda h: jnp.sum(code_smoothing_penalty(h, jnp.ones(6), 0.8, 1.2, 0.1)))(entropy)
    np.testing.assert_array_equal(grad, 0.0)


def _numpy_step(entropy, mask, turns):
    """One RL step's token-mean entropy and per-turn-index token means (absent turns: None)."""
    valid = mask > 0
    per_turn = {}
    for turn in set(turns.tolist()):
        rows = turns == turn
        if valid[rows].any():
            per_turn[turn] = entropy[rows][valid[rows]].mean()
    return entropy[valid].mean(), per_turn


def test_entropy_history_over_several_steps():
    rng = np.random.default_rng(0)
    max_turns = 6
    state = entropy_history_init(max_turns)
    assert float(entropy_history_reference(state)) == 0.0 and int(state.num_steps) == 0
    update = jax.jit(entropy_history_update)
    step_means, turn_means = [], {t: [] for t in range(max_turns)}
    for step in range(4):
        entropy = rng.uniform(0.0, 3.0, size=(5, 4)).astype(np.float32)
        mask = (rng.random((5, 4)) < 0.6).astype(np.float32)
        mask[0, 0] = 1.0
        turns = rng.integers(0, 4, size=5).astype(np.int32)
        # Eq. 4: the reference at step k is the mean of the k previous batch means (current excluded)
        if step > 0:
            np.testing.assert_allclose(entropy_history_reference(state), np.mean(step_means), rtol=1e-6)
        # code variant: the per-turn reference includes the current step
        current = entropy_sums(jnp.asarray(entropy), jnp.asarray(mask), jnp.asarray(turns), max_turns)
        step_mean, per_turn = _numpy_step(entropy, mask, turns)
        inclusive = entropy_history_turn_reference(state, current)
        for turn in range(max_turns):
            history = turn_means[turn] + ([per_turn[turn]] if turn in per_turn else [])
            np.testing.assert_allclose(inclusive[turn], np.mean(history) if history else 0.0, rtol=1e-5, atol=1e-7)
        state = update(state, jnp.asarray(entropy), jnp.asarray(mask), jnp.asarray(turns))
        step_means.append(step_mean)
        for turn, mean in per_turn.items():
            turn_means[turn].append(mean)
    assert int(state.num_steps) == 4
    np.testing.assert_allclose(entropy_history_reference(state), np.mean(step_means), rtol=1e-6)


def test_entropy_history_ignores_steps_without_tokens():
    state = entropy_history_init(3)
    state = entropy_history_update(state, jnp.full((2, 2), 1.5), jnp.ones((2, 2)), jnp.array([0, 1]))
    state = entropy_history_update(state, jnp.full((2, 2), 9.0), jnp.zeros((2, 2)), jnp.array([0, 1]))
    assert int(state.num_steps) == 1
    np.testing.assert_allclose(entropy_history_reference(state), 1.5)
    np.testing.assert_array_equal(state.turn_num_steps_M, [1, 1, 0])


def test_entropy_sums_are_detached_and_additive():
    entropy = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    turns = jnp.array([2, 0])
    sums = entropy_sums(entropy, mask, turns, 4)
    np.testing.assert_allclose(sums.entropy_sum, 8.0)
    np.testing.assert_allclose(sums.token_count, 3.0)
    np.testing.assert_allclose(sums.turn_entropy_sum_M, [7.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(sums.turn_token_count_M, [2.0, 0.0, 1.0, 0.0])
    grad = jax.grad(lambda h: entropy_sums(h, mask, turns, 4).entropy_sum)(entropy)
    np.testing.assert_array_equal(grad, 0.0)
