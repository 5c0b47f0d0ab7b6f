"""EPO's entropy machinery: smoothing penalty, phase weight and the entropy history.

Xu et al., "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
arXiv 2509.22576 (v2), Eq. 2-6; docs/algorithms.md section 1. Two variants:
  paper: hinge penalty (Eq. 3) against the cumulative mean of past batch entropies (Eq. 4),
         phase weight beta_k = 1 + exp(-gamma k / floor(K/2)) (Eq. 5);
  code:  what the official code (github WujiangXu/EPO) does -- an indicator penalty {0, alpha}
         with no gradient, a per-turn-index history that includes the current step, and a
         hand-made weight curve over 150 epochs.
"""
import dataclasses
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections

from epo_jax.algo.aggregation import aggregate_loss, masked_mean, safe_divide
from epo_jax.algo.settings import from_section

EPO_MODES = ("paper", "code")
BETA_SCHEDULES = ("phase", "constant")
# epo.entropy_agg -> aggregate_loss mode: "trajectory" is Eq. 2, "token" the official code's token mean.
ENTROPY_AGGREGATIONS = {"trajectory": "trajectory", "token": "token-mean"}
# epo.code_mask_mode, the official entropy_smooth_mask_mode: code mode's indicator per token
# ("token") or one per turn sample from its mean entropy ("seq").
CODE_MASK_MODES = ("token", "seq")


@dataclasses.dataclass(frozen=True)
class EpoSettings:
    """The static values of EPO's entropy term (`config.epo`, configs/base.py), read once.

    `epo_jax.config.validate` checks them; nothing here checks them again.
    """

    mode: str                # EPO_MODES
    lam: float               # lambda of Eq. 6
    kappa_l: float           # corridor [kappa_l, kappa_r] x reference (Eq. 3)
    kappa_r: float
    gamma: float             # phase-weight decay (Eq. 5)
    alpha: float             # smoothing penalty scale
    smoothing: bool          # False: EPO-Base
    beta_schedule: str       # BETA_SCHEDULES
    entropy_agg: str         # a key of ENTROPY_AGGREGATIONS
    code_turn_gate: int      # code mode: smooth only micro-batches holding a turn >= gate
    code_total_epochs: int   # code mode: length E of the weight curve
    code_decay: float        # code mode: second-half decay rate of the weight curve
    code_mask_mode: str      # code mode: CODE_MASK_MODES
    max_turns: int           # slots of the per-turn-index history
    total_steps: int         # K, `train.total_steps`

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "EpoSettings":
        """Reads `config.epo` and `config.train.total_steps`."""
        return from_section(cls, config.epo, total_steps=int(config.train.total_steps))


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


def code_phase_weight(step: jax.Array | int, total_epochs: int = 150, decay: float = 3.0) -> jax.Array:
    """The official code's smoothing weight curve (`_calculate_epoch_based_entropy_weight`;
    docs/algorithms.md section 1, "code" variant).

    With h = floor(E / 2) and the epoch e clamped to [0, E]:
      e <= h:  w = 1 - 0.2 (1 - exp(-2 p)),  p = e / h          (1.0 -> ~0.83)
      e >  h:  w = 0.8 exp(-decay p),        p = (e - h) / (E - h)  (0.8 -> 0.8 e^-decay)

    Args:
      step: the 0-based RL step, the official trainer's epoch counter.
      total_epochs: E (`epo.code_total_epochs`, 150 in the official code).
      decay: second-half decay rate (`epo.code_decay`; fixed at 3.0 in the official code).
    """
    if total_epochs < 2:
        raise ValueError(f"code_phase_weight needs epo.code_total_epochs >= 2, got {total_epochs}.")
    half = total_epochs // 2
    epoch = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(total_epochs))
    first_half = 1.0 - 0.2 * (1.0 - jnp.exp(-2.0 * epoch / half))
    second_half = 0.8 * jnp.exp(-decay * (epoch - half) / (total_epochs - half))
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
    """The official code's penalty (`generate_entropy_penalty`): 0 if kappa_l Hbar < H < kappa_r Hbar
    (strict), else alpha.

    An indicator with no gradient (`stop_gradient`), so in code mode the smoothing term changes
    the loss value but the gradient is that of the plain entropy bonus. `entropy` is per token
    (mask mode "token") or one value per turn sample (mode "seq", shape [B, 1]).
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


class EpoTerms(NamedTuple):
    """EPO's entropy term and its parts (float32 scalars), as the loss reports them."""

    term: jax.Array               # -lambda * (L_H - beta * L_smooth), added to the loss
    entropy_loss: jax.Array       # L_H
    smooth_penalty: jax.Array     # L_smooth (0 when smoothing is off)
    smooth_fraction: jax.Array    # fraction of valid tokens with a positive penalty
    beta: jax.Array               # beta_k (code mode: the weight curve)
    entropy_reference: jax.Array  # Hbar_W (code mode: token mean of the per-turn references)


def trajectory_entropy(values_BxT: jax.Array, mask_BxT: jax.Array, traj_id_B: jax.Array) -> jax.Array:
    """EPO Eq. 2: L_H = 1/|B| sum_traj 1/|T_traj| sum_{turns t} 1/|y_t| sum_{tokens} H.

    Tokens -> turn -> trajectory -> batch, each a mean (`aggregate_loss(mode="trajectory")`);
    L_smooth applies the same aggregation to alpha * P (Eq. 3).
    """
    return aggregate_loss(values_BxT, mask_BxT, "trajectory", traj_id_B)


