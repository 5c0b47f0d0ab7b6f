"""PPO surrogate with dual clip, clipped value loss and KL estimators, in verl's exact form.

Spec section 3 ("PPO with dual clip as verl writes it") and section 1 (KL loss "low_var_kl").
All functions take per-token [B, T] matrices and a response mask and return scalars aggregated
with one of the modes of `aggregate_loss`.
"""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from epo_jax.algo.aggregation import aggregate_loss, masked_mean

KL_ESTIMATORS = ("k1", "mse", "low_var_kl")

# verl clamps log-ratios before exponentiating so that one stale token cannot overflow the ratio.
_LOG_RATIO_CLAMP = 20.0
# verl clamps the k3 estimate itself to [-10, 10].
_LOW_VAR_KL_CLAMP = 10.0


class PolicyLossTerms(NamedTuple):
    """Per-token PPO quantities before aggregation."""

    loss_BxT: jax.Array            # the clipped (and dual-clipped) surrogate per token
    clipped_BxT: jax.Array         # l2 > l1: the ratio clip was active (float 0/1)
    lower_clipped_BxT: jax.Array   # dual clip active: A < 0 and max(l1, l2) > -A c (float 0/1)
    negative_log_ratio_BxT: jax.Array  # old_logp - logp, for ppo_kl


class PolicyLoss(NamedTuple):
    """Aggregated PPO surrogate and the metrics verl logs with it."""

    loss: jax.Array
    clipfrac: jax.Array
    clipfrac_lower: jax.Array
    ppo_kl: jax.Array


