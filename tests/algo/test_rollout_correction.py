"""Drift metrics, TIS / MIS weights and the corrected objective against numpy re-implementations
(written from Yao et al. 2025 and verl's rollout_corr_helper rules) and finite differences."""
import jax
import numpy as np
import pytest

from epo_jax.algo import (
    ENTROPY_CONTROLS,
    LossSettings,
    correction_metrics,
    drift_metrics,
    importance_weights,
    loss_state_init,
    make_loss_fn,
)

from .test_loss import make_batch, make_params, np_head, np_k3, np_token_mean, toy_forward

MAX_TURNS = 4
CAP = 2.0


def drifted_logprobs(seed=3, rows=6, seq=5, scale=0.6):
    """(trainer, sampler, mask, turn_index): log-ratios spread across [1/4, 4], so that every
    threshold of the tests is crossed; row 5 is padding, row 4 is a turn past MAX_TURNS."""
    rng = np.random.default_rng(seed)
    trainer = rng.normal(-2.0, 0.7, size=(rows, seq)).astype(np.float32)
    sampler = (trainer - scale * rng.standard_normal((rows, seq))).astype(np.float32)
    mask = (rng.random((rows, seq)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    mask[5] = 0.0
    turn_index = np.array([0, 1, 1, 3, 6, 2], np.int32)
    return trainer, sampler, mask, turn_index


# --- numpy references -------------------------------------------------------------------------------


def np_drift(trainer, sampler, mask):
    d = (trainer.astype(np.float64) - sampler)[mask > 0]
    if d.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    ratio = np.exp(d)
    return (np.abs(d).mean(), np.abs(d).max(), (ratio - d - 1).mean(), ((ratio < 0.5) | (ratio > 2.0)).mean())


def np_log_rho(trainer, sampler, mask, level):
    d = np.where(mask > 0, trainer.astype(np.float64) - sampler, 0.0)
    if level == "sequence":  # the product of the sample's token ratios
        d = np.repeat(d.sum(-1, keepdims=True), d.shape[1], axis=1)
    return np.clip(d, -20, 20)


def np_weights(method, level, cap, trainer, sampler, mask):
    rho = np.exp(np_log_rho(trainer, sampler, mask, level))
    valid = mask > 0
    if method == "tis":  # Yao et al. 2025: min(pi_train / pi_rollout, C)
        keep = valid
        weight = np.minimum(rho, cap)
    else:  # verl's Seq-MIS preset: IS weight, rejection outside [1/C, C]
        keep = valid & (rho >= 1 / cap) & (rho <= cap)
        weight = rho
    return np.where(keep, weight, 0.0), keep.astype(np.float64)


# --- drift ------------------------------------------------------------------------------------------


def test_drift_metrics_match_numpy_overall_and_per_turn():
    trainer, sampler, mask, turns = drifted_logprobs()
    drift = jax.jit(drift_metrics, static_argnums=4)(trainer, sampler, mask, turns, MAX_TURNS)
    expected = np_drift(trainer, sampler, mask)
    assert 0 < expected[3] < 1, "the batch must have tokens inside and outside [1/2, 2]"
    np.testing.assert_allclose([drift.mean_abs_diff, drift.max_abs_diff, drift.k3_kl, drift.outside_fraction],
                               expected, rtol=1e-5)
    for t in range(MAX_TURNS):
        in_turn = mask * (turns == t)[:, None]
        np.testing.assert_allclose(drift.turn_token_count_M[t], in_turn.sum())
        per_turn = [drift.turn_mean_abs_diff_M[t], drift.turn_max_abs_diff_M[t], drift.turn_k3_kl_M[t],
                    drift.turn_outside_fraction_M[t]]
        np.testing.assert_allclose(per_turn, np_drift(trainer, sampler, in_turn), rtol=1e-5, atol=1e-7)
    # Row 4 plays turn 6 >= MAX_TURNS: it counts overall only.
    assert mask[4].sum() > 0
    assert float(np.sum(drift.turn_token_count_M)) == mask[turns < MAX_TURNS].sum()


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.05, 0.3])
def test_k3_of_a_small_drift_keeps_its_precision_in_float32(scale):
    # A float32 / float32 drift of ~1e-6 makes k3 ~ 5e-13 per token: exp(d) - d - 1 in float32
    # would give rounding of either sign; float64 numpy from the same float32 inputs is exact here.
    trainer, sampler, mask, turns = drifted_logprobs(scale=scale)
    drift = drift_metrics(trainer, sampler, mask, turns, MAX_TURNS)
    np.testing.assert_allclose(drift.k3_kl, np_drift(trainer, sampler, mask)[2], rtol=1e-5)
    assert float(drift.k3_kl) > 0.0


