"""python -m epo_jax.report on hand-made run directories: Succ.* / Succ. / per-task / entropy figures
against hand computations, grouping by config minus seed, the bootstrap interval against the exact
bootstrap distribution (every resample enumerated with numpy), the tables, figures and CLI."""
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from epo_jax import report
from epo_jax.envs import panels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_run(path, *, seed=0, env="toy_keydoor", advantage="ppo_gae", control="epo", total_steps=10,
              evals=None, tasks=None, train=None, entropy=None, panel_size=4, extra=None):
    """A work directory as the trainer writes it: config.json, metrics.jsonl, eval_panel.json.
    evals: {split: {step: success}}; tasks: {split: {step: {task: success}}}."""
    path = pathlib.Path(path)
    path.mkdir(parents=True)
    config = {"seed": seed, "workdir": str(path), "env": {"name": env, "eval_splits": ["iid", "ood"]},
              "algo": {"advantage": advantage, "entropy_control": control, "clip_low": 0.2, "clip_high": 0.2},
              "epo": {"smoothing": True, "mode": "paper", "beta_schedule": "phase"},
              "train": {"total_steps": total_steps}, "optim": {"lr": 1e-3}}
    for dotted, value in (extra or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    (path / "config.json").write_text(json.dumps(config))
    records = []
    last = max([s for split in (evals or {}).values() for s in split] + [len(train or []), len(entropy or [])])
    for step in range(1, last + 1):
        record = {"step": step}
        if train and step <= len(train):
            record["success_rate"] = train[step - 1]
        if entropy and step <= len(entropy):
            record["entropy"] = entropy[step - 1]
        for split, points in (evals or {}).items():
            if step in points:
                record[f"eval/{split}/success_rate"] = points[step]
        for split, by_step in (tasks or {}).items():
            for task, value in by_step.get(step, {}).items():
                record[f"eval/{split}/success_rate/{task}"] = value
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if panel_size and env == "toy_keydoor":
        chosen = {s: panels.panel(env, s, panel_size) for s in ("iid", "ood")}
        (path / panels.PANEL_FILE).write_text(panels.to_json(env, panel_size, chosen))
    return path


EVALS = {  # two seeds of one method, evaluations every 2 of 10 steps
    0: {"iid": {2: 0.1, 4: 0.5, 6: 0.3, 8: 0.4, 10: 0.2}, "ood": {2: 0.0, 4: 0.25, 6: 0.25, 8: 0.5, 10: 0.0}},
    1: {"iid": {2: 0.0, 4: 0.2, 6: 0.6, 8: 0.6, 10: 0.8}, "ood": {2: 0.5, 4: 0.5, 6: 0.75, 8: 0.25, 10: 0.25}},
}


@pytest.fixture
def two_seeds(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "epo" / f"seed{seed}", seed=seed, evals=EVALS[seed])
    return tmp_path


def test_succ_star_and_succ_match_hand_computations(two_seeds):
    (group,) = report.group_runs([report.load_run(p) for p in report.find_run_dirs([str(two_seeds)])])
    assert group.label == "PPO + EPO" and [r.seed for r in group.runs] == [0, 1]

    paper = report.summarize(group, report.parse_window("paper"), resamples=4000)
    iid, ood = paper.splits["iid"], paper.splits["ood"]
    # Succ.*: best evaluation per seed, IID 0.5 and 0.8 -> 0.65; OOD 0.5 and 0.75 -> 0.625.
    assert iid["succ_star"].values == [0.5, 0.8] and iid["succ_star"].mean == pytest.approx(0.65)
    assert ood["succ_star"].mean == pytest.approx(0.625)
    # Succ. over the paper window, steps >= 0.8 * 10 = 8: IID (0.4 + 0.2) / 2 = 0.3 and (0.6 + 0.8) / 2
    # = 0.7 -> 0.5; OOD 0.25 and 0.25 -> 0.25.
    assert iid["succ"].values == pytest.approx([0.3, 0.7]) and iid["succ"].mean == pytest.approx(0.5)
    assert ood["succ"].mean == pytest.approx(0.25) and ood["succ"].std == pytest.approx(0.0)
    # Sample std (ddof 1) of two values: |a - b| / sqrt(2).
    assert iid["succ_star"].std == pytest.approx(0.3 / math.sqrt(2))
    # The bootstrap means of two seeds are a, (a + b) / 2, b with probability 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are the two values themselves.
    assert iid["succ_star"].ci == pytest.approx((0.5, 0.8))

    windows = {"steps:4-6": [0.4, 0.4], "evals:1": [0.2, 0.8], "last:0.5": [0.3, 2.0 / 3.0],
               "final": [0.2, 0.8]}
    for text, expected in windows.items():
        summary = report.summarize(group, report.parse_window(text), resamples=100)
        assert summary.splits["iid"]["succ"].values == pytest.approx(expected), text
    empty = report.summarize(group, report.parse_window("steps:3-3"), resamples=100)
    assert empty.splits["iid"]["succ"].n == 0 and math.isnan(empty.splits["iid"]["succ"].mean)
    assert "| PPO + EPO | 2 | 65.0 ± 21.2 [50.0, 80.0] | 50.0 ± 28.3 [30.0, 70.0] |" in report.success_table([paper])


def test_per_task_training_and_entropy_figures_match_hand_computations(tmp_path):
    games = {"pick_and_place_simple": ("valid_seen/pick_and_place_simple-Mug-None-Desk-1/trial_T1",
                                       "valid_seen/pick_and_place_simple-Pen-None-Shelf-2/trial_T2"),
             "look_at_obj_in_light": ("valid_seen/look_at_obj_in_light-Book-None-DeskLamp-3/trial_T3",)}
    place, look = games["pick_and_place_simple"], games["look_at_obj_in_light"]
    tasks = {"iid": {4: {place[0]: 1.0, place[1]: 0.0, look[0]: 1.0},
                     8: {place[0]: 1.0, place[1]: 1.0, look[0]: 0.0}}}
    run = write_run(tmp_path / "alf", env="alfworld", total_steps=8, evals={"iid": {4: 2 / 3, 8: 2 / 3}}, tasks=tasks,
                    train=[0.0, 0.5, 0.25, 0.25, 0.5, 0.5, 1.0, 0.75],
                    entropy=[1.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.0, 4.0])
    (group,) = report.group_runs([report.load_run(str(run))])
    summary = report.summarize(group, report.parse_window("evals:2"), resamples=100)
    # Games pooled by task type per evaluation: place 0.5 then 1.0 -> 0.75; look 1.0 then 0.0 -> 0.5.
    assert {t: s.mean for t, s in summary.tasks["iid"].items()} == pytest.approx(
        {"pick_and_place_simple": 0.75, "look_at_obj_in_light": 0.5})
    stats = {k: v.mean for k, v in summary.stats.items()}
    # Quarters of 8 steps are 2 steps: (0 + 0.5) / 2 and (1 + 0.75) / 2.
    assert stats["train_first"] == pytest.approx(0.25) and stats["train_last"] == pytest.approx(0.875)
    # Entropy mean 2.25; variance over the 8 steps: (2 * 1.5625 + 2 * 0.5625 + 3 * 0.0625 + 3.0625) / 8
    # = 0.9375. Halves: [1, 1, 3, 3] -> 1.0; [2, 2, 2, 4] -> 0.75.
    assert stats["entropy_first"] == 1.0 and stats["entropy_last"] == 4.0
    assert stats["entropy_var"] == pytest.approx(0.9375)
    assert stats["entropy_var_first_half"] == pytest.approx(1.0)
    assert stats["entropy_var_second_half"] == pytest.approx(0.75)


def exact_bootstrap_quantile(values, q):
    """The q-quantile (smallest atom with CDF >= q) of the mean of n draws with replacement, by
    enumerating all n^n equally likely resamples."""
    x = np.asarray(values, np.float64)
    means = np.sort([x[list(idx)].mean() for idx in itertools.product(range(x.size), repeat=x.size)])
    return means[int(math.ceil(q * means.size)) - 1]


def test_bootstrap_interval_agrees_with_the_exact_bootstrap_distribution():
    values = [0.21, 0.5, 0.62, 0.9, 0.33]
    low, high = report.bootstrap_ci(values, resamples=20_000, seed=3)
    # Monte Carlo quantiles of 20k resamples land between the exact 2% and 3% (97% and 98%) quantiles.
    assert exact_bootstrap_quantile(values, 0.02) <= low <= exact_bootstrap_quantile(values, 0.03)
    assert exact_bootstrap_quantile(values, 0.97) <= high <= exact_bootstrap_quantile(values, 0.98)
    assert report.bootstrap_ci(values, resamples=20_000, seed=3) == (low, high)  # seeded: reproducible
    assert report.bootstrap_ci([0.4], resamples=10) == (0.4, 0.4)
    a, b = [0.1, 0.4, 0.2], [0.5, 0.9, 0.6]
    diffs = np.sort([np.mean([b[i] for i in j]) - np.mean([a[i] for i in k])
                     for j in itertools.product(range(3), repeat=3) for k in itertools.product(range(3), repeat=3)])
    low, high = report.bootstrap_diff_ci(a, b, resamples=40_000, seed=1)
    assert diffs[int(0.02 * diffs.size)] <= low <= diffs[int(0.03 * diffs.size)]
    assert diffs[int(0.97 * diffs.size)] <= high <= diffs[int(0.98 * diffs.size)]


def test_runs_group_by_config_minus_seed_and_workdir(tmp_path):
    for seed in (0, 1, 2):
        write_run(tmp_path / "ppo" / f"s{seed}", seed=seed, control="none", evals={"iid": {10: 0.5}})
        write_run(tmp_path / "grpo" / f"s{seed}", seed=seed, advantage="grpo", control="none", evals={"iid": {10: 0.5}})
    write_run(tmp_path / "ppo_lr" / "s0", control="none", evals={"iid": {10: 0.5}}, extra={"optim.lr": 3e-4})
    write_run(tmp_path / "short" / "s0", control="none", evals={"iid": {4: 0.5}})  # stopped at step 4 of 10
    groups, summaries, left_out = report.build([str(tmp_path / "*")], resamples=100)
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("GRPO", 3), ("PPO (optim.lr=0.001)", 3), ("PPO (optim.lr=0.0003)", 1)]
    assert [r.path for r in left_out] == [str(tmp_path / "short" / "s0")]
    text = report.markdown(groups, summaries, report.parse_window("paper"), left_out=left_out)
    assert "step 4 of 10" in text and "| method | algo.advantage | optim.lr |" in text
    ignored, _, _ = report.build([str(tmp_path)], ignore=("seed", "workdir", "optim"), resamples=100)
    assert [(g.label, len(g.runs)) for g in ignored] == [("GRPO", 3), ("PPO", 4)]


