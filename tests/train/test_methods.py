"""Every algo.entropy_control through the real jitted update on the tiny model: a finite loss,
changed parameters, and the method's own metrics live (one compile per method)."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_update import mesh_of, random_batch, run_update, tiny_config  # noqa: E402

from epo_jax.algo import ENTROPY_CONTROLS  # noqa: E402

# Settings that make each method act on the tiny batch (8 rows x 5 tokens = 40 tokens): with the
# paper's Clip-Cov ratio of 2e-4 and bounds (1, 5) it would usually select nothing here.
METHOD_SETTINGS = {
    "bonus": {"entropy_coef": 0.01},
    "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": -100.0},
    "kl_cov": {"kl_cov_ratio": 0.1},
}
# A metric that must be non-zero when the method is on.
LIVE_METRIC = {
    "bonus": "entropy_loss",
    "epo": "entropy_loss",
    "aepo": "aepo_adv_scale_max",
    "clip_cov": "cov_selected_fraction",
    "kl_cov": "kl_cov_penalty",
    "top_entropy": "top_entropy_kept_fraction",
}


@pytest.mark.parametrize("control", ENTROPY_CONTROLS)
def test_one_update_per_entropy_control(control):
    config = tiny_config(micro_batch_size=4, entropy_control=control, **METHOD_SETTINGS.get(control, {}))
    new, metrics, before = run_update(config, random_batch(8, seed=3), mesh_of(1, 1, jax.devices()[:1]))
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
    change = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before)))
    assert change > 1e-4
    if control in LIVE_METRIC:
        assert metrics[LIVE_METRIC[control]] != 0.0


# Each run: one RL step of `python -m epo_jax.main` on the real ScienceWorld with the tiny policy.
END_TO_END = {
    "grpo+aepo+branching+clip-higher": (
        "--config.algo.advantage=grpo", "--config.algo.entropy_control=aepo", "--config.algo.clip_high=0.28",
        "--config.rollout.branching=True", "--config.rollout.branch_monitor_turns=2",
        "--config.rollout.branch_threshold=0.05", "--config.env.group_size=3"),
    "gigpo+clip_cov": ("--config.algo.advantage=gigpo", "--config.algo.entropy_control=clip_cov",
                       "--config.algo.clip_cov_ratio=0.1", "--config.algo.clip_cov_lb=-100"),
    "rloo+kl_cov": ("--config.algo.advantage=rloo", "--config.algo.entropy_control=kl_cov",
                    "--config.algo.kl_cov_ratio=0.1"),
    "ppo_gae+top_entropy": ("--config.algo.advantage=ppo_gae", "--config.algo.entropy_control=top_entropy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(END_TO_END))
def test_methods_train_end_to_end_in_scienceworld(name, tmp_path, tiny_model_dir):
    """Advantage x entropy control x rollout combinations through the real entry point: the step
    trains on finite numbers with the method's metrics live, and with branching a group never
    plays more episodes than its environments."""
    from test_trainer import run_main

    from epo_jax.train.metrics import read_jsonl

    workdir = tmp_path / "run"
    # main_command sets 1 group x 2 environments and 2 turns; the branching run widens the group.
    run_main("scienceworld", workdir, tiny_model_dir, 1, "--config.eval.every_steps=0",
             "--config.env.max_turns=3", *END_TO_END[name])
    (record,) = read_jsonl(str(workdir / "metrics.jsonl"))
    assert record["skipped"] == 0 and np.isfinite(record["loss"]) and record["batch/turn_samples"] >= 2
    control = name.split("+")[1]
    assert record[LIVE_METRIC[control]] > 0, record
    if "branching" in name:
        played = record["episodes"] + record["crashed_episodes"]
        assert played == record["rollout/fresh_rollouts"] + record["rollout/branches"] <= 3
        assert record["rollout/fresh_rollouts"] >= 1 and record["rollout/branches"] >= 1
        assert record["rollout/replayed_steps"] >= record["rollout/branches"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_policy import tiny_policy_dir

    return tiny_policy_dir(str(tmp_path_factory.mktemp("models")))
