"""The full actor(-critic) objective as one pure, jittable loss function.

  L = L_MT + entropy term [+ kl_coef * KL] [+ value_coef * L_V]
with the entropy term chosen by `algo.entropy_control`:
  none:  0                                              (plain PPO / GRPO)
  bonus: -entropy_coef * token-mean H
  epo:   -lambda * (L_H - beta_k * L_smooth)            (EPO Eq. 6, docs/algorithms.md section 1 (e))
or, with no entropy term, a per-token reshaping of L_MT (epo_jax/algo/entropy_control.py):
  aepo:        entropy-balanced clip + A <- A (1 + a z(H))        (AEPO, docs/algorithms.md section 2 (c), (d))
  clip_cov:    no policy gradient for k random tokens with lb < Cov < ub   (Clip-Cov, section 3)
  kl_cov:      unclipped -A r, + coef |log pi - log pi_old| on the top-k tokens by Cov   (KL-Cov, section 3)
  top_entropy: policy gradient only through the top fraction of tokens by H  (arXiv 2506.01939, section 3)
DAPO's clip-higher is `algo.clip_low=0.2, algo.clip_high=0.28` with any of them.
`epo.mode` picks the paper's smoothing (hinge against the cumulative history, Eq. 3-5) or the
official code's (indicator {0, alpha}, per-turn history including the current step, turn gate,
150-epoch weight curve); `epo.smoothing=False` is EPO-Base; `epo.beta_schedule="constant"` uses
beta = 1; `epo.entropy_agg` aggregates L_H and L_smooth per trajectory (Eq. 2) or per token.

In code mode the current step's per-turn entropies come from the batch handed to `loss_fn`
(the official trainer takes them from the whole rollout batch, which is the same thing when a step
is one micro-batch), and the official code aggregates with a token mean: set
`epo.entropy_agg="token"` to reproduce it exactly.

The trainer's loop per RL step: sum the metrics entropy_sum, token_count, turn_entropy_sum and
turn_token_count over the step's micro-batches, then
`state = loss_state_update(state, entropy_sums_from_metrics(summed))`.
"""
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections

from epo_jax.algo.aggregation import LOSS_AGG_MODES, aggregate_loss, masked_mean
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
    code_phase_weight,
    code_smoothing_penalty,
    entropy_history_init,
    entropy_history_reference,
    entropy_history_turn_reference,
    entropy_history_update_from_sums,
    entropy_sums,
    phase_weight,
    smoothing_penalty,
)
from epo_jax.algo.ppo import (
    KL_ESTIMATORS,
    PolicyLoss,
    kl_penalty,
    ppo_token_losses,
    summarize_policy_terms,
    value_loss,
)

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
EPO_MODES = ("paper", "code")
BETA_SCHEDULES = ("phase", "constant")
# epo.entropy_agg -> aggregate_loss mode: "trajectory" is Eq. 2, "token" the official code's token mean.
ENTROPY_AGGREGATIONS = {"trajectory": "trajectory", "token": "token-mean"}

ForwardFn = Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]]
Metrics = dict[str, jax.Array]


class LossState(NamedTuple):
    """What the objective carries across RL steps: the step k and EPO's entropy history."""

    step: jax.Array                       # int32 scalar, 0-based RL step k
    entropy_history: EntropyHistoryState


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"config.{field}={value!r} is not supported; choose one of {choices}.")
    return value


def _fraction(value: Any, field: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"config.{field}={value} must be a fraction of the tokens in (0, 1]; set --config.{field}.")
    return value


