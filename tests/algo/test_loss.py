"""The full objective (EPO Eq. 6 and its variants) against a numpy re-implementation, with a toy model."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.algo import (
    LossAux,
    LossSettings,
    entropy_sums,
    loss_state_init,
    loss_state_update,
    make_loss_fn,
    token_entropy,
)

from .base_config import load_base_config

VOCAB, DIM, ROWS, SEQ = 6, 5, 6, 4
TRAJ_ID = np.array([11, 11, 11, 4, 4, 9], np.int32)
TURN_INDEX = np.array([0, 1, 2, 0, 1, 3], np.int32)


def toy_forward(params, batch):
    """A linear "language model": logits = features @ W^T; optional linear value head."""
    logits = batch["features"] @ params["W"].T
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    outputs = {"logprobs": logprobs, "entropy": token_entropy(logits)}
    if "v" in params:
        outputs["values"] = batch["features"] @ params["v"]
    return outputs


def make_params(seed=0, value_head=False):
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(rng.normal(size=(VOCAB, DIM)), jnp.float32)}
    if value_head:
        params["v"] = jnp.asarray(rng.normal(size=(DIM,)), jnp.float32)
    return params


def make_batch(seed=1, mask=None):
    rng = np.random.default_rng(seed)
    # Per-row feature scales spread the token entropies from near 0 to near log(V).
    scales = np.array([0.1, 0.4, 1.0, 2.0, 3.0, 0.7])[:, None, None]
    features = (rng.normal(size=(ROWS, SEQ, DIM)) * scales).astype(np.float32)
    if mask is None:
        mask = np.array(
            [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.float32
        )
    return {
        "features": jnp.asarray(features),
        "targets": jnp.asarray(rng.integers(0, VOCAB, size=(ROWS, SEQ)), jnp.int32),
        "response_mask": jnp.asarray(mask, jnp.float32),
        "old_logprobs": jnp.asarray(rng.normal(-1.8, 0.5, size=(ROWS, SEQ)), jnp.float32),
        "advantages": jnp.asarray(rng.normal(size=(ROWS, SEQ)), jnp.float32),
        "ref_logprobs": jnp.asarray(rng.normal(-1.8, 0.5, size=(ROWS, SEQ)), jnp.float32),
        "returns": jnp.asarray(rng.normal(size=(ROWS, SEQ)), jnp.float32),
        "old_values": jnp.asarray(rng.normal(size=(ROWS, SEQ)), jnp.float32),
        "traj_id": jnp.asarray(TRAJ_ID),
        "turn_index": jnp.asarray(TURN_INDEX),
    }


# --- numpy re-implementation of the spec (section 1 (a)-(e), section 3) ------------------------------


def np_head(params, batch):
    logits = np.asarray(batch["features"], np.float64) @ np.asarray(params["W"], np.float64).T
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(log_probs, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    return logp, entropy


def np_token_mean(x, mask):
    return float((x * mask).sum() / mask.sum())


def np_trajectory_mean(x, mask, traj):
    per_traj = {}
    for b in range(x.shape[0]):
        if mask[b].sum() > 0:
            per_traj.setdefault(int(traj[b]), []).append((x[b] * mask[b]).sum() / mask[b].sum())
    return float(np.mean([np.mean(turns) for turns in per_traj.values()]))


def np_pg_loss(logp, old, adv, mask, clip=0.2, dual=3.0):
    ratio = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    return np_token_mean(loss, mask)


def np_k3(logp, ref):
    d = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


def np_value_loss(values, old_values, returns, mask, clip=0.5):
    clipped = np.clip(values, old_values - clip, old_values + clip)
    return 0.5 * np_token_mean(np.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --- history of two earlier RL steps -------------------------------------------------------------------

HISTORY = [
    # (entropy value for every token, turn indices of the 3 rows); all tokens valid
    (1.0, np.array([0, 1, 3], np.int32)),
    (1.4, np.array([0, 2, 3], np.int32)),
]


def loss_fn_of(config):
    return make_loss_fn(LossSettings.from_config(config), toy_forward)


def initial_state(config):
    return loss_state_init(LossSettings.from_config(config))


def state_after_history(config):
    state = initial_state(config)
    for value, turns in HISTORY:
        sums = entropy_sums(jnp.full((3, 2), value), jnp.ones((3, 2)), jnp.asarray(turns), config.epo.max_turns)
        state = loss_state_update(state, sums)
    return state


def np_past_turn_means():
    """Per turn index, the token-mean entropies of the earlier steps that had that turn."""
    means = {}
    for value, turns in HISTORY:
        for turn in set(turns.tolist()):
            means.setdefault(turn, []).append(value)
    return means


@pytest.fixture
def config(base_config):
    base_config.epo.lam = 0.3
    base_config.epo.alpha = 0.5
    base_config.epo.kappa_l = 0.5
    base_config.epo.kappa_r = 1.3
    base_config.train.total_steps = 10
    base_config.epo.code_turn_gate = 2
    return base_config


def run(config, params, batch, state):
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss_fn_of(config), has_aux=True))(params, batch, state)
    return float(loss), metrics, grads


def np_common_terms(params, batch, kl_coef=0.01):
    logp, entropy = np_head(params, batch)
    mask = np.asarray(batch["response_mask"])
    pg = np_pg_loss(logp, np.asarray(batch["old_logprobs"]), np.asarray(batch["advantages"]), mask)
    kl = np_token_mean(np_k3(logp, np.asarray(batch["ref_logprobs"])), mask)
    return logp, entropy, mask, pg, kl_coef * kl


def test_paper_mode_matches_eq6(config):
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    loss, metrics, _ = run(config, params, batch, state)

    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    reference = np.mean([value for value, _ in HISTORY])  # Hbar_W: cumulative mean of past steps
    penalty = np.maximum(0.5 * reference - entropy, 0) + np.maximum(entropy - 1.3 * reference, 0)
    l_h = np_trajectory_mean(entropy, mask, TRAJ_ID)
    l_smooth = np_trajectory_mean(0.5 * penalty, mask, TRAJ_ID)
    beta = 1 + math.exp(-3.0 * 2 / (10 // 2))  # k = 2 after two steps
    expected = pg - 0.3 * (l_h - beta * l_smooth) + kl_term

    assert 0.0 < float(metrics["smooth_fraction"]) < 1.0, "the test batch must straddle the corridor"
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy_loss"], l_h, rtol=1e-5)
    np.testing.assert_allclose(metrics["smooth_penalty"], l_smooth, rtol=1e-5)
    np.testing.assert_allclose(metrics["beta"], beta, rtol=1e-6)
    np.testing.assert_allclose(metrics["entropy_reference"], reference, rtol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], np_token_mean(entropy, mask), rtol=1e-5)


def test_paper_mode_has_no_smoothing_at_step_zero(config):
    params, batch = make_params(), make_batch()
    loss, metrics, _ = run(config, params, batch, initial_state(config))
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    np.testing.assert_allclose(loss, pg - 0.3 * np_trajectory_mean(entropy, mask, TRAJ_ID) + kl_term, rtol=1e-5)
    np.testing.assert_allclose(metrics["beta"], 2.0)
    np.testing.assert_allclose(metrics["smooth_penalty"], 0.0)


def test_epo_base_and_constant_beta_and_token_aggregation(config):
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)

    config.epo.smoothing = False
    loss, _, _ = run(config, params, batch, state)
    np.testing.assert_allclose(loss, pg - 0.3 * np_trajectory_mean(entropy, mask, TRAJ_ID) + kl_term, rtol=1e-5)

    config.epo.smoothing = True
    config.epo.beta_schedule = "constant"
    config.epo.entropy_agg = "token"
    loss, metrics, _ = run(config, params, batch, state)
    reference = np.mean([value for value, _ in HISTORY])
    penalty = np.maximum(0.5 * reference - entropy, 0) + np.maximum(entropy - 1.3 * reference, 0)
    expected = pg - 0.3 * (np_token_mean(entropy, mask) - 1.0 * np_token_mean(0.5 * penalty, mask)) + kl_term
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["beta"], 1.0)


def np_code_weight(epoch, max_epochs=150):
    """The official _calculate_epoch_based_entropy_weight (lambda_slow 2, lambda_fast 3)."""
    epoch = max(0, min(epoch, max_epochs))
    half = max_epochs // 2
    if epoch <= half:
        return 1.0 - 0.2 * (1 - math.exp(-2.0 * epoch / half))
    return 0.8 * math.exp(-3.0 * (epoch - half) / (max_epochs - half))


def np_code_term(entropy, mask, gate_open, step, lam=0.3, alpha=0.5, kappa=(0.5, 1.3), mask_mode="token"):
    """The official code: per-turn history including this step, indicator {0, alpha} per token
    (generate_entropy_penalty, mask_mode "token") or per turn sample from its mean entropy over its
    valid tokens ("seq"), 150-epoch curve, token-mean aggregation."""
    past = np_past_turn_means()
    penalty = np.zeros_like(entropy)
    for b in range(entropy.shape[0]):
        if mask[b].sum() == 0:
            continue  # a padding row: masked out of every mean
        turn = TURN_INDEX[b]
        rows = (TURN_INDEX == turn)[:, None] & (mask > 0)
        current = entropy[rows].mean()
        reference = np.mean(past.get(turn, []) + [current])
        judged = entropy[b] if mask_mode == "token" else entropy[b][mask[b] > 0].mean()
        inside = (judged > kappa[0] * reference) & (judged < kappa[1] * reference)
        penalty[b] = np.where(inside, 0.0, alpha)
    smooth = np_token_mean(penalty, mask) if gate_open else 0.0
    return -lam * (np_token_mean(entropy, mask) - np_code_weight(step) * smooth), smooth, penalty


def test_code_mode_matches_the_official_objective(config):
    config.epo.mode = "code"
    config.epo.entropy_agg = "token"
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    loss, metrics, _ = run(config, params, batch, state)
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    term, smooth, _ = np_code_term(entropy, mask, gate_open=True, step=2)
    assert smooth > 0
    np.testing.assert_allclose(loss, pg + term + kl_term, rtol=1e-5)
    np.testing.assert_allclose(metrics["smooth_penalty"], smooth, rtol=1e-5)


def test_code_mode_seq_mask_judges_each_turn_sample_by_its_mean_entropy(config):
    """entropy_smooth_mask_mode="seq": one indicator per row from the row's mean entropy over its
    valid tokens, given to all of its tokens. Masked positions hold entropies of their own (the toy
    model computes them), and row 4 is all padding: neither may move a row's mean."""
    config.epo.mode = "code"
    config.epo.entropy_agg = "token"
    config.epo.code_mask_mode = "seq"
    mask = np.asarray(make_batch()["response_mask"]).copy()
    mask[4] = 0.0
    params, batch = make_params(), make_batch(mask=mask)
    loss, metrics, _ = run(config, params, batch, state_after_history(config))
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    term, smooth, penalty = np_code_term(entropy, mask, gate_open=True, step=2, mask_mode="seq")
    token_term, _, token_penalty = np_code_term(entropy, mask, gate_open=True, step=2)
    rows = mask.sum(-1) > 0
    assert np.all(penalty[rows] == penalty[rows][:, :1]), "one value per turn sample"
    assert 0.0 < smooth < 0.5, "some rows inside the corridor, some outside"
    assert not np.array_equal(penalty * mask, token_penalty * mask), "seq and token differ on this batch"
    np.testing.assert_allclose(loss, pg + term + kl_term, rtol=1e-5)
    np.testing.assert_allclose(metrics["smooth_penalty"], smooth, rtol=1e-5)