def _aggregate_like_entropy(values_BxT, mask_BxT, traj_id_B, entropy_agg: str) -> jax.Array:
    """L_H's aggregation: Eq. 2 for "trajectory", the official code's token mean for "token"."""
    if entropy_agg == "trajectory":
        return trajectory_entropy(values_BxT, mask_BxT, traj_id_B)
    return aggregate_loss(values_BxT, mask_BxT, ENTROPY_AGGREGATIONS[entropy_agg], traj_id_B)


def history_smoothing_penalty(
    entropy_BxT: jax.Array, history: EntropyHistoryState, kappa_l: float, kappa_r: float, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """EPO Eq. 3-4: alpha * P(H; Hbar_W) per token with Hbar_W = mean(W_k), and Hbar_W itself.

    W_0 is empty, so there is no penalty at step 0 (the reference is 0 then).
    """
    reference = entropy_history_reference(history)
    active = (history.num_steps > 0).astype(jnp.float32)
    return alpha * active * smoothing_penalty(entropy_BxT, reference, kappa_l, kappa_r), reference


def _combine(settings: EpoSettings, entropy_loss, penalty_BxT, mask_BxT, traj_id_B, reference,
             scheduled_weight: Callable[[], jax.Array]) -> EpoTerms:
    """-lambda * (L_H - beta * L_smooth) from L_H and the per-token penalty, with beta the
    schedule's weight (1 for `epo.beta_schedule="constant"`) and L_smooth = 0 for EPO-Base
    (`epo.smoothing=False`)."""
    beta = jnp.ones((), jnp.float32) if settings.beta_schedule == "constant" else scheduled_weight()
    if settings.smoothing:
        smooth_loss = _aggregate_like_entropy(penalty_BxT, mask_BxT, traj_id_B, settings.entropy_agg)
        smooth_fraction = masked_mean((penalty_BxT > 0).astype(jnp.float32), mask_BxT)
    else:
        smooth_loss = smooth_fraction = jnp.zeros((), jnp.float32)
    term = -settings.lam * (entropy_loss - beta * smooth_loss)
    return EpoTerms(term, entropy_loss, smooth_loss, smooth_fraction, beta, reference)


def paper_regularizer(
    settings: EpoSettings,
    entropy_BxT: jax.Array,
    mask_BxT: jax.Array,
    traj_id_B: jax.Array,
    history: EntropyHistoryState,
    step: jax.Array,
) -> EpoTerms:
    """EPO Eq. 6's entropy term: -lambda * (L_H - beta_k * L_smooth).

    L_H from Eq. 2 (`trajectory_entropy`, or a token mean with `epo.entropy_agg="token"`),
    L_smooth the same aggregation of `history_smoothing_penalty` (Eq. 3-4), beta_k the phase
    weight (Eq. 5; 1 with `epo.beta_schedule="constant"`).
    """
    entropy_loss = _aggregate_like_entropy(entropy_BxT, mask_BxT, traj_id_B, settings.entropy_agg)
    penalty_BxT, reference = history_smoothing_penalty(
        entropy_BxT, history, settings.kappa_l, settings.kappa_r, settings.alpha
    )
    return _combine(settings, entropy_loss, penalty_BxT, mask_BxT, traj_id_B, reference,
                    lambda: phase_weight(step, settings.total_steps, settings.gamma))


def code_regularizer(
    settings: EpoSettings,
    entropy_BxT: jax.Array,
    mask_BxT: jax.Array,
    traj_id_B: jax.Array,
    turn_index_B: jax.Array,
    history: EntropyHistoryState,
    step: jax.Array,
    current: EntropySums,
) -> EpoTerms:
    """The official code's entropy term (`update_policy` of its dp_actor.py, docs/algorithms.md section 1):

      -lambda * (L_H - w_e * agg(M)),  M = `code_smoothing_penalty` {0, alpha} against the
      per-turn-index reference of the row's turn (`entropy_history_turn_reference`, which
      includes `current`, this step's sums), w_e = `code_phase_weight` (1 with beta_schedule="constant").
    `epo.code_mask_mode="token"` judges each token's H; "seq" judges each turn sample's mean H over
    its valid tokens and gives all of its tokens that one value. M is 0 for a micro-batch holding
    no valid row of turn index >= `epo.code_turn_gate`.
    """
    entropy_loss = _aggregate_like_entropy(entropy_BxT, mask_BxT, traj_id_B, settings.entropy_agg)
    reference_M = entropy_history_turn_reference(history, current)
    reference_B = reference_M[jnp.clip(turn_index_B, 0, settings.max_turns - 1)]
    reference = masked_mean(jnp.broadcast_to(reference_B[:, None], mask_BxT.shape), mask_BxT)
    row_valid_B = jnp.sum(mask_BxT, axis=-1) > 0
    # The official code smooths only micro-batches holding a late turn.
    active = jnp.any((turn_index_B >= settings.code_turn_gate) & row_valid_B).astype(jnp.float32)
    if settings.code_mask_mode == "seq":
        judged_BxT = masked_mean(entropy_BxT, mask_BxT, axis=-1)[:, None]
    else:
        judged_BxT = entropy_BxT
    penalty_BxT = active * jnp.broadcast_to(code_smoothing_penalty(
        judged_BxT, reference_B[:, None], settings.kappa_l, settings.kappa_r, settings.alpha
    ), mask_BxT.shape)
    return _combine(settings, entropy_loss, penalty_BxT, mask_BxT, traj_id_B, reference,
                    lambda: code_phase_weight(step, settings.code_total_epochs, settings.code_decay))