def test_groups_that_share_a_method_name_are_told_apart_by_what_differs_between_them(tmp_path):
    for name, clip_high, lr in (("a", 0.25, 1e-3), ("b", 0.28, 1e-3), ("c", 0.2, 3e-4)):
        write_run(tmp_path / name, control="none", evals={"iid": {10: 0.5}},
                  extra={"algo.clip_high": clip_high, "optim.lr": lr})
    groups, _, _ = report.build([str(tmp_path)], resamples=10)
    assert [g.label for g in groups] == ["PPO + clip-higher (algo.clip_high=0.25)",
                                         "PPO + clip-higher (algo.clip_high=0.28)", "PPO"]


def test_method_labels_name_the_paper_methods():
    base = {"algo.advantage": "ppo_gae", "algo.entropy_control": "epo", "epo.smoothing": True, "epo.mode": "paper",
            "algo.clip_low": 0.2, "algo.clip_high": 0.2}
    assert report.method_label(base) == "PPO + EPO"
    assert report.method_label({**base, "epo.smoothing": False}) == "PPO + EPO-Base"
    assert report.method_label({**base, "epo.mode": "code"}) == "PPO + EPO (code mode)"
    assert report.method_label({**base, "algo.advantage": "grpo", "algo.entropy_control": "none"}) == "GRPO"
    assert report.method_label({**base, "algo.entropy_control": "bonus", "algo.clip_high": 0.28}) == \
        "PPO + entropy bonus + clip-higher"


