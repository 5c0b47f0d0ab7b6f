"""AEPO, Clip-Cov, KL-Cov and high-entropy token selection against numpy re-implementations of
docs/algorithms.md sections 2 (c), (d) and 3, with per-token gradients from jax.grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_jax.algo import (
    ENTROPY_CONTROL_METRICS,
    ENTROPY_CONTROLS,
    LossSettings,
    clip_cov_token_losses,
    descending_rank,
    entropy_aware_advantages,
    fraction_count,
    loss_state_init,
    make_loss_fn,
    ppo_token_losses,
)
from epo_jax.algo import token_priorities as eager_token_priorities

from .base_config import load_base_config
from .test_loss import make_batch, make_params, np_head, np_k3, toy_forward

ROWS, SEQ = 6, 8
# seed and num_positions are static, as in the loss, which compiles them in.
token_priorities = jax.jit(eager_token_priorities, static_argnums=(0, 4))

# --- numpy re-implementation from the formulas -----------------------------------------------------


def np_token_mean(x, mask):
    return float((x * mask).sum() / mask.sum())


def np_count(fraction, mask):
    """k = max(1, int(fraction * N)) as the papers' code writes it (float64)."""
    return max(1, int(fraction * int(mask.sum())))


def np_standardized(entropy, mask):
    valid = entropy[mask > 0]
    std = valid.std(ddof=1) if valid.size > 1 else 0.0
    std = std if std > 0 else 1.0
    return np.where(mask > 0, (entropy - valid.mean()) / std, 0.0)


def np_ppo(logp, old, adv, clip_low, clip_high, dual, balanced=False):
    """Per-token loss, d loss / d logp, and whether the ratio / dual clip holds the token.

    A >= 0: l = -A min(r, 1 + eh); gradient -A r below the bound, 0 above it (AEPO: -(1 + eh) A).
    A < 0:  l = min(|A| max(r, 1 - el), |A| c); gradient |A| r where r > 1 - el and |A| r < |A| c.
    """
    r = np.exp(np.clip(logp - old, -20, 20))
    loss = np.zeros_like(r)
    grad = np.zeros_like(r)
    clipped = np.zeros(r.shape, bool)
    lower = np.zeros(r.shape, bool)
    for i in np.ndindex(r.shape):
        a, ri = adv[i], r[i]
        if a >= 0:
            if ri > 1 + clip_high:  # the ratio clip holds the token (for a > 0)
                loss[i], clipped[i] = -a * (1 + clip_high), a > 0
                grad[i] = -a * (1 + clip_high) if balanced else 0.0
            else:
                loss[i], grad[i] = -a * ri, -a * ri
        else:
            value = -a * max(ri, 1 - clip_low)
            clipped[i] = ri < 1 - clip_low
            if value > -a * dual:
                loss[i], lower[i] = -a * dual, True
            else:
                loss[i], grad[i] = value, (0.0 if clipped[i] else -a * ri)
    return loss, grad, clipped, lower


def np_cov(adv, logp, mask):
    valid = mask > 0
    return np.where(valid, (adv - adv[valid].mean()) * (logp - logp[valid].mean()), 0.0)


def np_top(values, eligible, k):
    """Boolean mask of the k eligible entries of largest value (ties: earlier row-major position)."""
    flat = np.flatnonzero(eligible.reshape(-1))
    order = sorted(flat, key=lambda j: (-values.reshape(-1)[j], j))[:k]
    out = np.zeros(values.size, bool)
    out[order] = True
    return out.reshape(values.shape)


# --- helpers ----------------------------------------------------------------------------------------


def identity_forward(params, batch):
    """The "model" is the per-token log-probs and entropies themselves, so grads are per token."""
    del batch
    return {"logprobs": params["logprobs"], "entropy": params["entropy"]}