def test_identical_log_probs_have_no_drift():
    trainer, _, mask, turns = drifted_logprobs()
    drift = drift_metrics(trainer, trainer, mask, turns, MAX_TURNS)
    assert float(drift.mean_abs_diff) == float(drift.max_abs_diff) == float(drift.k3_kl) == 0.0
    assert float(drift.outside_fraction) == 0.0


# --- weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_match_numpy(method, level):
    trainer, sampler, mask, _ = drifted_logprobs(scale=0.9 if level == "token" else 0.3)
    correction = jax.jit(importance_weights, static_argnums=(0, 1, 2))(method, level, CAP, trainer, sampler, mask)
    weight, keep = np_weights(method, level, CAP, trainer, sampler, mask)
    rho = np.exp(np_log_rho(trainer, sampler, mask, level))[mask > 0]
    assert (rho > CAP).any() and (rho < 1 / CAP).any() and ((rho > 1 / CAP) & (rho < CAP)).any()
    np.testing.assert_allclose(correction.weight_BxT, weight, rtol=1e-5)
    np.testing.assert_array_equal(correction.keep_BxT, keep)
    if level == "sequence":  # one weight and one decision per sample
        for b in np.flatnonzero(mask.sum(-1)):
            valid = mask[b] > 0
            assert len(set(np.asarray(correction.weight_BxT)[b][valid].tolist())) == 1
            assert len(set(np.asarray(correction.keep_BxT)[b][valid].tolist())) == 1

    metrics = correction_metrics(correction, CAP, trainer, sampler, mask, level)
    kept = keep > 0
    np.testing.assert_allclose(metrics["weight_mean"], weight[kept].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_min"], weight[kept].min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_max"], weight[kept].max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["capped_fraction"], (rho > CAP).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["masked_fraction"], 1 - keep[mask > 0].mean(), rtol=1e-6, atol=1e-7)
    if method == "tis":
        assert float(metrics["masked_fraction"]) == 0.0 and float(metrics["weight_max"]) == CAP


def test_weights_are_one_without_drift():
    trainer, _, mask, _ = drifted_logprobs()
    for method in ("tis", "mis"):
        for level in ("token", "sequence"):
            correction = importance_weights(method, level, CAP, trainer, trainer, mask)
            np.testing.assert_array_equal(correction.weight_BxT, mask)
            np.testing.assert_array_equal(correction.keep_BxT, mask)


def test_bad_cap_and_method_are_named():
    trainer, sampler, mask, _ = drifted_logprobs()
    with pytest.raises(ValueError, match="algo.rollout_correction_cap"):
        importance_weights("tis", "token", 1.0, trainer, sampler, mask)
    with pytest.raises(ValueError, match="algo.rollout_correction"):
        importance_weights("none", "token", CAP, trainer, sampler, mask)


# --- the corrected objective ------------------------------------------------------------------------


def corrected_batch(method, level, seed=1):
    """The toy batch of test_loss with a sampler that drifted from pi_old (its old_logprobs)."""
    batch = make_batch(seed)
    rng = np.random.default_rng(seed + 10)
    old = np.asarray(batch["old_logprobs"])
    sampler = (old - (0.9 if level == "token" else 0.35) * rng.standard_normal(old.shape)).astype(np.float32)
    correction = importance_weights(method, level, CAP, old, sampler, np.asarray(batch["response_mask"]))
    batch["rollout_weight"], batch["rollout_keep"] = correction.weight_BxT, correction.keep_BxT
    return batch, sampler


