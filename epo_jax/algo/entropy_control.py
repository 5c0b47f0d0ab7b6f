"""Entropy-aware relatives of EPO that reshape the per-token policy loss (docs/algorithms.md sections 2-3).

  aepo:        entropy-aware advantage A <- A (1 + a z(H))            (AEPO, arXiv 2510.14545, section 2 (d));
               its entropy-balanced clip is `ppo_token_losses(balanced_upper_clip=True)` in ppo.py (2 (c))
  clip_cov:    no policy gradient for a few random tokens with lb < Cov < ub      (Cui et al., arXiv 2505.22617)
  kl_cov:      -A r + coef |log pi - log pi_old| on the top-k tokens by Cov       (same paper)
  top_entropy: policy gradient only through the highest-entropy tokens            (Wang et al., arXiv 2506.01939)
with Cov_i = (A_i - mean A)(log pi_i - mean log pi) over valid tokens (section 3).

Every statistic (means, standard deviation, covariance, token count N) is taken over the valid
tokens of the batch handed to `loss_fn`, i.e. one micro-batch of the update, as in the published
code, whose policy losses are computed per micro-batch as well. Which tokens are selected is
detached: no gradient flows through a selection, only through the losses of the tokens.

Token counts are k = max(1, floor(fraction * N)), computed in float32 with a relative guard of
1e-6 so that an exact product such as 2e-4 x 10000 is not floored to 1 by rounding. Ties in a
ranking are broken by row-major position (row, then response position), so a selection is a
deterministic function of its inputs.
"""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from epo_jax.algo.aggregation import masked_mean, safe_divide
from epo_jax.algo.ppo import PolicyLossTerms, clamped_log_ratio

# Folded into the run's seed before the RL step, so that Clip-Cov's token draws form a stream of
# their own, distinct from the rollout and shuffling keys derived from the same `config.seed`.
CLIP_COV_STREAM = 0x436C6970
# Relative guard of fraction_count against float32 rounding of fraction * N.
_COUNT_GUARD = 1e-6


class EntropyAwareAdvantages(NamedTuple):
    """AEPO's reshaped advantages and the per-token factor applied to them."""

    advantages_BxT: jax.Array   # A (1 + a z(H))
    scale_BxT: jax.Array        # 1 + a z(H); 1 at masked tokens


class ClipCovTerms(NamedTuple):
    """Clip-Cov's per-token policy loss and its selection (float 0/1 masks)."""

    loss_BxT: jax.Array         # the PPO loss, 0 at selected tokens
    selected_BxT: jax.Array     # tokens whose policy gradient is removed
    candidates_BxT: jax.Array   # valid, lb < Cov < ub and not already clipped by PPO (ratio or dual clip)


class KLCovTerms(NamedTuple):
    """KL-Cov's per-token policy loss and its selection."""

    loss_BxT: jax.Array         # -A r, plus the penalty at selected tokens
    selected_BxT: jax.Array     # the top-k tokens by Cov (float 0/1)
    penalty_BxT: jax.Array      # coef * |log pi - log pi_old| at selected tokens, 0 elsewhere


class TopEntropySelection(NamedTuple):
    """The tokens that keep their policy gradient under `top_entropy`."""

    keep_BxT: jax.Array         # float 0/1
    threshold: jax.Array        # the smallest entropy kept (0 when no token is valid)