def _non_negative(value: Any, field: str) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"config.{field}={value} must be >= 0; set --config.{field}.")
    return value


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static (Python) values the objective reads from the run config, validated once."""

    entropy_control: str
    clip_low: float
    clip_high: float
    dual_clip: float | None
    loss_agg: str
    entropy_coef: float
    value_clip: float
    value_coef: float
    use_kl_loss: bool
    kl_coef: float
    kl_estimator: str
    epo_mode: str
    lam: float
    kappa_l: float
    kappa_r: float
    gamma: float
    alpha: float
    smoothing: bool
    beta_schedule: str
    entropy_agg: str
    code_turn_gate: int
    code_total_epochs: int
    max_turns: int
    total_steps: int
    seed: int
    aepo_entropy_adv_coef: float
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    kl_cov_ratio: float
    kl_cov_coef: float
    top_entropy_fraction: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossSettings":
        """Reads `config.algo`, `config.epo`, `config.train.total_steps` and `config.seed` (configs/base.py)."""
        algo, epo = config.algo, config.epo
        dual_clip = algo.get("dual_clip", 3.0)
        settings = cls(
            entropy_control=_choice(algo.get("entropy_control", "epo"), "algo.entropy_control", ENTROPY_CONTROLS),
            clip_low=float(algo.get("clip_low", 0.2)),
            clip_high=float(algo.get("clip_high", 0.2)),
            dual_clip=None if dual_clip is None else float(dual_clip),
            loss_agg=_choice(algo.get("loss_agg", "token-mean"), "algo.loss_agg", LOSS_AGG_MODES),
            entropy_coef=float(algo.get("entropy_coef", 0.0)),
            value_clip=float(algo.get("value_clip", 0.5)),
            value_coef=float(algo.get("value_coef", 0.5)),
            use_kl_loss=bool(algo.get("use_kl_loss", True)),
            kl_coef=float(algo.get("kl_coef", 0.01)),
            kl_estimator=_choice(algo.get("kl_estimator", "low_var_kl"), "algo.kl_estimator", KL_ESTIMATORS),
            epo_mode=_choice(epo.get("mode", "paper"), "epo.mode", EPO_MODES),
            lam=float(epo.get("lam", 0.001)),
            kappa_l=float(epo.get("kappa_l", 0.0)),
            kappa_r=float(epo.get("kappa_r", 2.0)),
            gamma=float(epo.get("gamma", 3.0)),
            alpha=float(epo.get("alpha", 0.05)),
            smoothing=bool(epo.get("smoothing", True)),
            beta_schedule=_choice(epo.get("beta_schedule", "phase"), "epo.beta_schedule", BETA_SCHEDULES),
            entropy_agg=_choice(epo.get("entropy_agg", "trajectory"), "epo.entropy_agg", tuple(ENTROPY_AGGREGATIONS)),
            code_turn_gate=int(epo.get("code_turn_gate", 25)),
            code_total_epochs=int(epo.get("code_total_epochs", 150)),
            max_turns=int(epo.get("max_turns", 64)),
            total_steps=int(config.train.total_steps),
            seed=int(config.get("seed", 0)),
            aepo_entropy_adv_coef=_non_negative(algo.get("aepo_entropy_adv_coef", 0.2), "algo.aepo_entropy_adv_coef"),
            clip_cov_ratio=_fraction(algo.get("clip_cov_ratio", 2e-4), "algo.clip_cov_ratio"),
            clip_cov_lb=float(algo.get("clip_cov_lb", 1.0)),
            clip_cov_ub=float(algo.get("clip_cov_ub", 5.0)),
            kl_cov_ratio=_fraction(algo.get("kl_cov_ratio", 2e-3), "algo.kl_cov_ratio"),
            kl_cov_coef=_non_negative(algo.get("kl_cov_coef", 1.0), "algo.kl_cov_coef"),
            top_entropy_fraction=_fraction(algo.get("top_entropy_fraction", 0.2), "algo.top_entropy_fraction"),
        )
        if not settings.clip_cov_lb < settings.clip_cov_ub:
            raise ValueError(
                f"config.algo.clip_cov_lb={settings.clip_cov_lb} must be below config.algo.clip_cov_ub="
                f"{settings.clip_cov_ub}; Clip-Cov's candidates have lb < Cov < ub (defaults 1 and 5)."
            )
        if settings.kappa_l > settings.kappa_r:
            raise ValueError(
                f"config.epo.kappa_l={settings.kappa_l} exceeds config.epo.kappa_r={settings.kappa_r}; "
                "the entropy corridor [kappa_l, kappa_r] * Hbar_W must not be empty."
            )
        if settings.entropy_control == "epo" and settings.beta_schedule == "phase":
            total = settings.total_steps if settings.epo_mode == "paper" else settings.code_total_epochs
            field = "train.total_steps" if settings.epo_mode == "paper" else "epo.code_total_epochs"
            if total < 2:
                raise ValueError(
                    f"config.{field}={total} must be >= 2 for the phase weight "
                    "(or set epo.beta_schedule='constant')."
                )
        env_max_turns = config.get("env", {}).get("max_turns", 0)
        if settings.max_turns < max(env_max_turns, 1):
            raise ValueError(
                f"config.epo.max_turns={settings.max_turns} is smaller than config.env.max_turns={env_max_turns}; "
                "the per-turn entropy history needs one slot per turn: raise epo.max_turns."
            )
        return settings


def loss_state_init(config: ml_collections.ConfigDict) -> LossState:
    """LossState at RL step 0 with an empty entropy history of `epo.max_turns` turn slots."""
    settings = LossSettings.from_config(config)
    return LossState(step=jnp.zeros((), jnp.int32), entropy_history=entropy_history_init(settings.max_turns))


def entropy_sums_from_metrics(metrics: Mapping[str, jax.Array]) -> EntropySums:
    """The additive entropy statistics that `loss_fn` reports (sum them over micro-batches first)."""
    return EntropySums(
        entropy_sum=jnp.asarray(metrics["entropy_sum"]),
        token_count=jnp.asarray(metrics["token_count"]),
        turn_entropy_sum_M=jnp.asarray(metrics["turn_entropy_sum"]),
        turn_token_count_M=jnp.asarray(metrics["turn_token_count"]),
    )


def loss_state_update(state: LossState, sums: EntropySums) -> LossState:
    """After RL step k: k -> k + 1, and the step's entropy joins the history (EPO Eq. 4)."""
    return LossState(step=state.step + 1, entropy_history=entropy_history_update_from_sums(state.entropy_history, sums))