def random_case(seed=0, rows=ROWS, seq=SEQ, spread=0.6):
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, seq)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    mask[-1] = 0.0  # one padding row
    old = rng.normal(-1.5, 0.5, (rows, seq)).astype(np.float32)
    params = {
        "logprobs": jnp.asarray(old + rng.normal(0, spread, (rows, seq)).astype(np.float32)),
        "entropy": jnp.asarray(rng.gamma(2.0, 0.5, (rows, seq)).astype(np.float32)),
    }
    batch = {
        "response_mask": jnp.asarray(mask),
        "old_logprobs": jnp.asarray(old),
        "advantages": jnp.asarray(rng.normal(0, 1.5, (rows, seq)).astype(np.float32)),
        "traj_id": jnp.asarray(np.arange(rows) // 2 + 7, jnp.int32),
        "turn_index": jnp.asarray(np.arange(rows) % 2, jnp.int32),
    }
    return params, batch


def config_for(control, **algo):
    config = load_base_config()
    config.algo.entropy_control = control
    config.algo.use_kl_loss = False
    config.algo.clip_high = 0.28
    config.train.total_steps = 10
    for key, value in algo.items():
        config.algo[key] = value
    return config


def compiled(config, forward=identity_forward):
    """run(params, batch, step) -> (loss, metrics, grads) of one jitted value_and_grad."""
    settings = LossSettings.from_config(config)
    step_fn = jax.jit(jax.value_and_grad(make_loss_fn(settings, forward), has_aux=True))
    state = loss_state_init(settings)

    def run_step(params, batch, step=0):
        (loss, (metrics, _)), grads = step_fn(params, batch, state._replace(step=jnp.asarray(step, jnp.int32)))
        return float(loss), jax.device_get(metrics), jax.device_get(grads)

    return run_step


def run(config, params, batch, step=0, forward=identity_forward):
    return compiled(config, forward)(params, batch, step)


def as_np(batch, key):
    return np.asarray(batch[key], np.float64)


# --- counts and ranks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction, num_valid, expected", [
    (2e-4, 10_000, 2), (2e-4, 9_999, 1), (2e-4, 100, 1), (0.2, 10, 2), (0.2, 14, 2), (0.2, 15, 3),
    (2e-3, 1_500, 3), (1.0, 7, 7), (0.5, 0, 1),
])
def test_fraction_count_is_max_1_floor(fraction, num_valid, expected):
    mask = np.zeros(20_000, np.float32)
    mask[:num_valid] = 1.0
    assert int(fraction_count(fraction, jnp.asarray(mask.reshape(100, 200)))) == expected
    assert np_count(fraction, mask) == expected


def test_descending_rank_orders_eligible_entries_and_breaks_ties_by_position():
    values = jnp.array([[0.5, 2.0, 0.5], [9.0, 2.0, -1.0]])
    eligible = jnp.array([[1, 1, 1], [0, 1, 1]])
    rank = np.asarray(descending_rank(values, eligible))
    # Eligible by value: 2.0 (0,1), 2.0 (1,1), 0.5 (0,0), 0.5 (0,2), -1 (1,2); 9.0 is not eligible.
    np.testing.assert_array_equal(rank, [[2, 0, 3], [5, 1, 4]])


# --- AEPO ---------------------------------------------------------------------------------------------


def test_entropy_aware_advantages_match_numpy():
    params, batch = random_case(seed=3)
    mask = as_np(batch, "response_mask")
    entropy, adv = np.asarray(params["entropy"], np.float64), as_np(batch, "advantages")
    shaped = entropy_aware_advantages(batch["advantages"], params["entropy"], batch["response_mask"], 0.2)
    expected_scale = 1 + 0.2 * np_standardized(entropy, mask)
    np.testing.assert_allclose(np.asarray(shaped.scale_BxT), expected_scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(shaped.advantages_BxT), adv * expected_scale, rtol=1e-5, atol=1e-6)


def test_entropy_aware_advantages_with_constant_entropy_leave_advantages_unchanged():
    """std = 0 counts as 1, so z = 0 and A is unchanged (no division by zero)."""
    _, batch = random_case(seed=4)
    shaped = entropy_aware_advantages(
        batch["advantages"], jnp.full((ROWS, SEQ), 1.7), batch["response_mask"], 0.2
    )
    np.testing.assert_array_equal(np.asarray(shaped.advantages_BxT), np.asarray(batch["advantages"]))