def standardized_entropy(entropy_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """z(H) = (H - mean H) / std H over the valid tokens, detached (docs/algorithms.md section 2 (d)).

    std is the sample standard deviation (divisor N - 1), as `torch.std` in the published AEPO
    code; std = 0 (or fewer than two valid tokens) counts as std = 1. Masked tokens get z = 0.
    The entropies are shifted by their maximum before the mean is taken, so equal entropies give
    a std of exactly 0 (a float32 mean of equal values is not always exact, and dividing its
    rounding error by a tiny std would turn z into +-1).
    """
    chex.assert_rank(entropy_BxT, 2)
    chex.assert_equal_shape([entropy_BxT, mask_BxT])
    entropy_BxT = jax.lax.stop_gradient(entropy_BxT.astype(jnp.float32))
    mask_BxT = mask_BxT.astype(jnp.float32)
    valid_BxT = mask_BxT > 0
    count = jnp.sum(mask_BxT)
    shift = jnp.where(jnp.any(valid_BxT), jnp.max(jnp.where(valid_BxT, entropy_BxT, -jnp.inf)), 0.0)
    shifted_BxT = jnp.where(valid_BxT, entropy_BxT - shift, 0.0)
    centred_BxT = jnp.where(valid_BxT, shifted_BxT - masked_mean(shifted_BxT, mask_BxT), 0.0)
    std = jnp.sqrt(safe_divide(jnp.sum(jnp.square(centred_BxT)), count - 1.0))
    std = jnp.where(std > 0, std, 1.0)
    return centred_BxT / std


def entropy_aware_advantages(
    advantages_BxT: jax.Array, entropy_BxT: jax.Array, mask_BxT: jax.Array, coef: float
) -> EntropyAwareAdvantages:
    """AEPO's entropy-aware advantage: A_t <- A_t * (1 + a * z(H_t)) (arXiv 2510.14545;
    docs/algorithms.md section 2 (d)), with z from `standardized_entropy` (detached) and a = `coef`
    (`algo.aepo_entropy_adv_coef`, 0.2 in the paper). The entropy is always computed here: the
    published code skips this step silently when its entropy-bonus coefficient is 0.
    """
    chex.assert_equal_shape([advantages_BxT, entropy_BxT, mask_BxT])
    scale_BxT = 1.0 + coef * standardized_entropy(entropy_BxT, mask_BxT)
    return EntropyAwareAdvantages(advantages_BxT * scale_BxT, scale_BxT)


def token_covariance(advantages_BxT: jax.Array, logprobs_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Cov_i = (A_i - mean A)(log pi_i - mean log pi), means over valid tokens (arXiv 2505.22617;
    docs/algorithms.md section 3). Detached: it only decides which tokens are selected. 0 at masked tokens.
    """
    chex.assert_rank(advantages_BxT, 2)
    chex.assert_equal_shape([advantages_BxT, logprobs_BxT, mask_BxT])
    advantages_BxT = jax.lax.stop_gradient(advantages_BxT.astype(jnp.float32))
    logprobs_BxT = jax.lax.stop_gradient(logprobs_BxT.astype(jnp.float32))
    advantage_dev_BxT = advantages_BxT - masked_mean(advantages_BxT, mask_BxT)
    logprob_dev_BxT = logprobs_BxT - masked_mean(logprobs_BxT, mask_BxT)
    return jnp.where(mask_BxT > 0, advantage_dev_BxT * logprob_dev_BxT, 0.0)


def fraction_count(fraction: float, mask_BxT: jax.Array) -> jax.Array:
    """k = max(1, floor(fraction * N)), N = the number of valid tokens; an int32 scalar."""
    num_valid = jnp.sum((mask_BxT > 0).astype(jnp.float32))
    count = jnp.floor(fraction * num_valid * (1.0 + _COUNT_GUARD))
    return jnp.maximum(count, 1.0).astype(jnp.int32)


def descending_rank(values_BxT: jax.Array, eligible_BxT: jax.Array) -> jax.Array:
    """Rank of each eligible entry among the eligible ones by decreasing value (0 = largest), int32.

    Ties go to the earlier row-major position; ineligible entries rank after every eligible one.
    `rank < k` therefore selects exactly min(k, #eligible) entries.
    """
    chex.assert_rank(values_BxT, 2)
    chex.assert_equal_shape([values_BxT, eligible_BxT])
    size = values_BxT.size
    ineligible_N = (eligible_BxT <= 0).reshape(-1).astype(jnp.int32)
    negated_N = -jax.lax.stop_gradient(values_BxT).reshape(-1).astype(jnp.float32)
    position_N = jnp.arange(size, dtype=jnp.int32)
    # Sort by (ineligible, -value, position): a total order, so the permutation is unique.
    _, _, order_N = jax.lax.sort((ineligible_N, negated_N, position_N), num_keys=3)
    rank_N = jnp.zeros((size,), jnp.int32).at[order_N].set(position_N)
    return rank_N.reshape(values_BxT.shape)


def token_priorities(
    seed: int, step: jax.Array | int, traj_id_B: jax.Array, turn_index_B: jax.Array, num_positions: int
) -> jax.Array:
    """Uniform [0, 1) priority of every response token, for Clip-Cov's random choice, [B, T] float32.

      key(b, t) = fold_in(fold_in(fold_in(fold_in(fold_in(key(seed), CLIP_COV_STREAM), step),
                                          traj_id_b), turn_index_b), t)
    A token's priority is a function of (seed, RL step, trajectory, turn, position) alone: it is
    the same however the step's rows are ordered or split into micro-batches, the same after a
    resume (the step is part of the checkpointed LossState), and new at every RL step. Every PPO
    epoch of one step sees the same priorities.
    """
    chex.assert_rank([traj_id_B, turn_index_B], 1)
    chex.assert_equal_shape([traj_id_B, turn_index_B])
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), CLIP_COV_STREAM), step)
    positions_T = jnp.arange(num_positions, dtype=jnp.int32)

    def row_priorities(traj_id: jax.Array, turn_index: jax.Array) -> jax.Array:
        row_key = jax.random.fold_in(jax.random.fold_in(step_key, traj_id), turn_index)
        keys_T = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(row_key, positions_T)
        return jax.vmap(jax.random.uniform)(keys_T)

    return jax.vmap(row_priorities)(jnp.asarray(traj_id_B, jnp.int32), jnp.asarray(turn_index_B, jnp.int32))


def clip_cov_token_losses(
    terms: PolicyLossTerms,
    advantages_BxT: jax.Array,
    logprobs_BxT: jax.Array,
    mask_BxT: jax.Array,
    priority_BxT: jax.Array,
    *,
    ratio: float,
    lower: float,
    upper: float,
) -> ClipCovTerms:
    """Clip-Cov (Cui et al., arXiv 2505.22617; docs/algorithms.md section 3).

      candidates = valid tokens with lower < Cov < upper whose PPO loss is not already clipped
      selected   = the min(k, #candidates) candidates of highest `priority`, k = max(1, floor(ratio N))
      l_i        = 0 for selected tokens (value and gradient), the PPO loss l_i otherwise
    As in verl (`compute_policy_loss_clip_cov`), the loss of a selected token is multiplied by 0,
    and tokens the ratio clip already holds (l2 > l1, no gradient) are not candidates. verl's
    Clip-Cov has no dual clip: pass `terms` computed with `dual_clip=None` for its rule. With
    dual-clipped `terms` (the `algo.clip_cov_dual_clip` variant), tokens held by the dual clip,
    which have no gradient either, are no candidates too. With uniform priorities the selection
    is a uniform random subset of the candidates.

    Args:
      terms: the per-token PPO terms (`ppo_token_losses`).
      advantages_BxT, logprobs_BxT, mask_BxT: for Cov (log pi of the current policy).
      priority_BxT: the token priorities (`token_priorities`).
      ratio, lower, upper: `algo.clip_cov_ratio`, `algo.clip_cov_lb`, `algo.clip_cov_ub` (2e-4, 1, 5).
    """
    chex.assert_equal_shape([terms.loss_BxT, advantages_BxT, logprobs_BxT, mask_BxT, priority_BxT])
    covariance_BxT = token_covariance(advantages_BxT, logprobs_BxT, mask_BxT)
    already_clipped_BxT = (terms.clipped_BxT > 0) | (terms.lower_clipped_BxT > 0)
    candidates_BxT = (mask_BxT > 0) & (covariance_BxT > lower) & (covariance_BxT < upper) & ~already_clipped_BxT
    rank_BxT = descending_rank(priority_BxT, candidates_BxT)
    selected_BxT = candidates_BxT & (rank_BxT < fraction_count(ratio, mask_BxT))
    return ClipCovTerms(
        loss_BxT=jnp.where(selected_BxT, 0.0, terms.loss_BxT),
        selected_BxT=selected_BxT.astype(jnp.float32),
        candidates_BxT=candidates_BxT.astype(jnp.float32),
    )


def kl_cov_token_losses(
    logprobs_BxT: jax.Array,
    old_logprobs_BxT: jax.Array,
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    ratio: float,
    coef: float,
) -> KLCovTerms:
    """KL-Cov (Cui et al., arXiv 2505.22617; docs/algorithms.md section 3).

      selected = the top k valid tokens by Cov, k = max(1, floor(ratio N))
      l_i      = -A_i r_i + coef * |log pi_i - log pi_old_i|   for selected tokens
      l_i      = -A_i r_i                                      otherwise
    r = exp(clamp(log pi - log pi_old, -20, 20)). KL-Cov replaces PPO's ratio clip (and dual clip)
    by this penalty, as in the paper and its code (`compute_policy_loss_kl_cov`): no token is
    clipped. The penalty uses the unclamped log-ratio, so it keeps pulling back a token whose
    ratio left the clamp range.

    Args:
      ratio, coef: `algo.kl_cov_ratio` (2e-3; the paper uses 2e-4 .. 2e-3) and `algo.kl_cov_coef` (1.0).
    """
    chex.assert_rank(logprobs_BxT, 2)
    chex.assert_equal_shape([logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT])
    surrogate_BxT = -advantages_BxT * jnp.exp(clamped_log_ratio(logprobs_BxT, old_logprobs_BxT))
    valid_BxT = mask_BxT > 0
    rank_BxT = descending_rank(token_covariance(advantages_BxT, logprobs_BxT, mask_BxT), valid_BxT)
    selected_BxT = valid_BxT & (rank_BxT < fraction_count(ratio, mask_BxT))
    penalty_BxT = jnp.where(selected_BxT, coef * jnp.abs(logprobs_BxT - old_logprobs_BxT), 0.0)
    return KLCovTerms(surrogate_BxT + penalty_BxT, selected_BxT.astype(jnp.float32), penalty_BxT)


def top_entropy_selection(entropy_BxT: jax.Array, mask_BxT: jax.Array, fraction: float) -> TopEntropySelection:
    """High-entropy minority tokens (Wang et al., arXiv 2506.01939; docs/algorithms.md section 3).

      keep = the k valid tokens of highest entropy H, k = max(1, floor(fraction N))   (fraction 0.2)
    The caller multiplies the per-token policy loss by `keep` and aggregates over all valid tokens
    (the paper's objective: the indicator sits inside the token sum, the normaliser is unchanged).
    H is detached here.
    """
    chex.assert_rank(entropy_BxT, 2)
    chex.assert_equal_shape([entropy_BxT, mask_BxT])
    entropy_BxT = jax.lax.stop_gradient(entropy_BxT.astype(jnp.float32))
    valid_BxT = mask_BxT > 0
    keep_BxT = valid_BxT & (descending_rank(entropy_BxT, valid_BxT) < fraction_count(fraction, mask_BxT))
    threshold = jnp.where(jnp.any(keep_BxT), jnp.min(jnp.where(keep_BxT, entropy_BxT, jnp.inf)), 0.0)
    return TopEntropySelection(keep_BxT.astype(jnp.float32), threshold)
