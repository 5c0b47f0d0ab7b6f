"""Validation of a run config (configs/base.py) before anything runs.

`validate(config)` checks every field against one table of field rules (`FIELD_RULES`: type and
range, or the allowed values, which live in the module that owns them) and then the rules that
tie fields together (`CROSS_FIELD_RULES`). It raises `ConfigError` naming the field, the bad
value and what is allowed, so that a typo on the command line fails in the first second rather
than an hour into a run. `check_overrides` does the same for `--config.a.b=value` names before
the flags are applied: an unknown field is named with the nearest existing ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Callable, Iterator, Sequence

import ml_collections

from epo_jax import algo
from epo_jax.errors import ConfigError
from epo_jax.envs import ENV_NAMES
from epo_jax.models.config import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES, SAMPLER_DTYPES, SUPPORTED_DTYPES as PARAM_DTYPES
from epo_jax.models.lora import TARGETS as LORA_TARGETS
from epo_jax.rollout.agent_loop import ENGINES as ROLLOUT_ENGINES

__all__ = ["ConfigError", "FIELD_RULES", "CROSS_FIELD_RULES", "check_overrides", "validate", "field_names"]

# The largest learning rate accepted: AdamW steps are about lr per parameter, so anything near 1
# turns the policy into noise; the CPU presets use 1e-5 and the paper 3e-6 / 5e-6.
MAX_LR = 1.0


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field '{field}' = {value!r} is invalid: expected {allowed} "
                      f"(set it with --config.{field}=...)")


Check = Callable[[str, Any], None]


def choice(options: Sequence[Any]) -> Check:
    def check(field: str, value: Any) -> None:
        if isinstance(value, bool) or value not in options:
            _fail(field, value, "one of " + ", ".join(repr(o) for o in options))
    return check


def number(*, low: float | None = None, high: float | None = None, low_open: bool = False,
           integer: bool = False) -> Check:
    """A finite int or float (an int if `integer`) in [low, high] ((low, high] if low_open)."""
    kind = "an integer" if integer else "a finite number"
    bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + (
        [f"<= {high}"] if high is not None else [])
    allowed = kind + (" " + " and ".join(bounds) if bounds else "")

    def check(field: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(field, value, allowed)
        if integer and not isinstance(value, int):
            _fail(field, value, allowed)
        if low is not None and (value <= low if low_open else value < low):
            _fail(field, value, allowed)
        if high is not None and value > high:
            _fail(field, value, allowed)
    return check


def integer(*, low: int | None = None, high: int | None = None) -> Check:
    return number(low=low, high=high, integer=True)


def boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "True or False")


def text(*, non_empty: bool = False) -> Check:
    def check(field: str, value: Any) -> None:
        if not isinstance(value, str) or (non_empty and not value):
            _fail(field, value, "a non-empty string" if non_empty else "a string")
    return check


def sequence_of(item: type, *, non_empty: bool = False, increasing: bool = False) -> Check:
    """A tuple or list of `item`s (e.g. --config.rollout.prompt_buckets='(512, 1024)')."""
    name = {int: "integers", str: "strings"}[item]
    allowed = ("a non-empty " if non_empty else "a ") + ("tuple of increasing " if increasing else "tuple of ") + name

    def check(field: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or (non_empty and not value) or any(
                isinstance(v, bool) or not isinstance(v, item) for v in value):
            _fail(field, value, allowed)
        if increasing and list(value) != sorted(set(value)):
            _fail(field, value, allowed)
    return check


def subset_of(options: Sequence[str]) -> Check:
    """A non-empty tuple of distinct members of `options`."""
    allowed = "a non-empty tuple of distinct names among " + ", ".join(repr(o) for o in options)

    def check(field: str, value: Any) -> None:
        if (not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value)
                or any(not isinstance(v, str) or v not in options for v in value)):
            _fail(field, value, allowed)
    return check


def mesh_axis(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        _fail(field, value, "a positive integer, or -1 for all remaining devices")


def model_path(field: str, value: Any) -> None:
    text()(field, value)
    if value and not os.path.isdir(value):
        _fail(field, value, "an existing Hugging Face checkpoint folder (config.json + *.safetensors), "
              "or '' for the embedded SmolLM2-135M-Instruct")


def workdir(field: str, value: Any) -> None:
    text(non_empty=True)(field, value)
    if "://" in value:
        return  # gs:// and other remote folders are checked by the filesystem when written
    path = os.path.abspath(value)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        _fail(field, value, f"a directory path for checkpoints and metrics ({path} is a file)")


def fraction(*, low_open: bool = True) -> Check:
    return number(low=0.0, low_open=low_open, high=1.0)


NON_NEGATIVE = number(low=0.0)
POSITIVE = number(low=0.0, low_open=True)

# One rule per field of configs/base.py (tests check that every field has one).
FIELD_RULES: dict[str, Check] = {
    "seed": integer(low=0),
    "workdir": workdir,
    "model.path": model_path,
    "model.dtype": choice(COMPUTE_DTYPES),
    "model.param_dtype": choice(PARAM_DTYPES),
    "model.attention": choice(ATTENTION_IMPLEMENTATIONS),
    "model.remat": boolean,
    "model.logprob_chunk_size": integer(low=1),
    "model.init_from": model_path,
    "model.lora.rank": integer(low=0),
    "model.lora.alpha": POSITIVE,
    "model.lora.targets": subset_of(tuple(LORA_TARGETS)),
    "model.lora.base_dtype": choice(PARAM_DTYPES),
    "rollout.max_prompt_len": integer(low=1),
    "rollout.max_response_len": integer(low=1),
    "rollout.temperature": NON_NEGATIVE,
    "rollout.top_p": fraction(),
    "rollout.top_k": integer(low=0),
    "rollout.stop_strings": sequence_of(str),
    "rollout.prompt_buckets": sequence_of(int, non_empty=True, increasing=True),
    "rollout.dtype": choice(SAMPLER_DTYPES),
    "rollout.drift_every": integer(low=0),
    "rollout.engine": choice(ROLLOUT_ENGINES),
    "rollout.num_slots": integer(low=0),
    "rollout.chunk_len": integer(low=1),
    "rollout.branching": boolean,
    "rollout.branch_premonitor": boolean,
    "rollout.branch_initial_fraction": fraction(),
    "rollout.branch_beta": NON_NEGATIVE,
    "rollout.branch_monitor_turns": integer(low=2),
    "rollout.branch_entropy_tokens": integer(low=1),
    "rollout.branch_w": NON_NEGATIVE,
    "rollout.branch_decay": NON_NEGATIVE,
    "rollout.branch_threshold": fraction(),
    "rollout.branch_fill": boolean,
    "env.name": choice(ENV_NAMES),
    "env.num_groups": integer(low=1),
    "env.group_size": integer(low=1),
    "env.max_turns": integer(low=1),
    "env.train_split": text(non_empty=True),
    "env.eval_splits": sequence_of(str),
    "env.tasks": sequence_of(str),
    "env.simplification": text(),
    "env.reward": choice(("sparse", "dense")),
    "env.success_reward": NON_NEGATIVE,
    "env.invalid_action_penalty": number(high=0.0),
    "env.history_length": integer(low=0),
    "env.show_actions": boolean,
    "env.jvm_heap": text(non_empty=True),
    "env.step_timeout_s": POSITIVE,
    "env.data_dir": text(),
    "algo.advantage": choice(algo.ADVANTAGE_ESTIMATORS),
    "algo.entropy_control": choice(algo.ENTROPY_CONTROLS),
    "algo.clip_low": fraction(),
    "algo.clip_high": POSITIVE,
    "algo.dual_clip": number(low=1.0, low_open=True),
    "algo.loss_agg": choice(algo.LOSS_AGG_MODES),
    "algo.entropy_coef": NON_NEGATIVE,
    "algo.aepo_entropy_adv_coef": NON_NEGATIVE,
    "algo.clip_cov_ratio": fraction(),
    "algo.clip_cov_lb": number(),
    "algo.clip_cov_ub": number(),
    "algo.clip_cov_dual_clip": boolean,
    "algo.group_count": choice(algo.GROUP_COUNTS),
    "algo.gigpo_mode": choice(algo.GIGPO_MODES),
    "algo.gigpo_step_penalty": choice(algo.GIGPO_STEP_PENALTIES),
    "algo.kl_cov_ratio": fraction(),
    "algo.kl_cov_coef": NON_NEGATIVE,
    "algo.top_entropy_fraction": fraction(),
    "algo.gamma": fraction(low_open=False),
    "algo.gae_lambda": fraction(low_open=False),
    "algo.whiten_advantages": boolean,
    "algo.value_clip": POSITIVE,
    "algo.value_coef": NON_NEGATIVE,
    "algo.critic": choice(("value_head", "separate")),
    "algo.use_kl_loss": boolean,
    "algo.kl_coef": NON_NEGATIVE,
    "algo.kl_estimator": choice(algo.KL_ESTIMATORS),
    "algo.gigpo_omega": NON_NEGATIVE,
    "algo.gigpo_gamma": fraction(low_open=False),
    "algo.old_logprobs": choice(algo.OLD_LOGPROB_SOURCES),
    "algo.rollout_correction": choice(algo.ROLLOUT_CORRECTIONS),
    "algo.rollout_correction_level": choice(algo.ROLLOUT_CORRECTION_LEVELS),
    "algo.rollout_correction_cap": number(low=1.0, low_open=True),
    "algo.ppo_epochs": integer(low=1),
    "algo.num_minibatches": integer(low=1),
    "algo.micro_batch_size": integer(low=1),
    "algo.pack": boolean,
    "algo.pack_tokens": integer(low=0),
    "epo.mode": choice(algo.EPO_MODES),
    "epo.lam": NON_NEGATIVE,
    "epo.kappa_l": NON_NEGATIVE,
    "epo.kappa_r": NON_NEGATIVE,
    "epo.gamma": NON_NEGATIVE,
    "epo.alpha": NON_NEGATIVE,
    "epo.smoothing": boolean,
    "epo.beta_schedule": choice(algo.BETA_SCHEDULES),
    "epo.entropy_agg": choice(tuple(algo.ENTROPY_AGGREGATIONS)),
    "epo.code_turn_gate": integer(low=0),
    "epo.code_total_epochs": integer(low=2),
    "epo.code_decay": NON_NEGATIVE,
    "epo.code_mask_mode": choice(algo.CODE_MASK_MODES),
    "epo.max_turns": integer(low=1),
    "optim.lr": number(low=0.0, low_open=True, high=MAX_LR),
    "optim.critic_lr": number(low=0.0, low_open=True, high=MAX_LR),
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_ratio": fraction(low_open=False),
    "optim.min_lr_ratio": fraction(low_open=False),
    "optim.grad_clip": POSITIVE,
    "optim.b1": fraction(low_open=False),
    "optim.b2": fraction(low_open=False),
    "optim.eps": POSITIVE,
    "train.total_steps": integer(low=1),
    "train.max_skipped_steps": integer(low=1),
    "sft.cold_start": boolean,
    "sft.dir": text(),
    "sft.episodes": integer(low=1),
    "sft.epochs": integer(low=1),
    "sft.batch_size": integer(low=1),
    "sft.lr": number(low=0.0, low_open=True, high=MAX_LR),
    "sft.checkpoint_every_steps": integer(low=1),
    "sft.eval_episodes": integer(low=0),
    "mesh.data": mesh_axis,
    "mesh.fsdp": mesh_axis,
    "mesh.tensor": mesh_axis,
    "distributed.initialize": boolean,
    "distributed.coordinator_address": text(),
    "distributed.num_processes": integer(low=0),
    "distributed.process_id": integer(low=-1),
    "checkpoint.every_steps": integer(low=1),
    "checkpoint.keep": integer(low=1),
    "checkpoint.async_save": boolean,
    "eval.every_steps": integer(low=0),
    "eval.num_episodes": integer(low=-1),  # the panel size per split; -1 (or more than the split) = all
    "eval.temperature": NON_NEGATIVE,
    "logging.every_steps": integer(low=1),
    "logging.tensorboard": boolean,
    "logging.jsonl": boolean,
    "logging.wandb": boolean,
    "logging.wandb_project": text(non_empty=True),
    "logging.wandb_entity": text(),
    "logging.wandb_run_name": text(),
    "logging.wandb_tags": sequence_of(str),
}


@dataclasses.dataclass(frozen=True)
class CrossFieldRule:
    """`holds(config)` must be true, else `field` is reported with `allowed(config)`."""

    field: str
    holds: Callable[[ml_collections.ConfigDict], bool]
    allowed: Callable[[ml_collections.ConfigDict], str]


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule("rollout.prompt_buckets",
                   lambda c: c.rollout.prompt_buckets[-1] >= c.rollout.max_prompt_len,
                   lambda c: f"increasing lengths whose last is >= rollout.max_prompt_len ({c.rollout.max_prompt_len})"),
    CrossFieldRule("env.group_size", lambda c: not c.rollout.branching or c.env.group_size >= 2,
                   lambda c: ">= 2 with rollout.branching=True: a group's environments are split into rollouts "
                             "from the start and branches"),
    CrossFieldRule("rollout.branch_monitor_turns",
                   lambda c: not (c.rollout.branching and c.rollout.branch_premonitor)
                   or c.rollout.branch_monitor_turns <= c.env.max_turns,
                   lambda c: f"an integer <= env.max_turns ({c.env.max_turns}): the probe rollout cannot play "
                             "more turns"),
    CrossFieldRule("env.group_size", lambda c: c.algo.advantage == "ppo_gae" or c.env.group_size >= 2,
                   lambda c: f">= 2, since algo.advantage={c.algo.advantage!r} compares episodes within a group"),
    CrossFieldRule("algo.clip_cov_ub", lambda c: c.algo.clip_cov_ub > c.algo.clip_cov_lb,
                   lambda c: f"a number > algo.clip_cov_lb ({c.algo.clip_cov_lb}): Clip-Cov's candidates have "
                             "lb < Cov < ub"),
    CrossFieldRule("algo.pack_tokens",
                   lambda c: c.algo.pack_tokens == 0
                   or c.algo.pack_tokens >= c.rollout.max_prompt_len + c.rollout.max_response_len,
                   lambda c: "0 (the longest turn sample) or an integer >= rollout.max_prompt_len + "
                             f"rollout.max_response_len ({c.rollout.max_prompt_len + c.rollout.max_response_len}): "
                             "every turn sample must fit a packed row"),
    CrossFieldRule("algo.pack", lambda c: not c.algo.pack or c.model.attention != "cudnn",
                   lambda c: "False with model.attention='cudnn', which takes one run of tokens per row "
                             "(use model.attention='xla', or 'splash' on TPU)"),
    CrossFieldRule("algo.old_logprobs",
                   lambda c: c.algo.rollout_correction != "tis" or c.algo.old_logprobs == "trainer",
                   lambda c: "'trainer' with algo.rollout_correction='tis': TIS weighs the surrogate by pi_old / "
                             "pi_sampler with the trainer's pi_old (with 'sampler' the PPO ratio pi / pi_sampler "
                             "holds that mismatch already); or use algo.rollout_correction='mis'"),
    CrossFieldRule("epo.kappa_r", lambda c: c.epo.kappa_r >= c.epo.kappa_l,
                   lambda c: f"a number >= epo.kappa_l ({c.epo.kappa_l}): the corridor is [kappa_l, kappa_r] x "
                             "reference"),
    CrossFieldRule("epo.max_turns", lambda c: c.epo.max_turns >= c.env.max_turns,
                   lambda c: f"an integer >= env.max_turns ({c.env.max_turns}): the per-turn entropy history needs "
                             "a slot per turn"),
    CrossFieldRule("train.total_steps",
                   lambda c: not (c.algo.entropy_control == "epo" and c.epo.mode == "paper"
                                  and c.epo.beta_schedule == "phase") or c.train.total_steps >= 2,
                   lambda c: "an integer >= 2 with EPO's phase weight (beta_k = 1 + exp(-gamma k / floor(K/2)) "
                             "needs floor(K/2) >= 1)"),
    CrossFieldRule("mesh", lambda c: sum(c.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1,
                   lambda c: "at most one axis set to -1 among mesh.data, mesh.fsdp, mesh.tensor"),
    CrossFieldRule("distributed.num_processes",
                   lambda c: not (c.distributed.initialize and c.distributed.coordinator_address)
                   or c.distributed.num_processes >= 1,
                   lambda c: "an integer >= 1 with distributed.coordinator_address set"),
    CrossFieldRule("distributed.process_id",
                   lambda c: not (c.distributed.initialize and c.distributed.coordinator_address)
                   or 0 <= c.distributed.process_id < c.distributed.num_processes,
                   lambda c: f"an integer in [0, distributed.num_processes = {c.distributed.num_processes}) with "
                             "distributed.coordinator_address set"),
)


def _leaves(node: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in sorted(node.keys()):
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def field_names(config: ml_collections.ConfigDict) -> list[str]:
    """Every leaf field of a config, as dotted names."""
    return [name for name, _ in _leaves(config)]


def _value(config: ml_collections.ConfigDict, name: str) -> Any:
    node: Any = config
    for part in name.split("."):
        node = node[part]
    return node


def nearest_fields(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Existing field names that look like `name` (whole path, or its last part)."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    last = name.rsplit(".", 1)[-1]
    by_last = [f for f in names if difflib.SequenceMatcher(None, last, f.rsplit(".", 1)[-1]).ratio() >= 0.75]
    return list(dict.fromkeys(close + by_last))[:n]


def unknown_field_error(name: str, names: Sequence[str]) -> ConfigError:
    near = nearest_fields(name, names)
    hint = f"; did you mean {', '.join(repr(f) for f in near)}?" if near else "; configs/base.py lists every field"
    return ConfigError(f"config field '{name}' does not exist{hint}")


def check_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Each `--config.<name>` override names an existing field of `config` (else ConfigError)."""
    names = field_names(config)
    groups = {name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)}
    for name in overrides:
        if name not in names and name not in groups:
            raise unknown_field_error(name, names)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field of a run config; returns it unchanged or raises ConfigError."""
    present = dict(_leaves(config))
    for name, rule in FIELD_RULES.items():
        if name not in present:
            raise ConfigError(f"config field '{name}' is missing; start from configs/base.py:get_config()")
        rule(name, present[name])
    for name in present:
        if name not in FIELD_RULES:
            raise unknown_field_error(name, list(FIELD_RULES))
    for rule in CROSS_FIELD_RULES:
        if not rule.holds(config):
            value = config.mesh.to_dict() if rule.field == "mesh" else _value(config, rule.field)
            _fail(rule.field, value, rule.allowed(config))
    return config


def _config_file_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path[:arg]` -> the file's get_config(arg), as ml_collections' --config flag loads it."""
    import runpy
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist (--config=configs/scienceworld.py, for example)")
    get_config = runpy.run_path(path).get("get_config")
    if get_config is None:
        raise ConfigError(f"config file '{path}' has no get_config(); start from configs/base.py")
    try:
        return get_config(arg) if arg else get_config()
    except ValueError as error:  # the file's own check of what follows the colon
        raise ConfigError(f"--config={spec}: {error}") from error


