"""Sampler / trainer mismatch: drift diagnostics and rollout correction (TIS, MIS).

The sampler reports log q(y_t), the log-probability of each token it drew; the trainer's
teacher-forced forward of the same tokens under the same params gives log p(y_t). They differ
when the two compute differently (bfloat16 sampling against float32 training, other kernels,
other shapes). With rho_t = p(y_t) / q(y_t) (docs/algorithms.md section 6):

Drift, over the valid tokens (verl's `compute_offpolicy_metrics`, rollout_corr_helper.py):
  mean and max of |log p - log q|;
  k3 = mean(rho - log rho - 1), Schulman's k3 estimate of KL(q || p) from q's samples (verl's
       `k3_kl`, with log rho clamped to [-20, 20] as every exponentiated log-ratio here);
  the fraction of tokens whose rho leaves [1/2, 2].

Correction of the policy-gradient term (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training": truncated importance sampling; Liu, Li et al. 2025, "When
speed kills stability": masked importance sampling; verl's rollout correction,
docs/algo/rollout_corr.md), with pi_old the trainer's log-probs under the rollout params:
  log rho = clamp(log pi_old - log q, -20, 20) per token ("token"), or
            clamp(sum_t (log pi_old_t - log q_t), -20, 20) of the whole sample, given to each of its
            tokens ("sequence", the product of the token ratios);
  tis: w = min(rho, C)                            every valid token kept;
  mis: w = rho 1[1/C <= rho <= C]                 tokens (or samples) outside [1/C, C] dropped
       (verl's Seq-MIS preset `decoupled_seq_is_rs`: IS weights with cap C and rejection outside
       [1/C, C], where the cap never binds on a kept sample);
and the per-token policy-gradient loss l_t becomes sg(w_t) l_t, aggregated over the kept tokens.
"""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from epo_jax.algo.aggregation import masked_mean, masked_sum, safe_divide

# algo.old_logprobs: whose log-probs are pi_old in the PPO ratio.
OLD_LOGPROB_SOURCES = ("sampler", "trainer")
# algo.rollout_correction and algo.rollout_correction_level.
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence")
# Metrics of `correction_metrics`, 0 under algo.rollout_correction = "none".
CORRECTION_METRICS = ("weight_mean", "weight_min", "weight_max", "capped_fraction", "masked_fraction")

# rho outside [1/2, 2] counts as a drifted token (the band of the drift metric).
DRIFT_BAND = 2.0
# As verl's SAFETY_BOUND and PPO's ratio: exp of a log-ratio clamped to [-20, 20] cannot overflow.
_LOG_RATIO_BOUND = 20.0


class Drift(NamedTuple):
    """Drift between trainer and sampler log-probs of the same tokens: batch values, then the
    same statistics per turn index m (entries of turns without tokens are 0)."""

    mean_abs_diff: jax.Array       # mean |log p - log q|
    max_abs_diff: jax.Array        # max |log p - log q|
    k3_kl: jax.Array               # mean(rho - log rho - 1)
    outside_fraction: jax.Array    # fraction of tokens with rho outside [1/2, 2]
    turn_mean_abs_diff_M: jax.Array
    turn_max_abs_diff_M: jax.Array
    turn_k3_kl_M: jax.Array
    turn_outside_fraction_M: jax.Array
    turn_token_count_M: jax.Array


class RolloutCorrection(NamedTuple):
    """What the correction does to the policy-gradient term, per token."""

    weight_BxT: jax.Array   # w, detached; 0 at padding and at dropped tokens
    keep_BxT: jax.Array     # float 0/1: valid tokens that stay in the policy-gradient term