def test_code_mode_weight_curve_has_its_own_decay(config):
    """The second half of the official curve decays with 3.0 whatever epo.gamma (the paper's beta)."""
    config.epo.mode = "code"
    config.epo.gamma = 7.0
    params, batch = make_params(), make_batch()
    state = state_after_history(config)._replace(step=jnp.asarray(120, jnp.int32))
    _, metrics, _ = run(config, params, batch, state)
    np.testing.assert_allclose(metrics["beta"], np_code_weight(120), rtol=1e-6)
    config.epo.code_decay = 1.0
    _, metrics, _ = run(config, params, batch, state)
    np.testing.assert_allclose(metrics["beta"], 0.8 * math.exp(-1.0 * 45 / 75), rtol=1e-6)


def test_code_mode_turn_gate_closed(config):
    config.epo.mode = "code"
    config.epo.entropy_agg = "token"
    config.epo.code_turn_gate = 4  # the batch's turns are 0..3
    params, batch = make_params(), make_batch()
    loss, metrics, _ = run(config, params, batch, state_after_history(config))
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    term, _, _ = np_code_term(entropy, mask, gate_open=False, step=2)
    np.testing.assert_allclose(loss, pg + term + kl_term, rtol=1e-5)
    np.testing.assert_allclose(metrics["smooth_penalty"], 0.0)


