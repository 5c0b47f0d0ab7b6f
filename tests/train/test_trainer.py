"""End to end through `python -m epo_jax.main`: real engines, a tiny model, checkpoints,
metrics, evaluation, and a run killed with SIGKILL that resumes bitwise-exactly."""
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from epo_jax.train.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(__file__))
from tiny_policy import tiny_policy_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def main_command(env: str, workdir, model_dir, total_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epo_jax.main", f"--config=configs/{env}.py",
            f"--config.workdir={workdir}", f"--config.model.path={model_dir}",
            f"--config.train.total_steps={total_steps}", "--config.env.num_groups=1",
            "--config.env.group_size=2", "--config.env.max_turns=2",
            "--config.rollout.max_response_len=16", "--config.algo.micro_batch_size=4",
            "--config.checkpoint.every_steps=1", "--config.checkpoint.async_save=False",
            f"--config.eval.every_steps={total_steps}", "--config.eval.num_episodes=2",
            "--config.sft.cold_start=False", *extra]


def run_main(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(main_command(*args, **kwargs), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_policy_dir(str(tmp_path_factory.mktemp("models")))


def restored_state(workdir, step: int):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.parametrize("engine", ["turns", "continuous"])
def test_scienceworld_run_writes_checkpoints_metrics_and_eval(tmp_path, model_dir, engine):
    workdir = tmp_path / "sw"
    proc = run_main("scienceworld", workdir, model_dir, 2, f"--config.rollout.engine={engine}")
    assert "step 2/2" in proc.stdout  # the progress line
    records = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["episodes"] == 2 and record["skipped"] == 0
        # Log-probs of the sampler and of the update are one graph: the first ratio is 1.
        assert abs(record["ppo_kl"]) < 1e-4
        assert record["batch/turn_samples"] >= 2 and np.isfinite(record["loss"])
    assert records[0]["epo/beta"] == pytest.approx(2.0)  # beta_0 = 2 (no history yet)
    assert records[1]["epo/entropy_reference"] == pytest.approx(records[0]["entropy"], rel=1e-4)
    assert records[1]["eval/iid/episodes"] == 2 and "eval/ood/success_rate" in records[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    recorded = json.loads((workdir / "config.json").read_text())
    assert (recorded["env"]["name"], recorded["rollout"]["engine"]) == ("scienceworld", engine)


# One killed run covers LoRA (rank-4 adapters on a bfloat16 base, which the checkpoints leave out
# and the resumed run loads again) through the continuous engine (its environments step on their
# workers while other replies decode). Full fine-tuning's resume is bitwise too:
# tests/train/test_fault_injection.py resumes a full run from its previous checkpoint and compares
# the state it writes with the original's fingerprint.
LORA_ARGS = ("--config.model.lora.rank=4", "--config.model.lora.base_dtype=bfloat16")
CONTINUOUS_ARGS = ("--config.rollout.engine=continuous",)


def test_killed_run_resumes_bitwise_exactly(tmp_path, model_dir):
    """ALFWorld (a deterministic engine), 3 steps: once straight through, once killed with
    SIGKILL after step 2's checkpoint and restarted with the same command."""
    extra = (*LORA_ARGS, *CONTINUOUS_ARGS)
    straight = tmp_path / "straight"
    run_main("alfworld", straight, model_dir, 3, *extra)

    resumed = tmp_path / "resumed"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(main_command("alfworld", resumed, model_dir, 3, *extra), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not (resumed / "checkpoints" / "2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (resumed / "checkpoints" / "2").is_dir(), "the run ended before its second checkpoint"
    proc = run_main("alfworld", resumed, model_dir, 3, *extra)

    a, b = restored_state(straight, 3), restored_state(resumed, 3)
    leaves_a, leaves_b = jax_leaves(a), jax_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    # The checkpoint holds the adapters and their moments, no base weight.
    policy_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a["params"]["policy"])[0]]
    assert policy_paths and all("adapter" in p for p in policy_paths)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bitwise: params, optimizer, history, rng
    steps = [r["step"] for r in read_jsonl(str(resumed / "metrics.jsonl"))]
    assert steps == [1, 2, 3]  # nothing repeated, nothing skipped
    straight_records = read_jsonl(str(straight / "metrics.jsonl"))
    resumed_records = read_jsonl(str(resumed / "metrics.jsonl"))
    for key in ("loss", "entropy", "reward_mean", "eval/ood/success_rate"):
        assert straight_records[-1][key] == resumed_records[-1][key]


def jax_leaves(tree):
    return [np.asarray(jax.random.key_data(x)) if hasattr(x, "dtype") and
            jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x)
            for x in jax.tree.leaves(tree)]
