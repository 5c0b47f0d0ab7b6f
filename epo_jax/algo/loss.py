"""The full actor(-critic) objective as one pure, jittable loss function.

  L = L_MT + entropy term [+ kl_coef * KL] [+ value_coef * L_V]
with the entropy term chosen by `algo.entropy_control`:
  none:  0                                              (plain PPO / GRPO)
  bonus: -entropy_coef * token-mean H
  epo:   -lambda * (L_H - beta_k * L_smooth)            (EPO Eq. 6: `epo.paper_regularizer`, `epo.code_regularizer`)
or, with no entropy term, a per-token reshaping of L_MT (epo_jax/algo/entropy_control.py):
  aepo:        entropy-balanced clip + A <- A (1 + a z(H))        (AEPO, docs/algorithms.md section 2 (c), (d))
  clip_cov:    no policy gradient for k random tokens with lb < Cov < ub   (Clip-Cov, section 3)
  kl_cov:      unclipped -A r, + coef |log pi - log pi_old| on the top-k tokens by Cov   (KL-Cov, section 3)
  top_entropy: policy gradient only through the top fraction of tokens by H  (arXiv 2506.01939, section 3)
DAPO's clip-higher is `algo.clip_low=0.2, algo.clip_high=0.28` with any of them.
`epo.mode` picks the paper's regulariser (hinge against the cumulative history, Eq. 3-6) or the
official code's (indicator {0, alpha}, per-turn history including the current step, turn gate,
150-epoch weight curve); docs/algorithms.md lists where code mode still differs from the
official code ("Where epo-jax differs from the official code").

Use:
  settings = LossSettings.from_config(config)        # once, from the validated config
  loss_fn = make_loss_fn(settings, forward_fn)
  state = loss_state_init(settings)
  per RL step: (loss, (metrics, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, state)
               for every micro-batch; sum the EntropySums over the step's micro-batches
               (`jax.tree.map(jnp.add, ...)`), then `state = loss_state_update(state, summed)`.
"""
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections

from epo_jax.algo.aggregation import aggregate_loss, masked_mean
from epo_jax.algo.entropy_control import (
    clip_cov_token_losses,
    entropy_aware_advantages,
    kl_cov_token_losses,
    token_priorities,
    top_entropy_selection,
)
from epo_jax.algo.epo import (
    EntropyHistoryState,
    EntropySums,
    EpoSettings,
    EpoTerms,
    entropy_history_init,
    entropy_history_update_from_sums,
    entropy_sums,
    code_regularizer,
    paper_regularizer,
)
from epo_jax.algo.ppo import PolicyLoss, PolicyLossTerms, kl_penalty, ppo_token_losses, summarize_policy_terms, value_loss
from epo_jax.algo.settings import from_section

ENTROPY_CONTROLS = ("none", "bonus", "epo", "aepo", "clip_cov", "kl_cov", "top_entropy")
# Metrics of the per-token entropy controls; each reports 0 under the other controls.
ENTROPY_CONTROL_METRICS = (
    "aepo_upper_clipfrac",
    "aepo_adv_scale_min",
    "aepo_adv_scale_max",
    "cov_candidate_fraction",
    "cov_selected_fraction",
    "kl_cov_penalty",
    "top_entropy_kept_fraction",
    "top_entropy_threshold",
)
# Metrics of the entropy term, the KL loss and the critic; 0 when a configuration lacks the term.
_TERM_METRICS = ("entropy_loss", "smooth_penalty", "smooth_fraction", "beta", "entropy_reference",
                 "kl_loss", "value_loss", "vf_clipfrac")

ForwardFn = Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]


class LossState(NamedTuple):
    """What the objective carries across RL steps: the step k and EPO's entropy history."""

    step: jax.Array                       # int32 scalar, 0-based RL step k
    entropy_history: EntropyHistoryState


class LossAux(NamedTuple):
    """The auxiliary output of `loss_fn`: metrics to log, and the entropy sums for the history."""

    metrics: Metrics
    entropy_sums: EntropySums