def test_code_mode_gradient_equals_the_plain_entropy_bonus(config):
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    config.epo.mode = "code"
    config.epo.entropy_agg = "token"
    code_loss, code_metrics, code_grads = run(config, params, batch, state)
    config.algo.entropy_control = "bonus"
    config.algo.entropy_coef = 0.3
    bonus_loss, _, bonus_grads = run(config, params, batch, state)
    assert float(code_metrics["smooth_penalty"]) > 0
    assert abs(code_loss - bonus_loss) > 1e-3, "the indicator changes the value..."
    np.testing.assert_allclose(code_grads["W"], bonus_grads["W"], rtol=1e-5, atol=1e-7)  # ...not the gradient


def test_none_and_bonus_controls(config):
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    _, entropy, mask, pg, kl_term = np_common_terms(params, batch)
    config.algo.entropy_control = "none"
    loss, _, _ = run(config, params, batch, state)
    np.testing.assert_allclose(loss, pg + kl_term, rtol=1e-5)
    config.algo.entropy_control = "bonus"
    config.algo.entropy_coef = 0.05
    config.algo.use_kl_loss = False
    loss, metrics, _ = run(config, params, batch, state)
    np.testing.assert_allclose(loss, pg - 0.05 * np_token_mean(entropy, mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_loss"], 0.0)


def test_value_head_adds_the_clipped_value_loss(config):
    config.algo.entropy_control = "none"
    params, batch = make_params(value_head=True), make_batch()
    loss, metrics, grads = run(config, params, batch, initial_state(config))
    _, _, mask, pg, kl_term = np_common_terms(params, batch)
    values = np.asarray(batch["features"], np.float64) @ np.asarray(params["v"], np.float64)
    vf = np_value_loss(values, np.asarray(batch["old_values"]), np.asarray(batch["returns"]), mask)
    np.testing.assert_allclose(metrics["value_loss"], vf, rtol=1e-5)
    np.testing.assert_allclose(loss, pg + kl_term + 0.5 * vf, rtol=1e-5)
    assert np.any(np.asarray(grads["v"]) != 0)


def test_paper_mode_gradient_matches_finite_differences(config):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), make_params())
        batch = {k: v.astype(jnp.float64) if v.dtype == jnp.float32 else v for k, v in make_batch().items()}
        state = state_after_history(config)
        loss_fn = jax.jit(lambda w: loss_fn_of(config)({"W": w}, batch, state)[0])
        w = params["W"]
        grad = np.asarray(jax.grad(loss_fn)(w)).ravel()
        step = 1e-6
        numeric = []
        for i in range(w.size):
            bump = jnp.zeros(w.size, jnp.float64).at[i].set(step).reshape(w.shape)
            numeric.append((loss_fn(w + bump) - loss_fn(w - bump)) / (2 * step))
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)