def _require(batch: Mapping[str, jax.Array], key: str, reason: str) -> jax.Array:
    if key not in batch:
        raise KeyError(f"batch lacks {key!r}, needed because {reason}.")
    return batch[key]


def _epo_entropy_term(
    settings: LossSettings,
    entropy_BxT: jax.Array,
    mask_BxT: jax.Array,
    traj_id_B: jax.Array,
    turn_index_B: jax.Array,
    state: LossState,
    sums: EntropySums,
) -> tuple[jax.Array, Metrics]:
    """-lambda * (L_H - beta_k * L_smooth) of EPO Eq. 6 and its parts."""
    aggregation = ENTROPY_AGGREGATIONS[settings.entropy_agg]
    entropy_loss = aggregate_loss(entropy_BxT, mask_BxT, aggregation, traj_id_B)
    history = state.entropy_history
    if settings.epo_mode == "paper":
        reference = entropy_history_reference(history)
        # W_0 is empty: no penalty at step 0 (Eq. 4).
        active = (history.num_steps > 0).astype(jnp.float32)
        penalty_BxT = settings.alpha * active * smoothing_penalty(
            entropy_BxT, reference, settings.kappa_l, settings.kappa_r
        )
    else:
        reference_M = entropy_history_turn_reference(history, sums)
        reference_B = reference_M[jnp.clip(turn_index_B, 0, settings.max_turns - 1)]
        reference = masked_mean(jnp.broadcast_to(reference_B[:, None], mask_BxT.shape), mask_BxT)
        row_valid_B = jnp.sum(mask_BxT, axis=-1) > 0
        # The official code smooths only micro-batches holding a late turn.
        active = jnp.any((turn_index_B >= settings.code_turn_gate) & row_valid_B).astype(jnp.float32)
        penalty_BxT = active * code_smoothing_penalty(
            entropy_BxT, reference_B[:, None], settings.kappa_l, settings.kappa_r, settings.alpha
        )
    if settings.beta_schedule == "constant":
        beta = jnp.ones((), jnp.float32)
    elif settings.epo_mode == "paper":
        beta = phase_weight(state.step, settings.total_steps, settings.gamma)
    else:
        beta = code_phase_weight(state.step, settings.code_total_epochs, settings.gamma)
    if settings.smoothing:
        smooth_loss = aggregate_loss(penalty_BxT, mask_BxT, aggregation, traj_id_B)
        smooth_fraction = masked_mean((penalty_BxT > 0).astype(jnp.float32), mask_BxT)
    else:
        smooth_loss = jnp.zeros((), jnp.float32)
        smooth_fraction = jnp.zeros((), jnp.float32)
    term = -settings.lam * (entropy_loss - beta * smooth_loss)
    return term, {
        "entropy_loss": entropy_loss,
        "smooth_penalty": smooth_loss,
        "smooth_fraction": smooth_fraction,
        "beta": beta,
        "entropy_reference": reference,
    }