_SCALAR_PARSERS: dict[type, tuple[str, Callable[[str], Any]]] = {
    int: ("an integer", int),
    float: ("a number", float),
    bool: ("True or False", lambda v: {"true": True, "false": False, "1": True, "0": False}[v.lower()]),
}


def _overrides(argv: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(field name, value text or None) of every --config.<name>[=value] argument."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--config."):
            continue
        name, sep, value = arg[len("--config."):].partition("=")
        if not sep:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        yield name, value


def check_command_line(argv: Sequence[str]) -> None:
    """Before absl applies `--config.<name>=value` overrides: every name is a field of the config
    file's config, and every scalar value parses as its field's type (else ConfigError)."""
    spec = _config_file_spec(argv)
    if spec is None:
        return  # absl reports the missing required --config flag itself
    config = load_config_file(spec)
    overrides = list(_overrides(argv))
    check_overrides(config, [name for name, _ in overrides])
    leaves = dict(_leaves(config))
    for name, value in overrides:
        kind = type(leaves.get(name))
        if value is None or kind not in _SCALAR_PARSERS:
            continue
        wanted, parse = _SCALAR_PARSERS[kind]
        try:
            parse(value)
        except (ValueError, KeyError):
            _fail(name, value, wanted)


def flag_error(error: Exception) -> ConfigError:
    """absl's flag parsing error as a one-line ConfigError."""
    return ConfigError(str(error).splitlines()[0])