class LossInputs(NamedTuple):
    """The per-token arrays every term reads, from the forward pass and the batch."""

    logprobs_BxT: jax.Array
    entropy_BxT: jax.Array
    mask_BxT: jax.Array          # float32 response mask
    old_logprobs_BxT: jax.Array
    advantages_BxT: jax.Array
    traj_id_B: jax.Array
    turn_index_B: jax.Array


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static (Python) values the objective reads from the run config.

    Build it with `LossSettings.from_config(config)` from a config that `epo_jax.config.validate`
    has checked; nothing here checks the values again.
    """

    entropy_control: str   # ENTROPY_CONTROLS
    clip_low: float
    clip_high: float
    dual_clip: float | None
    loss_agg: str          # LOSS_AGG_MODES
    entropy_coef: float
    value_clip: float
    value_coef: float
    use_kl_loss: bool
    kl_coef: float
    kl_estimator: str      # KL_ESTIMATORS
    seed: int              # Clip-Cov's token draws
    aepo_entropy_adv_coef: float
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    clip_cov_dual_clip: bool  # False: verl's Clip-Cov, whose loss has no dual clip
    kl_cov_ratio: float
    kl_cov_coef: float
    top_entropy_fraction: float
    epo: EpoSettings

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossSettings":
        """Reads `config.algo`, `config.epo`, `config.train.total_steps` and `config.seed` (configs/base.py)."""
        return from_section(cls, config.algo, seed=int(config.seed), epo=EpoSettings.from_config(config))


def loss_state_init(settings: LossSettings) -> LossState:
    """LossState at RL step 0 with an empty entropy history of `epo.max_turns` turn slots."""
    return LossState(step=jnp.zeros((), jnp.int32), entropy_history=entropy_history_init(settings.epo.max_turns))


def loss_state_update(state: LossState, sums: EntropySums) -> LossState:
    """After RL step k: k -> k + 1, and the step's entropy joins the history (EPO Eq. 4)."""
    return LossState(step=state.step + 1, entropy_history=entropy_history_update_from_sums(state.entropy_history, sums))


def _require(batch: Mapping[str, jax.Array], key: str, reason: str) -> jax.Array:
    if key not in batch:
        raise KeyError(f"batch lacks {key!r}, needed because {reason}.")
    return batch[key]


