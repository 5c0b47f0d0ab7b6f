"""Metrics: JSONL + TensorBoard files, truncation on resume, the progress line."""
import glob
import json
import os

from epo_jax.train.metrics import MetricsWriter, progress_line, read_jsonl


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
