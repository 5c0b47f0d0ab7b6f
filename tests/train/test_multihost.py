"""Multi-host training through the real entry point: two `python -m epo_jax.main` processes
(localhost coordinator, gloo CPU collectives, 2 CPU devices each) split the environment groups,
each rolls out its own groups on its own devices, and together they make the same run as one
process with 4 devices.

Token choice is made key-independent (top_k=1: the argmax), so both runs play identical episodes
in the deterministic ALFWorld engine whatever keys each process draws; what may differ is float
rounding between the 2-device and the 4-device layouts and the order of the batch rows. One
micro-batch holds the whole batch (so its token mean does not depend on which rows share a
micro-batch), and Adam with lr = eps = 1 makes the update ~g / (|g| + 1), a well-conditioned
function of the gradient (a tiny eps would turn rounding in tiny gradients into sign flips).
Advantages are not whitened: every turn of the tiny model earns the same format penalty, and
whitening near-equal advantages would amplify rounding into the result."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from epo_jax.train.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import main_command  # noqa: E402
from tiny_policy import tiny_policy_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 2
SETTINGS = ("--config.env.num_groups=2", "--config.rollout.top_k=1", "--config.mesh.data=-1",
            "--config.eval.num_episodes=3", "--config.algo.micro_batch_size=8", "--config.optim.lr=1.0",
            "--config.optim.critic_lr=1.0", "--config.optim.eps=1.0", "--config.optim.warmup_ratio=0.0",
            "--config.algo.whiten_advantages=False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}


def checkpoint_params(workdir, step: int = STEPS) -> dict:
    """A checkpoint's params as numpy (the runs saved them from 4 devices; read them anywhere)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    state = checkpointer.restore(
        path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def test_two_processes_split_the_groups_and_match_one_process(tmp_path):
    model_dir = tiny_policy_dir(str(tmp_path / "models"))
    one = tmp_path / "one"
    proc = subprocess.run(main_command("alfworld", one, model_dir, STEPS, *SETTINGS), cwd=ROOT,
                          env=env_with_devices(4), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    two, port = tmp_path / "two", free_port()
    procs = [subprocess.Popen(
        main_command("alfworld", two, model_dir, STEPS, *SETTINGS, "--config.distributed.initialize=True",
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        cwd=ROOT, env=env_with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert f"step {STEPS}/{STEPS}" in logs[0] and "step 1/" not in logs[1]  # one progress printer

    records_one, records_two = read_jsonl(str(one / "metrics.jsonl")), read_jsonl(str(two / "metrics.jsonl"))
    assert [r["step"] for r in records_two] == list(range(1, STEPS + 1))
    for a, b in zip(records_one, records_two):
        # Both processes' episodes and samples are counted: 2 groups x 2 envs, every turn sample.
        assert b["episodes"] == a["episodes"] == 4
        for key in ("batch/turn_samples", "batch/rows", "success_rate", "turns_mean", "rollout/new_tokens",
                    "rollout/prompt_tokens"):
            assert b[key] == a[key], key
        for key in ("loss", "entropy", "pg_loss", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # Evaluation splits its 3 episodes per split over the processes (2 + 1) and gathers them: the
    # same panel as one process evaluates.
    assert records_two[-1]["eval/iid/episodes"] == records_one[-1]["eval/iid/episodes"] == 3
    assert (two / "eval_panel.json").read_text() == (one / "eval_panel.json").read_text()
    np.testing.assert_allclose(records_two[-1]["eval/ood/turns_mean"], records_one[-1]["eval/ood/turns_mean"])

    params_one, params_two = checkpoint_params(one), checkpoint_params(two)
    moved = checkpoint_params(one, STEPS - 1)
    assert max(np.max(np.abs(params_one[k] - moved[k])) for k in moved) > 1e-3  # the last step updated
    assert sorted(params_one) == sorted(params_two)
    for key in params_one:
        np.testing.assert_allclose(params_two[key], params_one[key], rtol=1e-4, atol=1e-6, err_msg=key)