def clamped_log_ratio(logprobs_BxT: jax.Array, old_logprobs_BxT: jax.Array) -> jax.Array:
    """log r = clamp(logp - logp_old, -20, 20), the log importance ratio every surrogate exponentiates."""
    return jnp.clip(logprobs_BxT - old_logprobs_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def balanced_upper_bound(ratio: jax.Array, clip_high: float) -> jax.Array:
    """AEPO's upper clip bound (1 + eps_h) / sg(r) * r (arXiv 2510.14545; docs/algorithms.md section 2 (c)).

    Written as (1 + eps_h) * (1 + (r - sg(r)) / sg(r)): the value is exactly 1 + eps_h (r - sg(r)
    is 0 in the forward pass), the derivative w.r.t. log r is (1 + eps_h) * r / sg(r) = 1 + eps_h.
    """
    detached = jax.lax.stop_gradient(ratio)
    return (1.0 + clip_high) * (1.0 + (ratio - detached) / detached)


def ppo_token_losses(
    logprobs_BxT: jax.Array,
    old_logprobs_BxT: jax.Array,
    advantages_BxT: jax.Array,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    balanced_upper_clip: bool = False,
) -> PolicyLossTerms:
    """Per-token clipped surrogate with separate low/high clip and dual clip (docs/algorithms.md section 3).

      r = exp(clamp(logp - logp_old, -20, 20))
      l1 = -A r;  l2 = -A clip(r, 1 - clip_low, 1 + clip_high);  l = max(l1, l2)
      for A < 0:  l = min(l, -A c)  with c = dual_clip  (Ye et al. 2020, as in verl)
    `dual_clip=None` disables the dual clip. DAPO's clip-higher is clip_low = 0.2, clip_high = 0.28.

    `balanced_upper_clip=True` is AEPO's entropy-balanced clipping (Dong et al., arXiv 2510.14545;
    docs/algorithms.md section 2 (c)): above the upper bound the clipped ratio is
    (1 + clip_high) / sg(r) * r instead of the constant 1 + clip_high, so every value (loss, clip
    metrics, dual clip) equals PPO's while a token with A > 0 and r > 1 + clip_high keeps the
    gradient d l / d logp = -(1 + clip_high) A instead of 0. The lower bound is unchanged.
    """
    chex.assert_equal_shape([logprobs_BxT, old_logprobs_BxT, advantages_BxT])
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0 (verl's clip_ratio_c, 3.0 by default) or None, got {dual_clip}.")
    log_ratio_BxT = clamped_log_ratio(logprobs_BxT, old_logprobs_BxT)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    unclipped_BxT = -advantages_BxT * ratio_BxT
    clipped_ratio_BxT = jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
    if balanced_upper_clip:
        clipped_ratio_BxT = jnp.where(
            ratio_BxT > 1.0 + clip_high, balanced_upper_bound(ratio_BxT, clip_high), clipped_ratio_BxT
        )
    clipped_BxT = -advantages_BxT * clipped_ratio_BxT
    loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
    clip_active_BxT = (clipped_BxT > unclipped_BxT).astype(jnp.float32)
    if dual_clip is None:
        lower_active_BxT = jnp.zeros_like(loss_BxT)
    else:
        dual_bound_BxT = -advantages_BxT * dual_clip
        negative_advantage_BxT = advantages_BxT < 0
        lower_active_BxT = ((loss_BxT > dual_bound_BxT) & negative_advantage_BxT).astype(jnp.float32)
        loss_BxT = jnp.where(negative_advantage_BxT, jnp.minimum(loss_BxT, dual_bound_BxT), loss_BxT)
    return PolicyLossTerms(loss_BxT, clip_active_BxT, lower_active_BxT, -log_ratio_BxT)


def ppo_policy_loss(
    logprobs_BxT: jax.Array,
    old_logprobs_BxT: jax.Array,
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    loss_agg: str = "token-mean",
    traj_id_B: jax.Array | None = None,
    balanced_upper_clip: bool = False,
) -> PolicyLoss:
    """L_MT of EPO Eq. 1 / verl's compute_policy_loss: the aggregated dual-clip PPO surrogate.

    loss = agg(l) with l from `ppo_token_losses`; metrics (masked token means, as verl):
    clipfrac = mean(l2 > l1), clipfrac_lower = mean(dual clip active), ppo_kl = mean(logp_old - logp).
    """
    terms = ppo_token_losses(
        logprobs_BxT, old_logprobs_BxT, advantages_BxT, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        balanced_upper_clip=balanced_upper_clip,
    )
    return summarize_policy_terms(terms, mask_BxT, loss_agg, traj_id_B)


def summarize_policy_terms(
    terms: PolicyLossTerms, mask_BxT: jax.Array, loss_agg: str = "token-mean", traj_id_B: jax.Array | None = None
) -> PolicyLoss:
    """Aggregates per-token policy terms (possibly reshaped by an entropy control) as `ppo_policy_loss` does."""
    chex.assert_equal_shape([terms.loss_BxT, mask_BxT])
    return PolicyLoss(
        loss=aggregate_loss(terms.loss_BxT, mask_BxT, loss_agg, traj_id_B),
        clipfrac=masked_mean(terms.clipped_BxT, mask_BxT),
        clipfrac_lower=masked_mean(terms.lower_clipped_BxT, mask_BxT),
        ppo_kl=masked_mean(terms.negative_log_ratio_BxT, mask_BxT),
    )


def value_loss(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip: float = 0.5,
    loss_agg: str = "token-mean",
    traj_id_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Clipped value loss (docs/algorithms.md section 3, verl's compute_value_loss).

      V_clip = clip(V, V_old - clip, V_old + clip)
      loss = 0.5 * agg(max((V - R)^2, (V_clip - R)^2));  clipfrac = mean((V_clip - R)^2 > (V - R)^2)

    Returns:
      (loss, clipfrac).
    """
    chex.assert_equal_shape([values_BxT, old_values_BxT, returns_BxT, mask_BxT])
    clipped_values_BxT = jnp.clip(values_BxT, old_values_BxT - clip, old_values_BxT + clip)
    unclipped_error_BxT = jnp.square(values_BxT - returns_BxT)
    clipped_error_BxT = jnp.square(clipped_values_BxT - returns_BxT)
    loss = 0.5 * aggregate_loss(jnp.maximum(unclipped_error_BxT, clipped_error_BxT), mask_BxT, loss_agg, traj_id_B)
    clipfrac = masked_mean((clipped_error_BxT > unclipped_error_BxT).astype(jnp.float32), mask_BxT)
    return loss, clipfrac


def kl_penalty(logprobs_BxT: jax.Array, ref_logprobs_BxT: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens (Schulman's k1/k2/k3, verl's kl_penalty).

      k1 ("k1"):         logp - logp_ref
      k2 ("mse"):        0.5 * (logp - logp_ref)^2
      k3 ("low_var_kl"): d = clamp(logp_ref - logp, -20, 20);  clamp(exp(d) - d - 1, -10, 10)
    """
    chex.assert_equal_shape([logprobs_BxT, ref_logprobs_BxT])
    if estimator == "k1":
        return logprobs_BxT - ref_logprobs_BxT
    if estimator == "mse":
        return 0.5 * jnp.square(logprobs_BxT - ref_logprobs_BxT)
    if estimator == "low_var_kl":
        log_ratio_BxT = jnp.clip(ref_logprobs_BxT - logprobs_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(log_ratio_BxT) - log_ratio_BxT - 1.0, -_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"Unknown KL estimator {estimator!r} (algo.kl_estimator); choose one of {KL_ESTIMATORS}.")
