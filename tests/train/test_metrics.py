"""Metrics: JSONL + TensorBoard files, W&B runs (offline), truncation on resume, the progress line."""
import glob
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from configs.base import get_config
from epo_jax.errors import UserError
from epo_jax.train.metrics import MetricsWriter, WandbOptions, per_task_tables, progress_line, read_jsonl


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"loss": step * 1.0, "vector": [1, 2]})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill mid-write
    # Resume from a checkpoint at step 3: steps 4, 5 (and the torn line) will run again.
    writer = MetricsWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0 and "vector" not in records[0]
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))


def test_non_finite_values_are_written_as_null(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": float("nan")})
    writer.close()
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": None}


def test_progress_line():
    line = progress_line(3, 10, {"success_rate": 0.25, "entropy": 0.5, "time/rollout_s": 2.0})
    assert line == "step 3/10 | succ 0.25 | H 0.500 | roll 2.0s"
    line = progress_line(4, 10, {"success_rate": 0.5, "score_mean": 37.5, "valid_turn_rate": 0.875,
                                 "skipped": 0.0})
    assert line == "step 4/10 | succ 0.50 | score 37.5 | valid 0.88"
    assert progress_line(5, 10, {"entropy": 0.5, "skipped": 2.0}) == "step 5/10 | H 0.500 | skipped updates 2"


def test_remote_mode_rewrites_the_log_and_copies_events(tmp_path, monkeypatch):
    """The code path of a gs:// work directory, exercised on a local folder."""
    from epo_jax.train import metrics
    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 2.0})
    writer.close()
    assert [r["loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1.0, 2.0]
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))


# --- Weights & Biases, offline --------------------------------------------------------------

@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with its caches and settings under tmp_path: nothing leaves the machine
    or lands in the home directory."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _offline_runs(workdir) -> list[str]:
    """The offline run folders W&B wrote under a work directory, oldest first."""
    return sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))


def _inspect(run_dir: str, *args: str):
    """What wandb's own reader of a run's .wandb log prints (`wandb leet inspect`), as JSON."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *args, run_dir],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out) if "--summary" in args else [json.loads(line) for line in out.splitlines()]


def _history(run_dir: str) -> dict[int, dict]:
    """The run's logged rows by RL step."""
    rows = [r["history"]["item"] for r in _inspect(run_dir) if r["type"] == "history"]
    return {int(row["rl_step"]): row for row in rows}


def test_wandb_offline_run_holds_the_scalars_config_and_eval_tables(tmp_path, offline_wandb):
    config = get_config()
    config.logging.wandb = True
    config.logging.wandb_project = "epo-test"
    config.logging.wandb_run_name = "sciworld-epo"
    config.logging.wandb_tags = ("epo", "offline")
    config.epo.lam = 0.25
    workdir = tmp_path / "run"
    writer = MetricsWriter.from_config(config, str(workdir))
    steps = {1: {"loss": 0.5, "entropy": 1.25, "vector": [1, 2]},
             2: {"loss": 0.25, "entropy": 1.0, "ppo_kl": float("nan")},
             3: {"loss": 0.125, "entropy": 0.75, "eval/iid/success_rate": 0.5,
                 "eval/iid/success_rate/boil": 1.0, "eval/iid/score/boil": 100.0,
                 "eval/iid/success_rate/melt": 0.0, "eval/iid/score/melt": 25.0,
                 "eval/ood/success_rate/freeze": 0.5}}
    for step, metrics in steps.items():
        writer.write(step, metrics)
    writer.close()

    (run_dir,) = _offline_runs(workdir)
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert run_dir.endswith("-" + run_id)
    summary = _inspect(run_dir, "--summary")
    assert (summary["run_id"], summary["project"], summary["name"]) == (run_id, "epo-test", "sciworld-epo")
    assert summary["tags"] == ["epo", "offline"] and summary["exit_code"] == 0
    assert summary["config"]["epo"]["lam"] == 0.25 and summary["config"]["logging"]["wandb"] is True
    last = summary["summary"]
    assert last["rl_step"] == 3 and last["loss"] == 0.125 and last["entropy"] == 0.75
    assert last["eval/iid/score/melt"] == 25.0 and "vector" not in last

    # Every step's row holds exactly that step's scalars (NaN stays NaN: the reader prints "NaN").
    history = _history(run_dir)
    assert sorted(history) == [1, 2, 3]
    for step, metrics in steps.items():
        row = history[step]
        scalars = {k: v for k, v in metrics.items() if k != "vector"}
        logged = {k for k in row if not k.startswith(("_", "eval/iid/per_task", "eval/ood/per_task"))}
        assert logged == set(scalars) | {"rl_step"} and row["rl_step"] == step
        for key, value in scalars.items():
            assert (math.isnan(float(row[key])) if math.isnan(value) else row[key] == value), key

    # The per-task results of each eval split as a table (a W&B table file beside the run).
    tables = {}
    for split, columns, rows in (("iid", ["task", "score", "success_rate"], [["boil", 100.0, 1.0],
                                                                              ["melt", 25.0, 0.0]]),
                                 ("ood", ["task", "success_rate"], [["freeze", 0.5]])):
        entry = last[f"eval/{split}/per_task"]
        assert entry["_type"] == "table-file" and entry["nrows"] == len(rows)
        tables[split] = json.loads((pathlib.Path(run_dir) / "files" / entry["path"]).read_text())
        assert tables[split]["columns"] == columns and tables[split]["data"] == rows