def test_published_rows_sit_beside_matching_groups_and_panels_are_checked(tmp_path):
    write_run(tmp_path / "sw" / "s0", env="scienceworld", evals={"iid": {10: 0.5}, "ood": {10: 0.25}})
    write_run(tmp_path / "toy" / "s0", advantage="grpo", evals={"iid": {10: 1.0}, "ood": {10: 0.5}})
    write_run(tmp_path / "toy" / "s1", advantage="grpo", seed=1, evals={"iid": {10: 1.0}, "ood": {10: 0.5}},
              panel_size=8)
    groups, summaries, _ = report.build([str(tmp_path)], resamples=100)
    beside = report.beside_published(summaries)
    assert "| PPO + EPO | this report (1 seed) | 50.0 | 50.0 | 25.0 | 25.0 |" in beside
    assert "| PPO + EPO | EPO, arXiv 2509.22576 v2, Table 1, ScienceWorld, Qwen2.5-7B-Instruct | 100.0 | 96.8 " \
           "| 100.0 | 96.2 |" in beside
    assert "GRPO" not in beside  # no published corridor numbers
    text = report.markdown(groups, summaries, report.parse_window("paper"), published="all")
    assert "| ALFWorld (Qwen2.5-3B-Instruct) | GRPO + EPO | 91.7 | 75.8 | 89.6 | 75.4 |" in text
    assert "NOT evaluated on one shared panel" in text  # a 4-episode and an 8-episode panel
    assert "Beside the published" not in report.markdown(groups, summaries, report.parse_window("paper"),
                                                          published="none")


def test_command_line_writes_markdown_and_json_without_matplotlib_or_jax(two_seeds, tmp_path):
    out, summary = tmp_path / "out" / "report.md", tmp_path / "summary.json"
    code = ("import sys; from epo_jax import report; "
            f"report.main([{str(two_seeds)!r}, '--out', {str(out)!r}, '--json', {str(summary)!r}]); "
            "assert 'matplotlib' not in sys.modules and 'jax' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| PPO + EPO | 2 | 65.0 ± 21.2 [50.0, 80.0]" in out.read_text()
    (group,) = json.loads(summary.read_text())["groups"]
    assert group["seeds"] == [0, 1] and group["splits"]["iid"]["succ"]["values"] == pytest.approx([0.3, 0.7])
    bad = subprocess.run([sys.executable, "-m", "epo_jax.report", str(two_seeds), "--window", "last:2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "--window='last:2' is not a window" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "epo_jax.report", str(tmp_path / "nothing")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert missing.returncode == 2 and "no run directory" in missing.stderr


def test_figures_are_written_and_linked(two_seeds, tmp_path):
    out, figures = tmp_path / "doc" / "results.md", tmp_path / "doc" / "figs"
    assert report.main([str(two_seeds), "--out", str(out), "--figures", str(figures)]) == 0
    for name in report.FIGURES:
        assert (figures / name).stat().st_size > 5000
        assert f"![{name}](figs/{name})" in out.read_text()
