"""The configs hold the paper's defaults and every bad value fails with the field's name."""
import pathlib
import runpy
import subprocess
import sys

import pytest

from epo_jax.config import CROSS_FIELD_RULES, FIELD_RULES, ConfigError, field_names, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name: str, arg: str = ""):
    return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"](arg)


@pytest.mark.parametrize("name, arg", [
    ("base", ""), ("scienceworld", ""), ("alfworld", ""),
    *((env, preset) for env in ("scienceworld", "alfworld") for preset in ("paper", "reference")),
])
def test_shipped_configs_validate(name, arg):
    validate(load(name, arg))


def test_paper_defaults():
    """EPO paper, App. B (spec section 1)."""
    sw, alf = load("scienceworld", "paper"), load("alfworld", "paper")
    for c in (sw, alf):
        assert (c.epo.lam, c.epo.kappa_l, c.epo.kappa_r, c.epo.gamma) == (0.001, 0.0, 2.0, 3.0)
        assert (c.algo.clip_low, c.algo.dual_clip, c.algo.kl_coef) == (0.2, 3.0, 0.01)
        assert c.algo.kl_estimator == "low_var_kl"
        assert (c.optim.warmup_ratio, c.optim.min_lr_ratio, c.optim.grad_clip) == (0.1, 0.2, 1.0)
        assert (c.optim.weight_decay, c.optim.lr) == (0.01, 3e-6)
        assert (c.env.num_groups, c.env.group_size) == (16, 8)
        assert (c.rollout.max_prompt_len, c.rollout.max_response_len) == (2048, 512)
        assert (c.rollout.temperature, c.eval.temperature) == (1.0, 0.4)
        assert c.env.invalid_action_penalty == -0.1
        assert c.epo.mode == "paper" and c.algo.ppo_epochs == 1
    assert (sw.epo.alpha, sw.train.total_steps, sw.env.max_turns) == (0.05, 125, 30)
    assert (alf.epo.alpha, alf.train.total_steps, alf.env.max_turns) == (0.1, 150, 50)


@pytest.mark.parametrize("env, seed, lr, alpha, turns, steps, minibatches, micro_batch", [
    ("scienceworld", 0, 3e-6, 0.05, 30, 125, 2, 64),
    ("alfworld", 1, 5e-6, 0.1, 50, 150, 1, 256),
])
def test_reference_presets_hold_the_released_scripts_settings(env, seed, lr, alpha, turns, steps, minibatches,
                                                              micro_batch):
    """github WujiangXu/EPO: the README's PPO commands through examples/general_running_server.sh
    (8 GPUs, ppo_mini_batch_size 64 / 256 and ppo_micro_batch_size_per_gpu 8 / 32 over 16 x 8
    environments), verl's defaults, and the 6144-token prompt budget of the completed runs."""
    c = load(env, "reference")
    assert (c.seed, c.optim.lr, c.optim.critic_lr, c.epo.alpha) == (seed, lr, lr, alpha)
    assert (c.env.max_turns, c.train.total_steps) == (turns, steps)
    assert (c.epo.mode, c.epo.entropy_agg, c.epo.code_turn_gate, c.epo.code_total_epochs) == ("code", "token", 25, 150)
    assert (c.epo.lam, c.epo.kappa_l, c.epo.kappa_r, c.epo.smoothing) == (0.001, 0.0, 2.0, True)
    assert (c.rollout.max_prompt_len, c.rollout.prompt_buckets[-1], c.rollout.max_response_len) == (6144, 6144, 512)
    assert (c.env.num_groups * c.env.group_size, c.env.group_size) == (128, 1)
    assert (c.algo.num_minibatches, c.algo.micro_batch_size, c.algo.critic) == (minibatches, micro_batch, "separate")
    assert (c.algo.kl_coef, c.algo.kl_estimator, c.algo.clip_low, c.algo.dual_clip) == (0.01, "low_var_kl", 0.2, 3.0)
    assert (c.optim.warmup_ratio, c.optim.min_lr_ratio, c.env.invalid_action_penalty) == (0.1, 0.2, -0.1)
    assert (c.eval.num_episodes, c.eval.every_steps, c.eval.temperature) == (16, 5, 0.4)
    assert (c.mesh.data, c.mesh.fsdp, c.model.remat) == (1, -1, True)
    assert (c.model.dtype, c.model.param_dtype, c.model.attention) == ("auto", "float32", "auto")