@functools.lru_cache(maxsize=None)
def padding_test_setup(mode):
    """One jitted value_and_grad per mode, shared by all hypothesis examples."""
    config = load_base_config()
    config.epo.mode = mode
    config.epo.lam = 0.3
    config.epo.kappa_l, config.epo.kappa_r = 0.5, 1.3
    config.epo.code_turn_gate = 2
    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn_of(config), has_aux=True))
    return loss_and_grad, state_after_history(config)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), mode=st.sampled_from(["paper", "code"]), extra_rows=st.sampled_from([0, 2]))
def test_padding_changes_neither_loss_nor_gradient(seed, mode, extra_rows):
    """Masked tokens and all-padding rows (with any contents) leave loss and gradient unchanged."""
    loss_and_grad, state = padding_test_setup(mode)
    params, batch = make_params(), make_batch()
    rng = np.random.default_rng(seed)
    mask = np.asarray(batch["response_mask"])
    dirty = dict(batch)
    for key in ("old_logprobs", "advantages", "ref_logprobs", "returns", "old_values"):
        noise = rng.normal(scale=5.0, size=mask.shape).astype(np.float32)
        dirty[key] = jnp.where(mask > 0, batch[key], noise)
    dirty["features"] = jnp.where(mask[..., None] > 0, batch["features"], rng.normal(size=batch["features"].shape) * 4)
    dirty["targets"] = jnp.where(mask > 0, batch["targets"], rng.integers(0, VOCAB, size=mask.shape))
    if extra_rows:
        def pad(x, value):
            filler = jnp.broadcast_to(jnp.asarray(value, x.dtype), (extra_rows,) + x.shape[1:])
            return jnp.concatenate([x, filler])

        dirty = {key: pad(x, 0 if key == "response_mask" else 1) for key, x in dirty.items()}
        # padding rows claim a real trajectory and a late turn: they must still count nowhere
        dirty["traj_id"] = dirty["traj_id"].at[-extra_rows:].set(11)
        dirty["turn_index"] = dirty["turn_index"].at[-extra_rows:].set(40)
    (clean_loss, (_, clean_sums)), clean_grads = loss_and_grad(params, batch, state)
    (dirty_loss, (_, dirty_sums)), dirty_grads = loss_and_grad(params, dirty, state)
    np.testing.assert_allclose(dirty_loss, clean_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dirty_grads["W"], clean_grads["W"], rtol=1e-5, atol=1e-7)
    for dirty_sum, clean_sum in zip(dirty_sums, clean_sums):
        np.testing.assert_allclose(dirty_sum, clean_sum, rtol=1e-6, atol=1e-6)