def _masked_extreme(values_BxT: jax.Array, mask_BxT: jax.Array, reduce: Callable, fill: float) -> jax.Array:
    """min / max of the valid entries; 0 when no entry is valid."""
    valid_BxT = mask_BxT > 0
    return jnp.where(jnp.any(valid_BxT), reduce(jnp.where(valid_BxT, values_BxT, fill)), 0.0)


def _policy_loss(
    settings: LossSettings,
    logprobs_BxT: jax.Array,
    old_logprobs_BxT: jax.Array,
    advantages_BxT: jax.Array,
    entropy_BxT: jax.Array,
    mask_BxT: jax.Array,
    traj_id_B: jax.Array,
    turn_index_B: jax.Array,
    state: LossState,
) -> tuple[PolicyLoss, Metrics]:
    """L_MT (dual-clip PPO) with the per-token reshaping of aepo, clip_cov, kl_cov or top_entropy,
    and the metrics of ENTROPY_CONTROL_METRICS (0 for the controls not in use)."""
    control = settings.entropy_control
    metrics: Metrics = {name: jnp.zeros((), jnp.float32) for name in ENTROPY_CONTROL_METRICS}
    if control == "aepo":
        shaped = entropy_aware_advantages(advantages_BxT, entropy_BxT, mask_BxT, settings.aepo_entropy_adv_coef)
        advantages_BxT = shaped.advantages_BxT
        metrics["aepo_adv_scale_min"] = _masked_extreme(shaped.scale_BxT, mask_BxT, jnp.min, jnp.inf)
        metrics["aepo_adv_scale_max"] = _masked_extreme(shaped.scale_BxT, mask_BxT, jnp.max, -jnp.inf)
    terms = ppo_token_losses(
        logprobs_BxT, old_logprobs_BxT, advantages_BxT,
        clip_low=settings.clip_low, clip_high=settings.clip_high, dual_clip=settings.dual_clip,
        balanced_upper_clip=control == "aepo",
    )
    if control == "aepo":
        # With A > 0 the ratio clip is active exactly above 1 + clip_high: the tokens that keep
        # their gradient through the balanced bound.
        upper_BxT = ((terms.clipped_BxT > 0) & (advantages_BxT > 0)).astype(jnp.float32)
        metrics["aepo_upper_clipfrac"] = masked_mean(upper_BxT, mask_BxT)
    elif control == "clip_cov":
        priority_BxT = token_priorities(settings.seed, state.step, traj_id_B, turn_index_B, mask_BxT.shape[1])
        clip_cov = clip_cov_token_losses(
            terms, advantages_BxT, logprobs_BxT, mask_BxT, priority_BxT,
            ratio=settings.clip_cov_ratio, lower=settings.clip_cov_lb, upper=settings.clip_cov_ub,
        )
        terms = terms._replace(loss_BxT=clip_cov.loss_BxT)
        metrics["cov_candidate_fraction"] = masked_mean(clip_cov.candidates_BxT, mask_BxT)
        metrics["cov_selected_fraction"] = masked_mean(clip_cov.selected_BxT, mask_BxT)
    elif control == "kl_cov":
        kl_cov = kl_cov_token_losses(
            logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT,
            ratio=settings.kl_cov_ratio, coef=settings.kl_cov_coef,
        )
        # KL-Cov has no ratio clip: no token is clipped.
        no_clip_BxT = jnp.zeros_like(terms.clipped_BxT)
        terms = terms._replace(loss_BxT=kl_cov.loss_BxT, clipped_BxT=no_clip_BxT, lower_clipped_BxT=no_clip_BxT)
        metrics["cov_selected_fraction"] = masked_mean(kl_cov.selected_BxT, mask_BxT)
        metrics["kl_cov_penalty"] = aggregate_loss(kl_cov.penalty_BxT, mask_BxT, settings.loss_agg, traj_id_B)
    elif control == "top_entropy":
        selection = top_entropy_selection(entropy_BxT, mask_BxT, settings.top_entropy_fraction)
        terms = terms._replace(loss_BxT=jnp.where(selection.keep_BxT > 0, terms.loss_BxT, 0.0))
        metrics["top_entropy_kept_fraction"] = masked_mean(selection.keep_BxT, mask_BxT)
        metrics["top_entropy_threshold"] = selection.threshold
    return summarize_policy_terms(terms, mask_BxT, settings.loss_agg, traj_id_B), metrics