def test_balanced_clip_has_ppo_values_and_keeps_gradient_above_the_upper_bound():
    # Tokens: A > 0 above 1 + eh (PPO: no gradient); A > 0 inside; A < 0 above 1 + eh (unclipped);
    # A < 0 beyond the dual clip; A < 0 below 1 - el (clipped); A > 0 below 1 - el (unclipped).
    log_ratio = jnp.array([[0.6, 0.1, 0.6, 1.5, -0.5, -0.5]])
    adv = jnp.array([[2.0, 1.0, -1.0, -1.0, -1.0, 0.5]])
    old = jnp.zeros_like(log_ratio)

    def per_token(balanced):
        def total(logp):
            return jnp.sum(ppo_token_losses(
                logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0, balanced_upper_clip=balanced
            ).loss_BxT)
        terms = ppo_token_losses(log_ratio, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                                 balanced_upper_clip=balanced)
        return terms, np.asarray(jax.grad(total)(log_ratio))

    ppo_terms, ppo_grad = per_token(False)
    aepo_terms, aepo_grad = per_token(True)
    for ppo_value, aepo_value in zip(ppo_terms, aepo_terms):
        np.testing.assert_array_equal(np.asarray(ppo_value), np.asarray(aepo_value))
    assert ppo_grad[0, 0] == 0.0
    np.testing.assert_allclose(aepo_grad[0, 0], -1.28 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(aepo_grad[0, 1:], ppo_grad[0, 1:])
    _, np_grad, _, _ = np_ppo(np.asarray(log_ratio, np.float64), 0.0, np.asarray(adv, np.float64), 0.2, 0.28, 3.0,
                              balanced=True)
    np.testing.assert_allclose(aepo_grad, np_grad, rtol=1e-6)


def test_aepo_loss_and_gradient_match_numpy():
    params, batch = random_case(seed=5, rows=8, seq=12, spread=0.5)
    loss, metrics, grads = run(config_for("aepo"), params, batch)
    mask, adv = as_np(batch, "response_mask"), as_np(batch, "advantages")
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    shaped = adv * (1 + 0.2 * np_standardized(np.asarray(params["entropy"], np.float64), mask))
    token_loss, token_grad, _, _ = np_ppo(logp, old, shaped, 0.2, 0.28, 3.0, balanced=True)
    above = (shaped > 0) & (np.exp(logp - old) > 1.28) & (mask > 0)
    assert above.sum() >= 2, "the case must hold tokens above the upper clip"
    np.testing.assert_allclose(loss, np_token_mean(token_loss, mask), rtol=1e-5)
    np.testing.assert_allclose(grads["logprobs"], token_grad * mask / mask.sum(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["aepo_upper_clipfrac"], above.sum() / mask.sum(), rtol=1e-6)
    scale = (1 + 0.2 * np_standardized(np.asarray(params["entropy"], np.float64), mask))[mask > 0]
    np.testing.assert_allclose([metrics["aepo_adv_scale_min"], metrics["aepo_adv_scale_max"]],
                               [scale.min(), scale.max()], rtol=1e-5)
    # The entropy only reshapes the advantage: no gradient reaches it.
    np.testing.assert_array_equal(grads["entropy"], 0.0)


def test_aepo_computes_the_entropy_without_an_entropy_bonus():
    """algo.entropy_coef = 0 (the default) must not switch the entropy-aware advantage off."""
    params, batch = random_case(seed=6)
    config = config_for("aepo", entropy_coef=0.0)
    _, metrics, _ = run(config, params, batch)
    assert metrics["aepo_adv_scale_max"] > 1.0 > metrics["aepo_adv_scale_min"] > 0.0


# --- Clip-Cov -----------------------------------------------------------------------------------------


def np_clip_cov_selection(params, batch, step, ratio, lower, upper, seed=0, dual=np.inf):
    """verl's compute_policy_loss_clip_cov: candidates are valid tokens with lower < Cov < upper that
    the ratio clip does not hold (clip_by_origin = l2 > l1); its loss has no dual clip (dual = inf).
    With a finite dual (the algo.clip_cov_dual_clip variant) dual-clipped tokens are no candidates
    either. torch.randperm's random choice is the candidates of highest priority here."""
    mask, adv = as_np(batch, "response_mask"), as_np(batch, "advantages")
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    _, _, clipped, dual_held = np_ppo(logp, old, adv, 0.2, 0.28, dual)
    cov = np_cov(adv, logp, mask)
    candidates = (mask > 0) & (cov > lower) & (cov < upper) & ~clipped & ~dual_held
    priority = np.asarray(token_priorities(seed, step, batch["traj_id"], batch["turn_index"], mask.shape[1]))
    return np_top(priority, candidates, np_count(ratio, mask)), candidates


def test_clip_cov_zeroes_exactly_the_selected_tokens_and_leaves_the_others_as_ppo():
    params, batch = random_case(seed=7, rows=8, seq=12)
    config = config_for("clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=5.0)
    loss, metrics, grads = run(config, params, batch, step=3)
    _, ppo_metrics, ppo_grads = run(config_for("none", dual_clip=None), params, batch, step=3)

    selected, candidates = np_clip_cov_selection(params, batch, 3, 0.1, 0.05, 5.0)
    mask = as_np(batch, "response_mask")
    assert selected.sum() == np_count(0.1, mask) < candidates.sum(), "a strict, non-trivial subset"
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    token_loss, token_grad, _, _ = np_ppo(logp, old, as_np(batch, "advantages"), 0.2, 0.28, np.inf)
    # Before selection the selected tokens had a gradient; now exactly they have none.
    assert np.all(token_grad[selected] != 0)
    np.testing.assert_array_equal(grads["logprobs"][selected], 0.0)
    np.testing.assert_array_equal(grads["logprobs"][~selected], ppo_grads["logprobs"][~selected])
    np.testing.assert_allclose(grads["logprobs"], np.where(selected, 0.0, token_grad) * mask / mask.sum(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(loss, np_token_mean(np.where(selected, 0.0, token_loss), mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["cov_selected_fraction"], selected.sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["cov_candidate_fraction"], candidates.sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_array_equal(metrics["pg_clipfrac"], ppo_metrics["pg_clipfrac"])
    assert metrics["pg_clipfrac_lower"] == 0.0


@pytest.mark.parametrize("dual_clipped", [False, True])
def test_clip_cov_with_and_without_the_dual_clip(dual_clipped):
    """Tokens with A < 0 and r > dual_clip: verl's Clip-Cov keeps their loss -A r and gradient and
    counts them as candidates; the algo.clip_cov_dual_clip variant holds them at -A c (no gradient)
    and leaves them out of the candidates."""
    params, batch = random_case(seed=13, rows=8, seq=12, spread=1.5)
    config = config_for("clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-1e9, clip_cov_ub=1e9,
                        clip_cov_dual_clip=dual_clipped)
    loss, metrics, grads = run(config, params, batch, step=2)
    mask, adv = as_np(batch, "response_mask"), as_np(batch, "advantages")
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    beyond_dual = (mask > 0) & (adv < 0) & (np.exp(logp - old) > 3.0)
    assert beyond_dual.sum() >= 3, "the case must hold tokens beyond the dual clip"
    dual = 3.0 if dual_clipped else np.inf
    selected, candidates = np_clip_cov_selection(params, batch, 2, 0.05, -1e9, 1e9, dual=dual)
    token_loss, token_grad, _, _ = np_ppo(logp, old, adv, 0.2, 0.28, dual)
    np.testing.assert_allclose(loss, np_token_mean(np.where(selected, 0.0, token_loss), mask), rtol=1e-5)
    np.testing.assert_allclose(grads["logprobs"], np.where(selected, 0.0, token_grad) * mask / mask.sum(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["cov_candidate_fraction"], candidates.sum() / mask.sum(), rtol=1e-6)
    if dual_clipped:
        assert not np.any(candidates & beyond_dual)
        np.testing.assert_array_equal(grads["logprobs"][beyond_dual], 0.0)
        assert metrics["pg_clipfrac_lower"] > 0.0
    else:
        assert np.all(candidates[beyond_dual])
        np.testing.assert_allclose(token_loss[beyond_dual], (-adv * np.exp(logp - old))[beyond_dual], rtol=1e-9)
        assert np.all(grads["logprobs"][beyond_dual & ~selected] != 0)
        assert metrics["pg_clipfrac_lower"] == 0.0


def test_clip_cov_default_bounds_select_max_1_int_ratio_n_tokens():
    """Paper defaults (ratio 2e-4, 1 < Cov < 5): with fewer than 10^4 tokens exactly one token."""
    params, batch = random_case(seed=8, rows=8, seq=12, spread=0.2)
    batch["advantages"] = batch["advantages"] * 4.0  # spread Cov so that some lie in (1, 5)
    loss, metrics, grads = run(config_for("clip_cov"), params, batch, step=1)
    selected, candidates = np_clip_cov_selection(params, batch, 1, 2e-4, 1.0, 5.0)
    assert candidates.sum() >= 2 and selected.sum() == 1
    assert np.all(grads["logprobs"][selected] == 0) and np.all(grads["logprobs"][~selected & candidates] != 0)


@jax.jit
def clip_cov_selected_jit(params, batch, step, priority):
    terms = ppo_token_losses(params["logprobs"], batch["old_logprobs"], batch["advantages"],
                             clip_low=0.2, clip_high=0.28, dual_clip=None)
    return clip_cov_token_losses(terms, batch["advantages"], params["logprobs"], batch["response_mask"], priority,
                                 ratio=0.1, lower=-1e9, upper=1e9).selected_BxT


def clip_cov_selected(params, batch, step, seed=0):
    priority = token_priorities(seed, step, batch["traj_id"], batch["turn_index"], batch["response_mask"].shape[1])
    return np.asarray(clip_cov_selected_jit(params, batch, step, priority)) > 0


def test_clip_cov_random_selection_is_deterministic_and_changes_with_step_and_seed():
    params, batch = random_case(seed=9, rows=16, seq=16, spread=0.1)
    first = clip_cov_selected(params, batch, step=5)
    assert first.sum() == np_count(0.1, as_np(batch, "response_mask"))
    np.testing.assert_array_equal(first, clip_cov_selected(params, batch, step=5))
    assert not np.array_equal(first, clip_cov_selected(params, batch, step=6))
    assert not np.array_equal(first, clip_cov_selected(params, batch, step=5, seed=1))
    # Through the jitted loss as well: same step, same loss; next step, another loss.
    run_step = compiled(config_for("clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-1e9, clip_cov_ub=1e9))
    loss_a, _, _ = run_step(params, batch, step=5)
    loss_b, _, _ = run_step(params, batch, step=5)
    loss_c, _, _ = run_step(params, batch, step=6)
    assert loss_a == loss_b != loss_c


def test_token_priorities_do_not_depend_on_row_order_or_batch_split():
    traj, turn = jnp.array([4, 4, 9, 2, 2, 2], jnp.int32), jnp.array([0, 1, 0, 0, 1, 2], jnp.int32)
    full = np.asarray(token_priorities(0, 7, traj, turn, 5))
    order = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_array_equal(np.asarray(token_priorities(0, 7, traj[order], turn[order], 5)), full[order])
    halves = [np.asarray(token_priorities(0, 7, traj[s], turn[s], 5)) for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_array_equal(np.concatenate(halves), full)
    assert len(np.unique(full)) == full.size and 0.0 <= full.min() and full.max() < 1.0


# --- KL-Cov -------------------------------------------------------------------------------------------


def test_kl_cov_penalises_the_top_k_tokens_by_cov_and_matches_numpy():
    params, batch = random_case(seed=10, rows=8, seq=12, spread=0.6)
    config = config_for("kl_cov", kl_cov_ratio=0.05, kl_cov_coef=1.0)
    loss, metrics, grads = run(config, params, batch)
    mask, adv = as_np(batch, "response_mask"), as_np(batch, "advantages")
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    cov = np_cov(adv, logp, mask)
    k = np_count(0.05, mask)
    selected = np_top(cov, mask > 0, k)
    assert selected.sum() == k >= 3
    # The selected tokens are those of largest Cov among the valid ones.
    assert cov[selected].min() > np.max(cov[(mask > 0) & ~selected])
    ratio = np.exp(logp - old)
    token_loss = -adv * ratio + np.where(selected, np.abs(logp - old), 0.0)
    token_grad = -adv * ratio + np.where(selected, np.sign(logp - old), 0.0)
    np.testing.assert_allclose(loss, np_token_mean(token_loss, mask), rtol=1e-5)
    np.testing.assert_allclose(grads["logprobs"], token_grad * mask / mask.sum(), rtol=1e-4, atol=1e-7)
    penalty = np.where(selected, np.abs(logp - old), 0.0)
    np.testing.assert_allclose(metrics["kl_cov_penalty"], np_token_mean(penalty, mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["cov_selected_fraction"], k / mask.sum(), rtol=1e-6)
    # No ratio clip: a token with A > 0 far above 1 + eh keeps its gradient -A r.
    assert np.any((adv > 0) & (ratio > 1.28) & (mask > 0) & (np.abs(grads["logprobs"]) > 0))
    assert metrics["pg_clipfrac"] == 0.0 and metrics["pg_clipfrac_lower"] == 0.0


# --- high-entropy minority tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_top_entropy_keeps_exactly_the_top_fraction(fraction):
    params, batch = random_case(seed=11, rows=8, seq=12)
    config = config_for("top_entropy", top_entropy_fraction=fraction)
    loss, metrics, grads = run(config, params, batch)
    _, _, ppo_grads = run(config_for("none"), params, batch)
    mask, adv = as_np(batch, "response_mask"), as_np(batch, "advantages")
    logp, old = np.asarray(params["logprobs"], np.float64), as_np(batch, "old_logprobs")
    entropy = np.asarray(params["entropy"], np.float64)
    k = np_count(fraction, mask)
    keep = np_top(entropy, mask > 0, k)
    assert keep.sum() == k and entropy[keep].min() > entropy[(mask > 0) & ~keep].max()
    token_loss, token_grad, _, _ = np_ppo(logp, old, adv, 0.2, 0.28, 3.0)
    np.testing.assert_allclose(loss, np_token_mean(np.where(keep, token_loss, 0.0), mask), rtol=1e-5)
    np.testing.assert_array_equal(grads["logprobs"][~keep], 0.0)
    np.testing.assert_array_equal(grads["logprobs"][keep], ppo_grads["logprobs"][keep])
    np.testing.assert_allclose(grads["logprobs"], np.where(keep, token_grad, 0.0) * mask / mask.sum(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["top_entropy_kept_fraction"], k / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["top_entropy_threshold"], entropy[keep].min(), rtol=1e-6)
    np.testing.assert_array_equal(grads["entropy"], 0.0)


# --- the objective with a model ------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["aepo", "top_entropy"])
def test_full_objective_with_a_toy_model_and_kl_loss(control):
    """The entropy comes from the model's forward pass; L = L_MT(reshaped) + kl_coef * KL."""
    config = config_for(control, use_kl_loss=True, top_entropy_fraction=0.3)
    params, batch = make_params(), make_batch()
    loss, metrics, grads = run(config, params, batch, forward=toy_forward)
    logp, entropy = np_head(params, batch)
    mask, adv, old = as_np(batch, "response_mask"), as_np(batch, "advantages"), as_np(batch, "old_logprobs")
    if control == "aepo":
        token_loss, _, _, _ = np_ppo(logp, old, adv * (1 + 0.2 * np_standardized(entropy, mask)), 0.2, 0.28, 3.0, True)
    else:
        token_loss, _, _, _ = np_ppo(logp, old, adv, 0.2, 0.28, 3.0)
        token_loss = np.where(np_top(entropy, mask > 0, np_count(0.3, mask)), token_loss, 0.0)
    pg = np_token_mean(token_loss, mask)
    kl = np_token_mean(np_k3(logp, as_np(batch, "ref_logprobs")), mask)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5)
    np.testing.assert_allclose(loss, pg + 0.01 * kl, rtol=1e-5)
    assert np.all(np.isfinite(grads["W"])) and np.any(grads["W"] != 0)


# --- metrics and settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("control", ENTROPY_CONTROLS)
def test_each_control_reports_only_its_own_metrics(control):
    params, batch = random_case(seed=12)
    _, metrics, _ = run(config_for(control, clip_cov_lb=-1e9, clip_cov_ub=1e9), params, batch, step=2)
    own = {
        "aepo": {"aepo_upper_clipfrac", "aepo_adv_scale_min", "aepo_adv_scale_max"},
        "clip_cov": {"cov_candidate_fraction", "cov_selected_fraction"},
        "kl_cov": {"cov_selected_fraction", "kl_cov_penalty"},
        "top_entropy": {"top_entropy_kept_fraction", "top_entropy_threshold"},
    }.get(control, set())
    for name in ENTROPY_CONTROL_METRICS:
        assert (metrics[name] != 0) == (name in own), name
    for name in ("loss", "pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy", "entropy_loss",
                 "smooth_penalty", "beta", "kl_loss", "value_loss"):
        assert name in metrics