def test_resumed_writer_continues_the_wandb_run(tmp_path, offline_wandb):
    options = WandbOptions(project="epo-test")
    writer = MetricsWriter(str(tmp_path), tensorboard=False, wandb=options)
    with pytest.raises(RuntimeError):
        try:
            for step in (1, 2, 3):
                writer.write(step, {"loss": float(step)})
            raise RuntimeError("killed after step 3")
        finally:
            writer.close()
    # The checkpoint was at step 2: step 3 runs again, then 4.
    writer = MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False, wandb=options)
    writer.write(3, {"loss": 30.0})
    writer.write(4, {"loss": 40.0})
    writer.close()

    first, second = _offline_runs(tmp_path)
    first_summary, second_summary = _inspect(first, "--summary"), _inspect(second, "--summary")
    assert first_summary["run_id"] == second_summary["run_id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first_summary["exit_code"] == 1 and second_summary["exit_code"] == 0
    assert first_summary["name"] == second_summary["name"] == tmp_path.name
    assert {s: r["loss"] for s, r in _history(first).items()} == {1: 1.0, 2: 2.0, 3: 3.0}
    assert {s: r["loss"] for s, r in _history(second).items()} == {3: 30.0, 4: 40.0}
    assert [r["loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1.0, 2.0, 30.0, 40.0]


def test_remote_mode_copies_the_wandb_run_folder(tmp_path, offline_wandb, monkeypatch):
    """On a gs:// work directory W&B writes to a local folder that close() copies over."""
    from epo_jax.train import metrics
    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    writer = MetricsWriter(str(tmp_path), tensorboard=False, wandb=WandbOptions(project="epo-test"))
    writer.write(1, {"loss": 1.0})
    assert not _offline_runs(tmp_path)  # still local
    writer.close()
    (run_dir,) = _offline_runs(tmp_path)
    assert _inspect(run_dir, "--summary")["summary"]["loss"] == 1.0


def test_wandb_is_off_by_default(tmp_path):
    writer = MetricsWriter.from_config(get_config(), str(tmp_path))
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()


def test_wandb_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match=r"pip install 'epo-jax\[wandb\]'"):
        MetricsWriter(str(tmp_path), wandb=WandbOptions(project="epo-test"))


def test_per_task_tables():
    scalars = {"eval/iid/success_rate": 0.5, "eval/iid/success_rate/b": 1.0, "eval/iid/score/b": 90.0,
               "eval/iid/success_rate/a": 0.0, "eval/ood/score/c": 5.0, "success_rate": 0.25}
    assert per_task_tables(scalars) == {
        "eval/iid/per_task": (["task", "score", "success_rate"], [["a", None, 0.0], ["b", 90.0, 1.0]]),
        "eval/ood/per_task": (["task", "score"], [["c", 5.0]])}