def make_loss_fn(
    config: ml_collections.ConfigDict, forward_fn: ForwardFn
) -> Callable[[Any, Mapping[str, jax.Array], LossState], tuple[jax.Array, Metrics]]:
    """Builds `loss_fn(params, batch, state) -> (loss, metrics)` for `jax.value_and_grad(has_aux=True)`.

    Config values are read and validated once here (`LossSettings.from_config`), so the returned
    function is pure in (params, batch, state) and jittable.

    forward_fn(params, batch) must return "logprobs" [B, T] and "entropy" [B, T] (e.g. from
    `logprobs_and_entropy`) and, for a PPO critic, "values" [B, T]. batch holds
    "response_mask" [B, T], "old_logprobs" [B, T], "advantages" [B, T], "turn_index" [B] int32,
    "traj_id" [B] int32, "ref_logprobs" [B, T] when algo.use_kl_loss, "returns" and "old_values"
    [B, T] when forward_fn returns values, plus whatever forward_fn reads.

    The loss is L_MT (dual-clip PPO, aggregated with algo.loss_agg; reshaped per token under
    aepo / clip_cov / kl_cov / top_entropy) + the entropy term of algo.entropy_control (bonus, epo)
    + kl_coef * KL (algo.kl_estimator, algo.loss_agg) + value_coef * L_V.

    Metrics (float32 scalars unless noted): loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl,
    entropy (token-mean H), entropy_loss (the aggregated entropy of the entropy term),
    smooth_penalty (L_smooth), smooth_fraction (tokens penalised), beta, entropy_reference
    (Hbar_W; code mode: token mean of the per-turn references), kl_loss, value_loss, vf_clipfrac,
    and for the history update after the step (`loss_state_update`): entropy_sum, token_count,
    turn_entropy_sum [epo.max_turns], turn_token_count [epo.max_turns]. The entropy controls add
    aepo_upper_clipfrac (tokens above 1 + clip_high with A > 0, which keep their gradient),
    aepo_adv_scale_min / _max (range of 1 + a z(H)), cov_candidate_fraction (Clip-Cov: tokens with
    lb < Cov < ub not already clipped), cov_selected_fraction (Clip-Cov: gradients removed; KL-Cov:
    tokens penalised), kl_cov_penalty (the aggregated coef |log pi - log pi_old| term),
    top_entropy_kept_fraction and top_entropy_threshold (smallest entropy kept). Under kl_cov,
    pg_clipfrac and pg_clipfrac_lower are 0 (no clip). Terms a configuration does not use report 0.
    """
    settings = LossSettings.from_config(config)

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], state: LossState) -> tuple[jax.Array, Metrics]:
        outputs = forward_fn(params, batch)
        logprobs_BxT = outputs["logprobs"]
        entropy_BxT = outputs["entropy"]
        mask_BxT = _require(batch, "response_mask", "every loss term is masked").astype(jnp.float32)
        old_logprobs_BxT = _require(batch, "old_logprobs", "the PPO ratio needs the behaviour policy")
        advantages_BxT = _require(batch, "advantages", "the PPO surrogate needs advantages")
        traj_id_B = _require(batch, "traj_id", "losses aggregate per trajectory")
        turn_index_B = _require(batch, "turn_index", "the entropy history is kept per turn index")
        chex.assert_equal_shape([logprobs_BxT, entropy_BxT, mask_BxT, old_logprobs_BxT, advantages_BxT])
        chex.assert_shape([traj_id_B, turn_index_B], (mask_BxT.shape[0],))

        policy, control_metrics = _policy_loss(
            settings, logprobs_BxT, old_logprobs_BxT, advantages_BxT, entropy_BxT, mask_BxT,
            traj_id_B, turn_index_B, state,
        )
        sums = entropy_sums(entropy_BxT, mask_BxT, turn_index_B, settings.max_turns)
        zero = jnp.zeros((), jnp.float32)
        metrics: Metrics = {
            "pg_loss": policy.loss,
            "pg_clipfrac": policy.clipfrac,
            "pg_clipfrac_lower": policy.clipfrac_lower,
            "ppo_kl": policy.ppo_kl,
            "entropy": masked_mean(jax.lax.stop_gradient(entropy_BxT), mask_BxT),
            "entropy_loss": zero,
            "smooth_penalty": zero,
            "smooth_fraction": zero,
            "beta": zero,
            "entropy_reference": zero,
            "kl_loss": zero,
            "value_loss": zero,
            "vf_clipfrac": zero,
            "entropy_sum": sums.entropy_sum,
            "token_count": sums.token_count,
            "turn_entropy_sum": sums.turn_entropy_sum_M,
            "turn_token_count": sums.turn_token_count_M,
            **control_metrics,
        }
        loss = policy.loss

        if settings.entropy_control == "bonus":
            token_mean_entropy = aggregate_loss(entropy_BxT, mask_BxT, "token-mean")
            loss = loss - settings.entropy_coef * token_mean_entropy
            metrics["entropy_loss"] = token_mean_entropy
        elif settings.entropy_control == "epo":
            term, epo_metrics = _epo_entropy_term(
                settings, entropy_BxT, mask_BxT, traj_id_B, turn_index_B, state, sums
            )
            loss = loss + term
            metrics.update(epo_metrics)

        if settings.use_kl_loss:
            ref_logprobs_BxT = _require(batch, "ref_logprobs", "algo.use_kl_loss=True (or set it to False)")
            kl_BxT = kl_penalty(logprobs_BxT, ref_logprobs_BxT, settings.kl_estimator)
            kl = aggregate_loss(kl_BxT, mask_BxT, settings.loss_agg, traj_id_B)
            loss = loss + settings.kl_coef * kl
            metrics["kl_loss"] = kl

        if "values" in outputs:
            returns_BxT = _require(batch, "returns", "forward_fn returns values (the PPO critic)")
            old_values_BxT = _require(batch, "old_values", "forward_fn returns values (the PPO critic)")
            critic_loss, vf_clipfrac = value_loss(
                outputs["values"], old_values_BxT, returns_BxT, mask_BxT,
                clip=settings.value_clip, loss_agg=settings.loss_agg, traj_id_B=traj_id_B,
            )
            loss = loss + settings.value_coef * critic_loss
            metrics["value_loss"] = critic_loss
            metrics["vf_clipfrac"] = vf_clipfrac

        metrics["loss"] = loss
        return loss, metrics

    return loss_fn