def _loss_inputs(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> LossInputs:
    inputs = LossInputs(
        logprobs_BxT=outputs["logprobs"],
        entropy_BxT=outputs["entropy"],
        mask_BxT=_require(batch, "response_mask", "every loss term is masked").astype(jnp.float32),
        old_logprobs_BxT=_require(batch, "old_logprobs", "the PPO ratio needs the behaviour policy"),
        advantages_BxT=_require(batch, "advantages", "the PPO surrogate needs advantages"),
        traj_id_B=_require(batch, "traj_id", "losses aggregate per trajectory"),
        turn_index_B=_require(batch, "turn_index", "the entropy history is kept per turn index"),
    )
    chex.assert_equal_shape([inputs.logprobs_BxT, inputs.entropy_BxT, inputs.mask_BxT,
                             inputs.old_logprobs_BxT, inputs.advantages_BxT])
    chex.assert_shape([inputs.traj_id_B, inputs.turn_index_B], (inputs.mask_BxT.shape[0],))
    return inputs


def _masked_extreme(values_BxT: jax.Array, mask_BxT: jax.Array, reduce: Callable, fill: float) -> jax.Array:
    """min / max of the valid entries; 0 when no entry is valid."""
    valid_BxT = mask_BxT > 0
    return jnp.where(jnp.any(valid_BxT), reduce(jnp.where(valid_BxT, values_BxT, fill)), 0.0)


def _ppo_terms(settings: LossSettings, inputs: LossInputs, advantages_BxT: jax.Array, *,
               balanced_upper_clip: bool = False, dual_clip: bool = True) -> PolicyLossTerms:
    return ppo_token_losses(
        inputs.logprobs_BxT, inputs.old_logprobs_BxT, advantages_BxT,
        clip_low=settings.clip_low, clip_high=settings.clip_high,
        dual_clip=settings.dual_clip if dual_clip else None, balanced_upper_clip=balanced_upper_clip,
    )


def _plain_policy(settings: LossSettings, inputs: LossInputs, step: jax.Array) -> tuple[PolicyLossTerms, Metrics]:
    """Dual-clip PPO, unchanged (entropy controls none, bonus, epo)."""
    del step
    return _ppo_terms(settings, inputs, inputs.advantages_BxT), {}


def _aepo_policy(settings: LossSettings, inputs: LossInputs, step: jax.Array) -> tuple[PolicyLossTerms, Metrics]:
    """AEPO: entropy-aware advantages through the entropy-balanced clip."""
    del step
    shaped = entropy_aware_advantages(
        inputs.advantages_BxT, inputs.entropy_BxT, inputs.mask_BxT, settings.aepo_entropy_adv_coef
    )
    terms = _ppo_terms(settings, inputs, shaped.advantages_BxT, balanced_upper_clip=True)
    # With A > 0 the ratio clip is active exactly above 1 + clip_high: the tokens that keep
    # their gradient through the balanced bound.
    upper_BxT = ((terms.clipped_BxT > 0) & (shaped.advantages_BxT > 0)).astype(jnp.float32)
    return terms, {
        "aepo_upper_clipfrac": masked_mean(upper_BxT, inputs.mask_BxT),
        "aepo_adv_scale_min": _masked_extreme(shaped.scale_BxT, inputs.mask_BxT, jnp.min, jnp.inf),
        "aepo_adv_scale_max": _masked_extreme(shaped.scale_BxT, inputs.mask_BxT, jnp.max, -jnp.inf),
    }


def _clip_cov_policy(settings: LossSettings, inputs: LossInputs, step: jax.Array) -> tuple[PolicyLossTerms, Metrics]:
    """Clip-Cov: the PPO loss with the gradient of a few random covariance outliers removed.

    As verl's `compute_policy_loss_clip_cov`, the loss is max(l1, l2) with no dual clip, unless
    `algo.clip_cov_dual_clip` (then dual-clipped tokens are no candidates either).
    """
    terms = _ppo_terms(settings, inputs, inputs.advantages_BxT, dual_clip=settings.clip_cov_dual_clip)
    priority_BxT = token_priorities(settings.seed, step, inputs.traj_id_B, inputs.turn_index_B,
                                    inputs.mask_BxT.shape[1])
    clip_cov = clip_cov_token_losses(
        terms, inputs.advantages_BxT, inputs.logprobs_BxT, inputs.mask_BxT, priority_BxT,
        ratio=settings.clip_cov_ratio, lower=settings.clip_cov_lb, upper=settings.clip_cov_ub,
    )
    return terms._replace(loss_BxT=clip_cov.loss_BxT), {
        "cov_candidate_fraction": masked_mean(clip_cov.candidates_BxT, inputs.mask_BxT),
        "cov_selected_fraction": masked_mean(clip_cov.selected_BxT, inputs.mask_BxT),
    }


def _kl_cov_policy(settings: LossSettings, inputs: LossInputs, step: jax.Array) -> tuple[PolicyLossTerms, Metrics]:
    """KL-Cov: the unclipped surrogate with a |log-ratio| penalty on the top tokens by covariance."""
    terms = _ppo_terms(settings, inputs, inputs.advantages_BxT)
    kl_cov = kl_cov_token_losses(
        inputs.logprobs_BxT, inputs.old_logprobs_BxT, inputs.advantages_BxT, inputs.mask_BxT,
        ratio=settings.kl_cov_ratio, coef=settings.kl_cov_coef,
    )
    # KL-Cov has no ratio clip: no token is clipped.
    no_clip_BxT = jnp.zeros_like(terms.clipped_BxT)
    terms = terms._replace(loss_BxT=kl_cov.loss_BxT, clipped_BxT=no_clip_BxT, lower_clipped_BxT=no_clip_BxT)
    return terms, {
        "cov_selected_fraction": masked_mean(kl_cov.selected_BxT, inputs.mask_BxT),
        "kl_cov_penalty": aggregate_loss(kl_cov.penalty_BxT, inputs.mask_BxT, settings.loss_agg, inputs.traj_id_B),
    }


def _top_entropy_policy(settings: LossSettings, inputs: LossInputs, step: jax.Array
                        ) -> tuple[PolicyLossTerms, Metrics]:
    """High-entropy minority tokens: the policy gradient flows through the top fraction by H only."""
    terms = _ppo_terms(settings, inputs, inputs.advantages_BxT)
    selection = top_entropy_selection(inputs.entropy_BxT, inputs.mask_BxT, settings.top_entropy_fraction)
    terms = terms._replace(loss_BxT=jnp.where(selection.keep_BxT > 0, terms.loss_BxT, 0.0))
    return terms, {
        "top_entropy_kept_fraction": masked_mean(selection.keep_BxT, inputs.mask_BxT),
        "top_entropy_threshold": selection.threshold,
    }


_POLICY_OBJECTIVES = {
    "none": _plain_policy, "bonus": _plain_policy, "epo": _plain_policy, "aepo": _aepo_policy,
    "clip_cov": _clip_cov_policy, "kl_cov": _kl_cov_policy, "top_entropy": _top_entropy_policy,
}


def policy_objective(settings: LossSettings, inputs: LossInputs, step: jax.Array) -> tuple[PolicyLoss, Metrics]:
    """L_MT (dual-clip PPO) with the per-token reshaping of `algo.entropy_control`, aggregated with
    `algo.loss_agg`, and the metrics of ENTROPY_CONTROL_METRICS (0 for the controls not in use)."""
    terms, own_metrics = _POLICY_OBJECTIVES[settings.entropy_control](settings, inputs, step)
    metrics: Metrics = {name: jnp.zeros((), jnp.float32) for name in ENTROPY_CONTROL_METRICS}
    metrics.update(own_metrics)
    return summarize_policy_terms(terms, inputs.mask_BxT, settings.loss_agg, inputs.traj_id_B), metrics


def _epo_regularizer(settings: EpoSettings, inputs: LossInputs, state: LossState, sums: EntropySums) -> EpoTerms:
    """EPO's entropy term of `epo.mode`: the paper's (Eq. 6) or the official code's."""
    if settings.mode == "paper":
        return paper_regularizer(settings, inputs.entropy_BxT, inputs.mask_BxT, inputs.traj_id_B,
                                 state.entropy_history, state.step)
    return code_regularizer(settings, inputs.entropy_BxT, inputs.mask_BxT, inputs.traj_id_B, inputs.turn_index_B,
                            state.entropy_history, state.step, sums)


def make_loss_fn(
    settings: LossSettings, forward_fn: ForwardFn
) -> Callable[[Any, Mapping[str, jax.Array], LossState], tuple[jax.Array, LossAux]]:
    """Builds `loss_fn(params, batch, state) -> (loss, LossAux(metrics, entropy_sums))` for
    `jax.value_and_grad(has_aux=True)`; pure in (params, batch, state) and jittable.

    settings: `LossSettings.from_config(config)`. forward_fn(params, batch) must return "logprobs"
    [B, T] and "entropy" [B, T] (e.g. from `logprobs_and_entropy`) and, for a PPO critic, "values"
    [B, T]. batch holds "response_mask" [B, T], "old_logprobs" [B, T], "advantages" [B, T],
    "turn_index" [B] int32, "traj_id" [B] int32, "ref_logprobs" [B, T] when algo.use_kl_loss,
    "returns" and "old_values" [B, T] when forward_fn returns values, plus whatever forward_fn reads.

    entropy_sums (detached, additive over micro-batches) feed `loss_state_update`. Metrics
    (float32 scalars): loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl, entropy (token-mean
    H), entropy_loss (the aggregated entropy of the entropy term), smooth_penalty (L_smooth),
    smooth_fraction (tokens penalised), beta, entropy_reference (Hbar_W; code mode: token mean of
    the per-turn references), kl_loss, value_loss, vf_clipfrac, and those of
    ENTROPY_CONTROL_METRICS: aepo_upper_clipfrac (tokens above 1 + clip_high with A > 0, which keep
    their gradient), aepo_adv_scale_min / _max (range of 1 + a z(H)), cov_candidate_fraction
    (Clip-Cov: tokens with lb < Cov < ub not already clipped), cov_selected_fraction (Clip-Cov:
    gradients removed; KL-Cov: tokens penalised), kl_cov_penalty (the aggregated coef |log pi -
    log pi_old| term), top_entropy_kept_fraction and top_entropy_threshold (smallest entropy kept).
    Under kl_cov, pg_clipfrac and pg_clipfrac_lower are 0 (no clip). Terms a configuration does
    not use report 0.
    """
    if not isinstance(settings, LossSettings):
        raise TypeError(f"make_loss_fn takes LossSettings, got {type(settings).__name__}; "
                        "build it once with LossSettings.from_config(config).")

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], state: LossState) -> tuple[jax.Array, LossAux]:
        outputs = forward_fn(params, batch)
        inputs = _loss_inputs(outputs, batch)
        mask_BxT = inputs.mask_BxT
        policy, control_metrics = policy_objective(settings, inputs, state.step)
        sums = entropy_sums(inputs.entropy_BxT, mask_BxT, inputs.turn_index_B, settings.epo.max_turns)
        metrics: Metrics = {
            "pg_loss": policy.loss,
            "pg_clipfrac": policy.clipfrac,
            "pg_clipfrac_lower": policy.clipfrac_lower,
            "ppo_kl": policy.ppo_kl,
            "entropy": masked_mean(jax.lax.stop_gradient(inputs.entropy_BxT), mask_BxT),
            **{name: jnp.zeros((), jnp.float32) for name in _TERM_METRICS},
            **control_metrics,
        }
        loss = policy.loss

        if settings.entropy_control == "bonus":
            token_mean_entropy = aggregate_loss(inputs.entropy_BxT, mask_BxT, "token-mean")
            loss = loss - settings.entropy_coef * token_mean_entropy
            metrics["entropy_loss"] = token_mean_entropy
        elif settings.entropy_control == "epo":
            epo_terms = _epo_regularizer(settings.epo, inputs, state, sums)
            loss = loss + epo_terms.term
            metrics.update({name: value for name, value in epo_terms._asdict().items() if name != "term"})

        if settings.use_kl_loss:
            ref_logprobs_BxT = _require(batch, "ref_logprobs", "algo.use_kl_loss=True (or set it to False)")
            kl_BxT = kl_penalty(inputs.logprobs_BxT, ref_logprobs_BxT, settings.kl_estimator)
            metrics["kl_loss"] = aggregate_loss(kl_BxT, mask_BxT, settings.loss_agg, inputs.traj_id_B)
            loss = loss + settings.kl_coef * metrics["kl_loss"]

        if "values" in outputs:
            returns_BxT = _require(batch, "returns", "forward_fn returns values (the PPO critic)")
            old_values_BxT = _require(batch, "old_values", "forward_fn returns values (the PPO critic)")
            metrics["value_loss"], metrics["vf_clipfrac"] = value_loss(
                outputs["values"], old_values_BxT, returns_BxT, mask_BxT,
                clip=settings.value_clip, loss_agg=settings.loss_agg, traj_id_B=inputs.traj_id_B,
            )
            loss = loss + settings.value_coef * metrics["value_loss"]

        metrics["loss"] = loss
        return loss, LossAux(metrics, sums)

    return loss_fn
