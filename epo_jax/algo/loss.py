"""The full actor(-critic) objective as one pure, jittable loss function.

  L = L_MT + entropy term [+ kl_coef * KL] [+ value_coef * L_V]
with the entropy term chosen by `algo.entropy_control`:
  none:  0                                              (plain PPO / GRPO)
  bonus: -entropy_coef * token-mean H
  epo:   -lambda * (L_H - beta_k * L_smooth)            (EPO Eq. 6, docs/algorithms.md section 1 (e))
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
from epo_jax.algo.ppo import KL_ESTIMATORS, kl_penalty, ppo_policy_loss, value_loss

ENTROPY_CONTROLS = ("none", "bonus", "epo")
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

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossSettings":
        """Reads `config.algo`, `config.epo` and `config.train.total_steps` (configs/base.py)."""
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

    The loss is L_MT (dual-clip PPO, aggregated with algo.loss_agg) + the entropy term of
    algo.entropy_control + kl_coef * KL (algo.kl_estimator, algo.loss_agg) + value_coef * L_V.

    Metrics (float32 scalars unless noted): loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl,
    entropy (token-mean H), entropy_loss (the aggregated entropy of the entropy term),
    smooth_penalty (L_smooth), smooth_fraction (tokens penalised), beta, entropy_reference
    (Hbar_W; code mode: token mean of the per-turn references), kl_loss, value_loss, vf_clipfrac,
    and for the history update after the step (`loss_state_update`): entropy_sum, token_count,
    turn_entropy_sum [epo.max_turns], turn_token_count [epo.max_turns]. Terms a configuration
    does not use report 0.
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

        policy = ppo_policy_loss(
            logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT,
            clip_low=settings.clip_low, clip_high=settings.clip_high, dual_clip=settings.dual_clip,
            loss_agg=settings.loss_agg, traj_id_B=traj_id_B,
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