@pytest.mark.parametrize("field, value, words", [
    ("epo.kappa_r", -0.5, ["epo.kappa_r", "-0.5"]),
    ("optim.lr", -1e-5, ["optim.lr", "-1e-05", "> 0.0"]),
    ("algo.advantage", "ppo_typo", ["algo.advantage", "ppo_typo", "grpo"]),
    ("algo.entropy_control", "magic", ["algo.entropy_control", "'epo'"]),
    ("epo.mode", "papr", ["epo.mode", "'code'"]),
    ("algo.loss_agg", "mean", ["algo.loss_agg", "token-mean"]),
    ("rollout.top_p", 0.0, ["rollout.top_p"]),
    ("env.max_turns", 0, ["env.max_turns", ">= 1"]),
    ("model.dtype", "float16", ["model.dtype", "bfloat16"]),
    ("mesh.data", 0, ["mesh.data", "-1"]),
    ("train.total_steps", 0, ["train.total_steps", ">= 1"]),
    ("optim.lr", float("nan"), ["optim.lr", "finite"]),
    ("model.path", "/no/such/checkpoint", ["model.path", "/no/such/checkpoint", "config.json"]),
    ("algo.entropy_control", "clipcov", ["algo.entropy_control", "'clip_cov'", "'top_entropy'"]),
    ("algo.aepo_entropy_adv_coef", -0.2, ["algo.aepo_entropy_adv_coef", ">= 0.0"]),
    ("algo.clip_cov_ratio", 0.0, ["algo.clip_cov_ratio", "> 0.0", "<= 1.0"]),
    ("algo.kl_cov_ratio", 1.5, ["algo.kl_cov_ratio", "<= 1.0"]),
    ("algo.kl_cov_coef", -1.0, ["algo.kl_cov_coef", ">= 0.0"]),
    ("algo.top_entropy_fraction", 0.0, ["algo.top_entropy_fraction", "> 0.0"]),
    ("algo.clip_cov_lb", float("inf"), ["algo.clip_cov_lb", "finite"]),
    ("optim.lr", 1e30, ["optim.lr", "<= 1.0"]),
    ("rollout.prompt_buckets", ("a", "b"), ["rollout.prompt_buckets", "tuple of increasing integers"]),
    ("rollout.prompt_buckets", (1024, 512), ["rollout.prompt_buckets", "increasing"]),
    ("workdir", "/etc/hostname/run", ["workdir", "/etc/hostname is a file"]),
    ("workdir", "", ["workdir", "non-empty"]),
    ("algo.pack_tokens", -1, ["algo.pack_tokens", ">= 0"]),
    ("rollout.engine", "slots", ["rollout.engine", "'turns'", "'continuous'"]),
    ("rollout.num_slots", -1, ["rollout.num_slots", ">= 0"]),
    ("rollout.chunk_len", 0, ["rollout.chunk_len", ">= 1"]),
])
def test_bad_values_name_field_and_range(field, value, words):
    c = load("scienceworld")
    *sections, key = field.split(".")
    node = c
    for section in sections:
        node = node[section]
    node[key] = value
    with pytest.raises(ConfigError) as err:
        validate(c)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("control", ["none", "bonus", "epo", "aepo", "clip_cov", "kl_cov", "top_entropy"])
def test_every_entropy_control_validates(control):
    c = load("scienceworld")
    c.algo.entropy_control = control
    validate(c)