def _k3_terms(log_ratio_BxT: jax.Array) -> jax.Array:
    """rho - log rho - 1 per token, log rho clamped to [-20, 20].

    Written out in float32, exp(d) - d - 1 cancels: a float32 / float32 drift of d ~ 1e-6 gives
    terms of d^2 / 2 ~ 5e-13 below exp's rounding (1e-7) and a k3 of the wrong sign. Below
    |d| = 0.1 its Taylor series d^2 (1/2 + d/6 + d^2/24 + d^3/120 + d^4/720) (relative error
    under 4e-9) replaces it; above, expm1(d) - d loses at most a factor 2 / |d| = 20 of precision."""
    d_BxT = jnp.clip(log_ratio_BxT, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    series_BxT = d_BxT * d_BxT * (1 / 2 + d_BxT * (1 / 6 + d_BxT * (1 / 24 + d_BxT * (1 / 120 + d_BxT / 720))))
    return jnp.where(jnp.abs(d_BxT) < 0.1, series_BxT, jnp.expm1(d_BxT) - d_BxT)


def _drift_statistics(log_ratio_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, ...]:
    """(mean |log rho|, max |log rho|, mean k3, fraction outside the band) over mask_BxT."""
    abs_BxT = jnp.abs(log_ratio_BxT)
    k3_BxT = _k3_terms(log_ratio_BxT)
    outside_BxT = (abs_BxT > jnp.log(DRIFT_BAND)).astype(jnp.float32)
    valid_BxT = mask_BxT > 0
    max_abs = jnp.max(jnp.where(valid_BxT, abs_BxT, 0.0))  # |.| >= 0: 0 when nothing is valid
    return (masked_mean(abs_BxT, mask_BxT), max_abs, masked_mean(k3_BxT, mask_BxT),
            masked_mean(outside_BxT, mask_BxT))


def drift_metrics(trainer_logprobs_BxT: jax.Array, sampler_logprobs_BxT: jax.Array, mask_BxT: jax.Array,
                  turn_index_B: jax.Array, max_turns: int) -> Drift:
    """Drift of the sampler's log-probs from the trainer's over the valid tokens (module docstring),
    overall and per turn index in [0, max_turns) (rows of later turns count overall only)."""
    chex.assert_equal_shape([trainer_logprobs_BxT, sampler_logprobs_BxT, mask_BxT])
    chex.assert_shape(turn_index_B, (mask_BxT.shape[0],))
    log_ratio_BxT = jax.lax.stop_gradient(trainer_logprobs_BxT - sampler_logprobs_BxT).astype(jnp.float32)
    mask_BxT = mask_BxT.astype(jnp.float32)
    in_turn_MxB = (jnp.arange(max_turns)[:, None] == turn_index_B[None, :]).astype(jnp.float32)
    turn_masks_MxBxT = in_turn_MxB[:, :, None] * mask_BxT[None]
    per_turn = jax.vmap(_drift_statistics, in_axes=(None, 0))(log_ratio_BxT, turn_masks_MxBxT)
    return Drift(*_drift_statistics(log_ratio_BxT, mask_BxT), *per_turn,
                 turn_token_count_M=jnp.sum(turn_masks_MxBxT, axis=(1, 2)))


def importance_log_ratio(trainer_logprobs_BxT: jax.Array, sampler_logprobs_BxT: jax.Array,
                         mask_BxT: jax.Array, level: str) -> jax.Array:
    """log rho per token, clamped to [-20, 20]: token level log pi_old - log q, sequence level the
    masked sum over the row given to each of its tokens (0 at padding in both)."""
    chex.assert_equal_shape([trainer_logprobs_BxT, sampler_logprobs_BxT, mask_BxT])
    if level not in ROLLOUT_CORRECTION_LEVELS:
        raise ValueError(f"Unknown algo.rollout_correction_level {level!r}; choose one of {ROLLOUT_CORRECTION_LEVELS}.")
    mask_BxT = mask_BxT.astype(jnp.float32)
    log_ratio_BxT = jnp.where(mask_BxT > 0, trainer_logprobs_BxT - sampler_logprobs_BxT, 0.0)
    if level == "sequence":
        log_ratio_BxT = jnp.broadcast_to(masked_sum(log_ratio_BxT, mask_BxT, axis=-1)[:, None], mask_BxT.shape)
    return jax.lax.stop_gradient(jnp.clip(log_ratio_BxT, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND) * (mask_BxT > 0))


def importance_weights(method: str, level: str, cap: float, trainer_logprobs_BxT: jax.Array,
                       sampler_logprobs_BxT: jax.Array, mask_BxT: jax.Array) -> RolloutCorrection:
    """TIS or MIS weights and kept tokens (module docstring) for the cap C = `cap` > 1.

    method "tis": w = min(rho, C), every valid token kept; "mis": w = rho where 1/C <= rho <= C,
    else the token (level "token") or the whole sample ("sequence") is dropped (w = 0, keep 0).
    """
    if method not in ("tis", "mis"):
        raise ValueError(f"importance_weights takes 'tis' or 'mis' (algo.rollout_correction), got {method!r}.")
    if not cap > 1.0:
        raise ValueError(f"The cap C (algo.rollout_correction_cap) must be > 1, got {cap}.")
    valid_BxT = mask_BxT > 0
    log_ratio_BxT = importance_log_ratio(trainer_logprobs_BxT, sampler_logprobs_BxT, mask_BxT, level)
    rho_BxT = jnp.exp(log_ratio_BxT)
    if method == "tis":
        keep_BxT = valid_BxT
        weight_BxT = jnp.minimum(rho_BxT, cap)
    else:
        log_cap = jnp.log(jnp.float32(cap))
        keep_BxT = valid_BxT & (log_ratio_BxT >= -log_cap) & (log_ratio_BxT <= log_cap)
        weight_BxT = rho_BxT
    keep_BxT = keep_BxT.astype(jnp.float32)
    return RolloutCorrection(weight_BxT=jax.lax.stop_gradient(weight_BxT * keep_BxT), keep_BxT=keep_BxT)


def correction_metrics(correction: RolloutCorrection, cap: float, trainer_logprobs_BxT: jax.Array,
                       sampler_logprobs_BxT: jax.Array, mask_BxT: jax.Array, level: str) -> dict[str, jax.Array]:
    """CORRECTION_METRICS over the valid tokens: mean / min / max of the weights of the kept tokens,
    the fraction whose rho exceeds the cap (the tokens TIS truncates), the fraction dropped (MIS)."""
    mask_BxT = mask_BxT.astype(jnp.float32)
    kept_BxT = correction.keep_BxT > 0
    rho_above_cap_BxT = importance_log_ratio(trainer_logprobs_BxT, sampler_logprobs_BxT, mask_BxT, level) > jnp.log(
        jnp.float32(cap))
    any_kept = jnp.any(kept_BxT)
    return {
        "weight_mean": masked_mean(correction.weight_BxT, correction.keep_BxT),
        "weight_min": jnp.where(any_kept, jnp.min(jnp.where(kept_BxT, correction.weight_BxT, jnp.inf)), 0.0),
        "weight_max": jnp.where(any_kept, jnp.max(jnp.where(kept_BxT, correction.weight_BxT, -jnp.inf)), 0.0),
        "capped_fraction": masked_mean(rho_above_cap_BxT.astype(jnp.float32), mask_BxT),
        "masked_fraction": safe_divide(jnp.sum(mask_BxT * (1.0 - correction.keep_BxT)), jnp.sum(mask_BxT)),
    }
