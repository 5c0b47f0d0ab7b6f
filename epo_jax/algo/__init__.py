"""RL algorithm core: pure, jittable functions of arrays (no model, network or environment).

entropy:      token_entropy, logprobs_and_entropy (chunked over a large vocabulary)
aggregation:  aggregate_loss (verl's modes + EPO's trajectory mean), masked helpers
ppo:          dual-clip PPO surrogate, clipped value loss, KL estimators
advantages:   GAE, GRPO / Dr.GRPO, RLOO, GiGPO, whitening
epo:          phase weight, smoothing penalty, entropy history (paper and official-code variants)
loss:         make_loss_fn(config, forward_fn) -> loss_fn(params, batch, state)
Formulas and sources: each function's docstring (papers cited there).
"""
from epo_jax.algo.advantages import (
    expand_to_tokens,
    gae_advantages,
    gigpo_advantages,
    grpo_advantages,
    place_reward_on_last_token,
    rloo_advantages,
    step_discounted_returns,
    whiten_advantages,
)
from epo_jax.algo.aggregation import LOSS_AGG_MODES, aggregate_loss, dense_segment_ids, masked_mean, masked_sum
from epo_jax.algo.entropy import logprobs_and_entropy, token_entropy
from epo_jax.algo.epo import (
    EntropyHistoryState,
    EntropySums,
    code_phase_weight,
    code_smoothing_penalty,
    entropy_history_init,
    entropy_history_reference,
    entropy_history_turn_reference,
    entropy_history_update,
    entropy_history_update_from_sums,
    entropy_sums,
    phase_weight,
    smoothing_penalty,
)
from epo_jax.algo.loss import (
    BETA_SCHEDULES,
    ENTROPY_AGGREGATIONS,
    ENTROPY_CONTROLS,
    EPO_MODES,
    LossSettings,
    LossState,
    entropy_sums_from_metrics,
    loss_state_init,
    loss_state_update,
    make_loss_fn,
)
from epo_jax.algo.ppo import (
    KL_ESTIMATORS,
    PolicyLoss,
    PolicyLossTerms,
    kl_penalty,
    ppo_policy_loss,
    ppo_token_losses,
    value_loss,
)

__all__ = [
    "BETA_SCHEDULES",
    "ENTROPY_AGGREGATIONS",
    "ENTROPY_CONTROLS",
    "EPO_MODES",
    "EntropyHistoryState",
    "EntropySums",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LossSettings",
    "LossState",
    "PolicyLoss",
    "PolicyLossTerms",
    "aggregate_loss",
    "code_phase_weight",
    "code_smoothing_penalty",
    "dense_segment_ids",
    "entropy_history_init",
    "entropy_history_reference",
    "entropy_history_turn_reference",
    "entropy_history_update",
    "entropy_history_update_from_sums",
    "entropy_sums",
    "entropy_sums_from_metrics",
    "expand_to_tokens",
    "gae_advantages",
    "gigpo_advantages",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_and_entropy",
    "loss_state_init",
    "loss_state_update",
    "make_loss_fn",
    "masked_mean",
    "masked_sum",
    "phase_weight",
    "place_reward_on_last_token",
    "ppo_policy_loss",
    "ppo_token_losses",
    "rloo_advantages",
    "smoothing_penalty",
    "step_discounted_returns",
    "token_entropy",
    "value_loss",
    "whiten_advantages",
]
