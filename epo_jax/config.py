"""Validation of a run config (configs/base.py) before anything runs.

`validate(config)` raises `ConfigError` naming the field, the bad value and what is allowed,
so that a typo on the command line fails in the first second rather than an hour into a run.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable

import ml_collections

ADVANTAGES = ("ppo_gae", "grpo", "drgrpo", "rloo", "gigpo")
ENTROPY_CONTROLS = ("none", "bonus", "epo", "aepo", "clip_cov", "kl_cov", "top_entropy")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "mse", "low_var_kl")
ENV_NAMES = ("scienceworld", "alfworld", "toy_keydoor")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config field '{field}' is missing; start from configs/base.py:get_config()")
        node = node[part]
    return node


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field '{field}' = {value!r} is invalid: expected {allowed} "
                      f"(set it with --config.{field}=...)")


def _choice(config, field: str, choices: Iterable[str]) -> None:
    value = _get(config, field)
    if value not in choices:
        _fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def _number(config, field: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, integer: bool = False) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        _fail(field, value, "a finite integer" if integer else "a finite number")
    if integer and not isinstance(value, int):
        _fail(field, value, "an integer")
    if low is not None and (value <= low if low_open else value < low):
        _fail(field, value, f"a number {'>' if low_open else '>='} {low}"
              + (f" and <= {high}" if high is not None else ""))
    if high is not None and value > high:
        _fail(field, value, f"a number <= {high}" + (f" and >= {low}" if low is not None else ""))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field of a run config; returns it unchanged or raises ConfigError."""
    _number(config, "seed", low=0, integer=True)

    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.param_dtype", DTYPES)
    path = _get(config, "model.path")
    if path and not os.path.isdir(path):
        _fail("model.path", path, "an existing Hugging Face checkpoint folder (config.json + *.safetensors), "
              "or '' for the embedded SmolLM2-135M-Instruct")
    _number(config, "model.logprob_chunk_size", low=1, integer=True)

    _number(config, "rollout.max_prompt_len", low=1, integer=True)
    _number(config, "rollout.max_response_len", low=1, integer=True)
    _number(config, "rollout.temperature", low=0.0)
    _number(config, "rollout.top_p", low=0.0, low_open=True, high=1.0)
    _number(config, "rollout.top_k", low=0, integer=True)
    buckets = tuple(_get(config, "rollout.prompt_buckets"))
    if not buckets or list(buckets) != sorted(buckets) or buckets[-1] < config.rollout.max_prompt_len:
        _fail("rollout.prompt_buckets", buckets,
              f"increasing lengths whose last is >= rollout.max_prompt_len ({config.rollout.max_prompt_len})")
    for field in ("rollout.branching", "rollout.branch_premonitor", "rollout.branch_fill"):
        if not isinstance(_get(config, field), bool):
            _fail(field, _get(config, field), "True or False")
    _number(config, "rollout.branch_initial_fraction", low=0.0, low_open=True, high=1.0)
    _number(config, "rollout.branch_beta", low=0.0)
    _number(config, "rollout.branch_monitor_turns", low=2, integer=True)
    _number(config, "rollout.branch_entropy_tokens", low=1, integer=True)
    _number(config, "rollout.branch_w", low=0.0)
    _number(config, "rollout.branch_decay", low=0.0)
    _number(config, "rollout.branch_threshold", low=0.0, low_open=True, high=1.0)

    _choice(config, "env.name", ENV_NAMES)
    _number(config, "env.num_groups", low=1, integer=True)
    _number(config, "env.group_size", low=1, integer=True)
    _number(config, "env.max_turns", low=1, integer=True)
    _choice(config, "env.reward", ("sparse", "dense"))
    _number(config, "env.invalid_action_penalty", high=0.0)
    _number(config, "env.history_length", low=0, integer=True)
    _number(config, "env.step_timeout_s", low=0.0, low_open=True)
    if config.rollout.branching:
        if config.env.group_size < 2:
            _fail("env.group_size", config.env.group_size,
                  ">= 2 with rollout.branching=True: a group's environments are split into rollouts "
                  "from the start and branches")
        if config.rollout.branch_premonitor and config.rollout.branch_monitor_turns > config.env.max_turns:
            _fail("rollout.branch_monitor_turns", config.rollout.branch_monitor_turns,
                  f"an integer <= env.max_turns ({config.env.max_turns}): the probe rollout cannot play more turns")

    _choice(config, "algo.advantage", ADVANTAGES)
    _choice(config, "algo.entropy_control", ENTROPY_CONTROLS)
    _choice(config, "algo.loss_agg", LOSS_AGGS)
    _choice(config, "algo.kl_estimator", KL_ESTIMATORS)
    _choice(config, "algo.critic", ("value_head", "separate"))
    _number(config, "algo.clip_low", low=0.0, low_open=True, high=1.0)
    _number(config, "algo.clip_high", low=0.0, low_open=True)
    _number(config, "algo.dual_clip", low=1.0, low_open=True)
    _number(config, "algo.gamma", low=0.0, high=1.0)
    _number(config, "algo.gae_lambda", low=0.0, high=1.0)
    _number(config, "algo.kl_coef", low=0.0)
    _number(config, "algo.entropy_coef", low=0.0)
    _number(config, "algo.aepo_entropy_adv_coef", low=0.0)
    _number(config, "algo.clip_cov_ratio", low=0.0, low_open=True, high=1.0)
    _number(config, "algo.clip_cov_lb")
    _number(config, "algo.clip_cov_ub")
    if config.algo.clip_cov_ub <= config.algo.clip_cov_lb:
        _fail("algo.clip_cov_ub", config.algo.clip_cov_ub,
              f"a number > algo.clip_cov_lb ({config.algo.clip_cov_lb}): Clip-Cov's candidates have lb < Cov < ub")
    _number(config, "algo.kl_cov_ratio", low=0.0, low_open=True, high=1.0)
    _number(config, "algo.kl_cov_coef", low=0.0)
    _number(config, "algo.top_entropy_fraction", low=0.0, low_open=True, high=1.0)
    _number(config, "algo.gigpo_omega", low=0.0)
    _number(config, "algo.gigpo_gamma", low=0.0, high=1.0)
    _number(config, "algo.ppo_epochs", low=1, integer=True)
    _number(config, "algo.num_minibatches", low=1, integer=True)
    _number(config, "algo.micro_batch_size", low=1, integer=True)
    if config.algo.advantage in ("grpo", "drgrpo", "rloo", "gigpo") and config.env.group_size < 2:
        _fail("env.group_size", config.env.group_size,
              f">= 2, since algo.advantage={config.algo.advantage!r} compares episodes within a group")

    _choice(config, "epo.mode", ("paper", "code"))
    _choice(config, "epo.beta_schedule", ("phase", "constant"))
    _choice(config, "epo.entropy_agg", ("trajectory", "token"))
    _number(config, "epo.lam", low=0.0)
    _number(config, "epo.kappa_l", low=0.0)
    _number(config, "epo.kappa_r", low=0.0)
    if config.epo.kappa_r < config.epo.kappa_l:
        _fail("epo.kappa_r", config.epo.kappa_r,
              f"a number >= epo.kappa_l ({config.epo.kappa_l}): the corridor is [kappa_l, kappa_r] x reference")
    _number(config, "epo.gamma", low=0.0)
    _number(config, "epo.alpha", low=0.0)
    _number(config, "epo.code_turn_gate", low=0, integer=True)
    _number(config, "epo.code_total_epochs", low=2, integer=True)
    _number(config, "epo.max_turns", low=1, integer=True)
    if config.epo.max_turns < config.env.max_turns:
        _fail("epo.max_turns", config.epo.max_turns,
              f"an integer >= env.max_turns ({config.env.max_turns}): the per-turn entropy history needs a slot per turn")

    _number(config, "optim.lr", low=0.0, low_open=True)
    _number(config, "optim.critic_lr", low=0.0, low_open=True)
    _number(config, "optim.weight_decay", low=0.0)
    _number(config, "optim.warmup_ratio", low=0.0, high=1.0)
    _number(config, "optim.min_lr_ratio", low=0.0, high=1.0)
    _number(config, "optim.grad_clip", low=0.0, low_open=True)
    _number(config, "optim.b1", low=0.0, high=1.0)
    _number(config, "optim.b2", low=0.0, high=1.0)
    _number(config, "optim.eps", low=0.0, low_open=True)

    _number(config, "train.total_steps", low=1, integer=True)

    for axis in ("data", "fsdp", "tensor"):
        value = _get(config, f"mesh.{axis}")
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            _fail(f"mesh.{axis}", value, "a positive integer, or -1 for all remaining devices")
    if sum(_get(config, f"mesh.{a}") == -1 for a in ("data", "fsdp", "tensor")) > 1:
        _fail("mesh", {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}, "at most one axis set to -1")

    if config.distributed.initialize and config.distributed.coordinator_address:
        _number(config, "distributed.num_processes", low=1, integer=True)
        _number(config, "distributed.process_id", low=0, integer=True)
        if config.distributed.process_id >= config.distributed.num_processes:
            _fail("distributed.process_id", config.distributed.process_id,
                  f"an integer < distributed.num_processes ({config.distributed.num_processes})")

    _number(config, "checkpoint.every_steps", low=1, integer=True)
    _number(config, "checkpoint.keep", low=1, integer=True)
    _number(config, "eval.every_steps", low=0, integer=True)
    _number(config, "eval.num_episodes", low=0, integer=True)
    _number(config, "eval.temperature", low=0.0)
    _number(config, "logging.every_steps", low=1, integer=True)
    if not _get(config, "workdir"):
        _fail("workdir", config.workdir, "a non-empty directory path for checkpoints and metrics")
    return config
