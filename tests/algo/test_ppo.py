"""Dual-clip PPO surrogate, clipped value loss and KL estimators against the spec's formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epo_jax.algo import kl_penalty, ppo_policy_loss, ppo_token_losses, value_loss


def numpy_ppo_token(logp, old_logp, adv, clip_low, clip_high, dual_clip):
    """Spec section 3 for one token: l = max(-A r, -A clip(r)); for A < 0, min(l, -A c)."""
    ratio = np.exp(np.clip(logp - old_logp, -20, 20))
    l1 = -adv * ratio
    l2 = -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    loss = max(l1, l2)
    lower = False
    if adv < 0 and dual_clip is not None:
        lower = loss > -adv * dual_clip
        loss = min(loss, -adv * dual_clip)
    return loss, l2 > l1, lower


def test_hand_computed_tokens():
    # token 0: A > 0, r = e^0.5 ~ 1.65 > 1.2 -> clipped at 1.2 -> l = -1.2
    # token 1: A < 0, r = e^2 ~ 7.39 -> l1 = 7.39 beyond dual bound 3 -> l = 3 (dual clip)
    # token 2: A < 0, r = e^-0.5 ~ 0.61: l1 = 0.61 < l2 = -A * 0.8 = 0.8 -> clipped, l = 0.8
    # token 3: A > 0, r = 1 -> l = -2
    logp = jnp.array([[0.5, 2.0, -0.5, 0.0]])
    adv = jnp.array([[1.0, -1.0, -1.0, 2.0]])
    terms = ppo_token_losses(logp, jnp.zeros_like(logp), adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    np.testing.assert_allclose(terms.loss_BxT, [[-1.2, 3.0, 0.8, -2.0]], rtol=1e-6)
    np.testing.assert_array_equal(terms.clipped_BxT, [[1.0, 0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(terms.lower_clipped_BxT, [[0.0, 1.0, 0.0, 0.0]])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    clip_low=st.sampled_from([0.2, 0.1]),
    clip_high=st.sampled_from([0.2, 0.28]),
    dual_clip=st.sampled_from([3.0, None]),
)
def test_surrogate_and_metrics_match_numpy(seed, clip_low, clip_high, dual_clip):
    rng = np.random.default_rng(seed)
    shape = (3, 5)
    logp = rng.normal(scale=0.6, size=shape).astype(np.float32)
    old_logp = rng.normal(scale=0.6, size=shape).astype(np.float32)
    adv = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random(shape) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    out = ppo_policy_loss(
        jnp.asarray(logp), jnp.asarray(old_logp), jnp.asarray(adv), jnp.asarray(mask),
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, loss_agg="token-mean",
    )
    losses, clipped, lower, kls = [], [], [], []
    for b, t in zip(*np.nonzero(mask)):
        loss, was_clipped, was_lower = numpy_ppo_token(
            logp[b, t], old_logp[b, t], adv[b, t], clip_low, clip_high, dual_clip
        )
        losses.append(loss)
        clipped.append(was_clipped)
        lower.append(was_lower)
        kls.append(old_logp[b, t] - logp[b, t])
    np.testing.assert_allclose(out.loss, np.mean(losses), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.clipfrac, np.mean(clipped), rtol=1e-6)
    np.testing.assert_allclose(out.clipfrac_lower, np.mean(lower), rtol=1e-6)
    np.testing.assert_allclose(out.ppo_kl, np.mean(kls), rtol=1e-5, atol=1e-6)


def test_gradient_vanishes_on_clipped_tokens_and_is_minus_a_r_elsewhere():
    logp = jnp.array([[0.5, 2.0, 0.1, 0.0]])
    adv = jnp.array([[1.0, -1.0, -1.0, 2.0]])
    mask = jnp.ones_like(logp)
    grad = jax.grad(
        lambda lp: ppo_policy_loss(lp, jnp.zeros_like(lp), adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0).loss
    )(logp)
    # d(-A r)/dlogp = -A r / 4 tokens on unclipped tokens; clipped and dual-clipped tokens get 0.
    expected = np.array([[0.0, 0.0, np.exp(0.1) / 4, -2.0 / 4]])
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_value_loss_matches_spec():
    values = np.array([[1.0, 2.0, 0.0, 5.0]], np.float32)
    old_values = np.array([[0.0, 2.2, 0.0, 0.0]], np.float32)
    returns = np.array([[0.0, 3.0, 1.0, 7.0]], np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    # token 0: V=1 clipped to 0.5: max((1)^2, (0.5)^2) = 1; token 1: V=2 in range: 1; token 2: (0-1)^2 = 1
    loss, clipfrac = value_loss(*map(jnp.asarray, (values, old_values, returns, mask)), clip=0.5)
    np.testing.assert_allclose(loss, 0.5 * (1.0 + 1.0 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(clipfrac, 0.0)
    # a clip that increases the error: V=1, V_old=0 -> clipped 0.5, R=2: (1-2)^2=1 < (0.5-2)^2=2.25
    one = jnp.array([[1.0]])
    loss, clipfrac = value_loss(one, jnp.array([[0.0]]), jnp.array([[2.0]]), one, clip=0.5)
    np.testing.assert_allclose(loss, 0.5 * 2.25, rtol=1e-6)
    np.testing.assert_allclose(clipfrac, 1.0)


def test_kl_estimators():
    logp = np.array([[-1.0, -0.5, -30.0]], np.float32)
    ref = np.array([[-1.2, -0.5, -0.1]], np.float32)
    np.testing.assert_allclose(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k1"), logp - ref, rtol=1e-6)
    k2 = kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "mse")
    np.testing.assert_allclose(k2, 0.5 * (logp - ref) ** 2, rtol=1e-6)
    d = np.clip(ref - logp, -20, 20)
    k3 = np.clip(np.exp(d) - d - 1, -10, 10)
    got = kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "low_var_kl")
    np.testing.assert_allclose(got, k3, rtol=1e-5)
    # the third token's estimate exp(20) - 21 is clamped to 10, as verl does
    np.testing.assert_allclose(got[0, 2], 10.0)
    assert np.all(np.asarray(got) >= 0)


def test_k3_gradient_matches_its_formula():
    logp = jnp.array([-1.0, -0.2, -2.0])
    ref = jnp.array([-1.5, -0.2, -1.0])
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref, "low_var_kl")))(logp)
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)
    np.testing.assert_allclose(grad, 1.0 - np.exp(np.asarray(ref - logp)), rtol=1e-6)


def test_bad_arguments_are_rejected():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_token_losses(x, x, x, clip_low=0.2, clip_high=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(x, x, "k4")