def test_jit_matches_eager(config):
    config.epo.mode = "code"
    params, batch = make_params(), make_batch()
    state = state_after_history(config)
    loss_fn = jax.value_and_grad(loss_fn_of(config), has_aux=True)
    (eager_loss, _), eager_grads = loss_fn(params, batch, state)
    (jit_loss, _), jit_grads = jax.jit(loss_fn)(params, batch, state)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    np.testing.assert_allclose(jit_grads["W"], eager_grads["W"], rtol=1e-5, atol=1e-7)


def test_entropy_sums_feed_the_next_state(config):
    params, batch = make_params(), make_batch()
    state = initial_state(config)
    loss, aux = jax.jit(loss_fn_of(config))(params, batch, state)
    assert isinstance(aux, LossAux)
    next_state = loss_state_update(state, aux.entropy_sums)
    _, entropy, mask, _, _ = np_common_terms(params, batch)
    assert int(next_state.step) == 1
    np.testing.assert_allclose(next_state.entropy_history.step_mean_sum, np_token_mean(entropy, mask), rtol=1e-5)
    np.testing.assert_allclose(aux.entropy_sums.token_count, mask.sum())
    assert aux.entropy_sums.turn_entropy_sum_M.shape == (config.epo.max_turns,)
    # The turn-3 row's entropy lands in slot 3 of the per-turn sums.
    np.testing.assert_allclose(aux.entropy_sums.turn_entropy_sum_M[3], (entropy[5] * mask[5]).sum(), rtol=1e-5)


def test_make_loss_fn_takes_loss_settings(config):
    with pytest.raises(TypeError, match=r"LossSettings\.from_config"):
        make_loss_fn(config, toy_forward)


def test_missing_reference_logprobs_is_reported(config):
    batch = make_batch()
    del batch["ref_logprobs"]
    with pytest.raises(KeyError, match="use_kl_loss"):
        loss_fn_of(config)(make_params(), batch, initial_state(config))