def test_entropy_control_defaults():
    """Defaults of the entropy controls (docs/algorithms.md sections 2-3)."""
    a = load("base").algo
    assert (a.aepo_entropy_adv_coef, a.top_entropy_fraction) == (0.2, 0.2)
    assert (a.clip_cov_ratio, a.clip_cov_lb, a.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (a.kl_cov_ratio, a.kl_cov_coef) == (2e-3, 1.0)


def test_cross_field_rules():
    c = load("scienceworld")
    c.algo.clip_cov_lb, c.algo.clip_cov_ub = 5.0, 1.0
    with pytest.raises(ConfigError, match=r"algo.clip_cov_ub.*> algo.clip_cov_lb \(5.0\)"):
        validate(c)
    c = load("scienceworld")
    c.epo.kappa_l, c.epo.kappa_r = 1.5, 0.5
    with pytest.raises(ConfigError, match=r"epo.kappa_r.*>= epo.kappa_l \(1.5\)"):
        validate(c)
    c = load("scienceworld")
    c.algo.advantage, c.env.group_size = "grpo", 1
    with pytest.raises(ConfigError, match="env.group_size"):
        validate(c)
    c = load("scienceworld")
    c.mesh.data, c.mesh.fsdp = -1, -1
    with pytest.raises(ConfigError, match="at most one axis"):
        validate(c)
    c = load("scienceworld")  # CPU preset: 1024-token prompts, 64-token replies
    c.algo.pack, c.algo.pack_tokens = True, 1000
    with pytest.raises(ConfigError, match=r"algo.pack_tokens' = 1000.*>= rollout.max_prompt_len \+ "
                                          r"rollout.max_response_len \(1088\)"):
        validate(c)
    c.algo.pack_tokens = 1088
    validate(c)
    c.model.attention = "cudnn"
    with pytest.raises(ConfigError, match=r"algo.pack' = True.*model.attention='cudnn'"):
        validate(c)
    c = load("scienceworld")
    c.algo.rollout_correction = "tis"  # TIS weighs by pi_old / pi_sampler: pi_old must be the trainer's
    with pytest.raises(ConfigError, match=r"algo.old_logprobs' = 'sampler'.*'trainer' with algo.rollout_correction"):
        validate(c)
    c.algo.old_logprobs = "trainer"
    validate(c)
    c.algo.old_logprobs, c.algo.rollout_correction = "sampler", "mis"
    validate(c)


@pytest.mark.parametrize("field, value, words", [
    ("rollout.dtype", "float16", "'model', 'auto', 'float32', 'bfloat16'"),
    ("algo.rollout_correction_cap", 1.0, "> 1.0"),
    ("algo.rollout_correction_level", "seq", "'token', 'sequence'"),
    ("rollout.drift_every", -1, ">= 0"),
])
def test_rollout_drift_fields_name_what_they_accept(field, value, words):
    c = load("scienceworld")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=f"'{field}'") as error:
        validate(c)
    assert words in str(error.value)


@pytest.mark.parametrize("name", ["base", "scienceworld", "alfworld", "mini"])
def test_every_field_has_exactly_one_rule(name):
    """The rule table covers every field of the shipped configs, and nothing else."""
    assert sorted(field_names(load(name))) == sorted(FIELD_RULES)


def test_cross_field_rules_name_real_fields():
    names = set(FIELD_RULES) | {"mesh"}
    assert all(rule.field in names for rule in CROSS_FIELD_RULES)


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epo_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("override, words", [
    ("--config.nosuch=1", ["'nosuch' does not exist", "configs/base.py"]),
    ("--config.optim.lrr=1e-5", ["'optim.lrr' does not exist", "did you mean 'optim.lr'"]),
    ("--config.lr=1e-5", ["'lr' does not exist", "'optim.lr'"]),
    ("--config.seed=abc", ["'seed' = 'abc'", "an integer"]),
    ("--config.model.remat=maybe", ["'model.remat' = 'maybe'", "True or False"]),
    ("--config.rollout.prompt_buckets=abc", ["'rollout.prompt_buckets'", "tuple of increasing integers"]),
    ("--config.epo.kappa_r=-3.0", ["epo.kappa_r", "-3.0"]),
    ("--config.workdir=/etc/hostname/x", ["'workdir'", "/etc/hostname is a file"]),
])
def test_main_rejects_a_bad_override_in_one_line_before_running(override, words):
    """Unknown fields, wrong types and bad values: one line on stderr, exit status 2, no traceback."""
    proc = run_main("--config=configs/scienceworld.py", override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config field"), proc.stderr
    for word in words:
        assert word in lines[0]


def test_verbose_adds_the_traceback():
    proc = run_main("--config=configs/scienceworld.py", "--config.seed=-1", "--verbose")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: config field 'seed'")


def test_a_bad_config_file_argument_is_one_line():
    proc = run_main("--config=configs/scienceworld.py:papr")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "'', 'paper' or 'reference'" in proc.stderr
