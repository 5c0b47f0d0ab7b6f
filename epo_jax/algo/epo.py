"""EPO's entropy machinery: smoothing penalty, phase weight and the entropy history.

Xu et al., "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
arXiv 2509.22576 (v2), Eq. 2-6; docs/algorithms.md section 1. Two variants:
  paper: hinge penalty (Eq. 3) against the cumulative mean of past batch entropies (Eq. 4),
         phase weight beta_k = 1 + exp(-gamma k / floor(K/2)) (Eq. 5);
  code:  what the official code (github WujiangXu/EPO) does -- an indicator penalty {0, alpha}
         with no gradient, a per-turn-index history that includes the current step, and a
         hand-made weight curve over 150 epochs.
"""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from epo_jax.algo.aggregation import safe_divide


def phase_weight(step: jax.Array | int, total_steps: int, gamma: float) -> jax.Array:
    """EPO Eq. 5: beta_k = 1 + exp(-gamma * k / k_mid), k_mid = floor(K / 2).

    beta_0 = 2, beta_{k_mid} = 1 + e^{-gamma}; decays towards 1 in the second half of training.

    Args:
      step: k, the 0-based RL step (traced or Python int).
      total_steps: K, the number of RL steps of the run (`train.total_steps`).
      gamma: decay rate (`epo.gamma`, 3.0 in the paper).
    """
    if total_steps < 2:
        raise ValueError(f"phase_weight needs train.total_steps >= 2 (k_mid = floor(K/2) >= 1), got {total_steps}.")
    mid_step = total_steps // 2
    return 1.0 + jnp.exp(-gamma * jnp.asarray(step, jnp.float32) / mid_step)


def code_phase_weight(step: jax.Array | int, total_epochs: int = 150, gamma: float = 3.0) -> jax.Array:
    """The official code's smoothing weight curve (docs/algorithms.md section 1, "code" variant).

    With h = floor(E / 2) and the epoch e clamped to [0, E]:
      e <= h:  w = 1 - 0.2 (1 - exp(-2 p)),  p = e / h          (1.0 -> ~0.83)
      e >  h:  w = 0.8 exp(-gamma p),        p = (e - h) / (E - h)  (0.8 -> 0.8 e^-gamma)

    Args:
      step: the 0-based RL step, the official trainer's epoch counter.
      total_epochs: E (`epo.code_total_epochs`, 150 in the official code).
      gamma: second-half decay rate (3.0 in the official code).
    """
    if total_epochs < 2:
        raise ValueError(f"code_phase_weight needs epo.code_total_epochs >= 2, got {total_epochs}.")
    half = total_epochs // 2
    epoch = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(total_epochs))
    first_half = 1.0 - 0.2 * (1.0 - jnp.exp(-2.0 * epoch / half))
    second_half = 0.8 * jnp.exp(-gamma * (epoch - half) / (total_epochs - half))
    return jnp.where(epoch <= half, first_half, second_half)


def smoothing_penalty(
    entropy: jax.Array, reference: jax.Array | float, kappa_l: float, kappa_r: float
) -> jax.Array:
    """EPO Eq. 3 per-token hinge: P = relu(kappa_l * Hbar_W - H) + relu(H - kappa_r * Hbar_W).

    Zero inside the corridor [kappa_l Hbar_W, kappa_r Hbar_W], linear outside it; differentiable
    in `entropy` (gradient -1 below, +1 above, 0 inside). `reference` (Hbar_W) is treated as a
    constant. The caller scales by alpha and aggregates like L_H.
    """
    reference = jax.lax.stop_gradient(jnp.asarray(reference, jnp.float32))
    return jax.nn.relu(kappa_l * reference - entropy) + jax.nn.relu(entropy - kappa_r * reference)


def code_smoothing_penalty(
    entropy: jax.Array, reference: jax.Array, kappa_l: float, kappa_r: float, alpha: float
) -> jax.Array:
    """The official code's penalty: 0 if kappa_l Hbar < H < kappa_r Hbar (strict), else alpha.

    An indicator with no gradient (`stop_gradient`), so in code mode the smoothing term changes
    the loss value but the gradient is that of the plain entropy bonus.
    """
    entropy = jax.lax.stop_gradient(entropy)
    inside = (entropy > kappa_l * reference) & (entropy < kappa_r * reference)
    return jax.lax.stop_gradient(jnp.where(inside, 0.0, jnp.float32(alpha)))


class EntropySums(NamedTuple):
    """Additive entropy statistics of one batch; sum them over micro-batches of an RL step."""

    entropy_sum: jax.Array           # sum of H over valid tokens, float32 scalar
    token_count: jax.Array           # number of valid tokens (mask sum), float32 scalar
    turn_entropy_sum_M: jax.Array    # the same per turn index, [max_turns]
    turn_token_count_M: jax.Array    # [max_turns]