def np_corrected_loss(W, batch, weight, keep, kl_coef=0.01, clip=0.2, dual=3.0):
    """Float64: token-mean over the kept tokens of w * dual-clip PPO, + the KL term over all tokens."""
    logp, _ = np_head({"W": W}, batch)
    mask = np.asarray(batch["response_mask"], np.float64)
    adv = np.asarray(batch["advantages"], np.float64)
    ratio = np.exp(np.clip(logp - np.asarray(batch["old_logprobs"], np.float64), -20, 20))
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    pg = np.where(adv < 0, np.minimum(pg, -adv * dual), pg)
    kl = np_token_mean(np_k3(logp, np.asarray(batch["ref_logprobs"], np.float64)), mask)
    return np_token_mean(pg * weight, mask * keep) + kl_coef * kl


def loss_and_grad(config, params, batch):
    loss_fn = make_loss_fn(LossSettings.from_config(config), toy_forward)
    state = loss_state_init(LossSettings.from_config(config))
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, state)
    return float(loss), metrics, np.asarray(grads["W"], np.float64)


@pytest.mark.parametrize("method", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_corrected_loss_and_gradient_match_numpy(base_config, method, level):
    base_config.algo.entropy_control = "none"
    base_config.algo.rollout_correction = method
    base_config.algo.rollout_correction_level = level
    params = make_params()
    batch, _ = corrected_batch(method, level)
    weight, keep = np.asarray(batch["rollout_weight"], np.float64), np.asarray(batch["rollout_keep"], np.float64)
    valid = np.asarray(batch["response_mask"]) > 0
    assert (weight[valid] != 1).any() and (method == "tis" or (keep[valid] == 0).any())
    loss, metrics, grad = loss_and_grad(base_config, params, batch)

    W = np.asarray(params["W"], np.float64)
    np.testing.assert_allclose(loss, np_corrected_loss(W, batch, weight, keep), rtol=1e-5)
    # The weights are constants of the step: the gradient flows through log pi only.
    eps, fd = 1e-6, np.zeros_like(W)
    for index in np.ndindex(W.shape):
        step = np.zeros_like(W)
        step[index] = eps
        fd[index] = (np_corrected_loss(W + step, batch, weight, keep)
                     - np_corrected_loss(W - step, batch, weight, keep)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)

    base_config.algo.rollout_correction = "none"
    plain_loss, plain_metrics, plain_grad = loss_and_grad(base_config, params, batch)
    assert abs(plain_loss - loss) > 1e-3 and np.abs(plain_grad - grad).max() > 1e-4
    np.testing.assert_allclose(metrics["kl_loss"], plain_metrics["kl_loss"], rtol=1e-6)


@pytest.mark.parametrize("control", ENTROPY_CONTROLS)
def test_a_constant_weight_scales_the_policy_term_of_every_entropy_control(base_config, control):
    """With w = c on every token the corrected policy-gradient term is c times the plain one, and
    every other term (entropy, smoothing, KL, the control's own metrics) is untouched."""
    base_config.algo.entropy_control = control
    base_config.algo.entropy_coef = 0.1
    base_config.algo.clip_cov_ratio = 0.2  # a few tokens selected out of the toy batch's 18
    base_config.algo.kl_cov_ratio = 0.2
    params, batch = make_params(), make_batch()
    plain_loss, plain, plain_grad = loss_and_grad(base_config, params, batch)
    base_config.algo.rollout_correction = "tis"
    c = 0.37
    batch["rollout_weight"] = c * batch["response_mask"]
    batch["rollout_keep"] = batch["response_mask"]
    loss, corrected, _ = loss_and_grad(base_config, params, batch)
    assert abs(float(plain["pg_loss"])) > 1e-3
    np.testing.assert_allclose(corrected["pg_loss"], c * plain["pg_loss"], rtol=1e-5)
    np.testing.assert_allclose(loss - plain_loss, (c - 1) * float(plain["pg_loss"]), rtol=1e-4, atol=1e-6)
    for name in plain:
        if name not in ("pg_loss", "loss"):
            np.testing.assert_allclose(corrected[name], plain[name], rtol=1e-6, err_msg=name)
    assert np.abs(plain_grad).max() > 0


def test_the_loss_asks_for_the_weights_by_name(base_config):
    base_config.algo.rollout_correction = "mis"
    with pytest.raises(KeyError, match="rollout_weight.*algo.rollout_correction='mis'"):
        loss_and_grad(base_config, make_params(), make_batch())
