"""bench/reproduce_mini.py --quick end to end: warm-started policy, one real training run through
`python -m epo_jax.main`, then the report and its figures."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from epo_jax import report
from epo_jax.envs import panels
from epo_jax.train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quick_mode_writes_results_and_plots(tmp_path):
    out, results, figures = tmp_path / "mini", tmp_path / "results.md", tmp_path / "figures"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "bench/reproduce_mini.py", "--quick", f"--out={out}", f"--results={results}",
         f"--figures={figures}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    policy = out / "policy"
    assert (policy / "config.json").exists() and (policy / "model.safetensors").exists()
    assert json.loads((policy / "warm_start.json").read_text())["vocab_size"] < 200

    workdir = out / "runs" / "ppo_epo" / "seed0"
    records = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["episodes"] == 4 for r in records)
    assert records[-1]["epo/beta"] > 1.0 and "eval/iid/success_rate" in records[-1]
    assert "eval/ood/success_rate" in records[-1]
    config = json.loads((workdir / "config.json").read_text())
    assert config["env"]["name"] == "toy_keydoor" and config["algo"]["entropy_control"] == "epo"

    text = results.read_text()
    assert "| PPO + EPO |" in text and "Table 1" in text and "PPO + EPO | 100.0" in text
    # The report module read the run: its Succ.* is the run's best evaluation.
    best = max(r["eval/iid/success_rate"] for r in records if "eval/iid/success_rate" in r)
    assert f"| PPO + EPO | 1 | {best * 100:.1f} |" in text
    assert "every run evaluated the same 4 episodes" in text
    assert json.loads((workdir / "eval_panel.json").read_text())["splits"]["iid"]["episodes"] == [
        [s.task, s.variation] for s in panels.panel("toy_keydoor", "iid", 4)]
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == sorted(report.FIGURES)
    for name in pngs:
        assert (figures / name).stat().st_size > 5000
        assert f"]({os.path.relpath(figures, results.parent)}/{name})" in text
    assert json.loads((out / "sweep.json").read_text())["failures"] == []

    # A second call reuses the finished run instead of training again.
    again = subprocess.run(
        [sys.executable, "bench/reproduce_mini.py", "--quick", f"--out={out}", f"--results={results}",
         f"--figures={figures}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[reuse] ppo_epo seed 0" in again.stdout