class EntropyHistoryState(NamedTuple):
    """History W_k of batch entropies (EPO Eq. 4) as running sums; a pytree, checkpointable.

    step_mean_sum / num_steps is Hbar_W of the paper (mean of the token-mean entropies of past
    RL steps); turn_mean_sum_M / turn_num_steps_M are the code variant's per-turn-index
    cumulative means (each step contributes the token-mean entropy of its turns of that index).
    """

    step_mean_sum: jax.Array       # float32 scalar
    num_steps: jax.Array           # int32 scalar
    turn_mean_sum_M: jax.Array     # float32 [max_turns]
    turn_num_steps_M: jax.Array    # int32 [max_turns]


def entropy_sums(
    entropy_BxT: jax.Array, mask_BxT: jax.Array, turn_index_B: jax.Array, max_turns: int
) -> EntropySums:
    """Detached masked sums of H, overall and per turn index (rows with turn >= max_turns are left
    out of the per-turn sums only)."""
    chex.assert_rank([entropy_BxT, mask_BxT, turn_index_B], [2, 2, 1])
    chex.assert_equal_shape([entropy_BxT, mask_BxT])
    entropy_BxT = jax.lax.stop_gradient(entropy_BxT.astype(jnp.float32))
    mask_BxT = mask_BxT.astype(jnp.float32)
    row_sum_B = jnp.sum(jnp.where(mask_BxT > 0, entropy_BxT * mask_BxT, 0.0), axis=-1)
    row_count_B = jnp.sum(mask_BxT, axis=-1)
    turn_index_B = jnp.asarray(turn_index_B, jnp.int32)
    return EntropySums(
        entropy_sum=jnp.sum(row_sum_B),
        token_count=jnp.sum(row_count_B),
        turn_entropy_sum_M=jax.ops.segment_sum(row_sum_B, turn_index_B, num_segments=max_turns),
        turn_token_count_M=jax.ops.segment_sum(row_count_B, turn_index_B, num_segments=max_turns),
    )


def entropy_history_init(max_turns: int) -> EntropyHistoryState:
    """Empty history W_0 = {} (no smoothing penalty at step 0) with `max_turns` turn slots."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 (epo.max_turns), got {max_turns}.")
    return EntropyHistoryState(
        step_mean_sum=jnp.zeros((), jnp.float32),
        num_steps=jnp.zeros((), jnp.int32),
        turn_mean_sum_M=jnp.zeros((max_turns,), jnp.float32),
        turn_num_steps_M=jnp.zeros((max_turns,), jnp.int32),
    )


def entropy_history_update_from_sums(state: EntropyHistoryState, sums: EntropySums) -> EntropyHistoryState:
    """Appends one RL step's Hbar_k = entropy_sum / token_count (and per-turn means) to the history.

    A step without tokens adds nothing; a turn index absent from the step keeps its history.
    """
    chex.assert_equal_shape([state.turn_mean_sum_M, sums.turn_entropy_sum_M])
    has_tokens = sums.token_count > 0
    turn_present_M = sums.turn_token_count_M > 0
    return EntropyHistoryState(
        step_mean_sum=state.step_mean_sum + safe_divide(sums.entropy_sum, sums.token_count),
        num_steps=state.num_steps + has_tokens.astype(jnp.int32),
        turn_mean_sum_M=state.turn_mean_sum_M + safe_divide(sums.turn_entropy_sum_M, sums.turn_token_count_M),
        turn_num_steps_M=state.turn_num_steps_M + turn_present_M.astype(jnp.int32),
    )


def entropy_history_update(
    state: EntropyHistoryState, entropy_BxT: jax.Array, mask_BxT: jax.Array, turn_index_B: jax.Array
) -> EntropyHistoryState:
    """Appends the batch's token-mean entropy (overall and per turn index) to the history (Eq. 4)."""
    sums = entropy_sums(entropy_BxT, mask_BxT, turn_index_B, state.turn_mean_sum_M.shape[0])
    return entropy_history_update_from_sums(state, sums)


def entropy_history_reference(state: EntropyHistoryState) -> jax.Array:
    """Hbar_W = mean(W_k) = (1/k) sum_{m<k} Hbar_m (EPO Eq. 4, cumulative); 0 while the history is empty."""
    return safe_divide(state.step_mean_sum, state.num_steps.astype(jnp.float32))


def entropy_history_turn_reference(state: EntropyHistoryState, current: EntropySums) -> jax.Array:
    """The code variant's per-turn-index reference [max_turns], including the current step.

      ref[t] = (sum of past steps' turn-t means + current turn-t mean) / (past steps with turn t + 1)
    where the current step contributes only if it has tokens at turn t. A step without turn t does
    not count for t (the official trainer pads each step's per-turn list with leading zeros to
    max_steps instead, which shifts indices when episodes end early; that artefact is not kept).
    """
    current_present_M = current.turn_token_count_M > 0
    current_mean_M = safe_divide(current.turn_entropy_sum_M, current.turn_token_count_M)
    total_M = state.turn_mean_sum_M + jnp.where(current_present_M, current_mean_M, 0.0)
    count_M = state.turn_num_steps_M.astype(jnp.float32) + current_present_M.astype(jnp.float32)
    return safe_divide(total_M, count_M)
