"""The paper's metrics from training runs, with the spread over seeds: a markdown report.

    python -m epo_jax.report RUN_DIR [RUN_DIR ...] [--out report.md] [--figures DIR]
        [--window paper | last:F | steps:A-B | evals:N] [--published auto|all|none] [--json summary.json]

A RUN_DIR is a work directory of `python -m epo_jax.main` (config.json + metrics.jsonl); a folder
holding several (e.g. the `launch/seeds.sh` output) or a glob ("runs/*/seed*") gives all the runs
under it. Runs are grouped by their config minus `seed` and `workdir` (`--ignore` drops more
fields), so each group is one method with several seeds; runs that did not reach their last step
are left out (and listed) unless `--include-incomplete`.

Metrics, per evaluation split (eval/<split>/success_rate in metrics.jsonl), as in EPO's Table 1:
  - Succ.* : the best evaluation of each seed, then the mean over seeds;
  - Succ.  : the mean of each seed's evaluations inside the convergence window, then the mean
             over seeds. The paper reports Succ. as the success "after convergence" without a
             window; the preset `paper` is the last 20% of the run's steps (steps >= 0.8 K: 100-125
             for ScienceWorld's K = 125, 120-150 for ALFWorld's K = 150). By then EPO's phase weight
             beta_k = 1 + exp(-gamma k / floor(K/2)) is within 1% of its limit, the learning rate is
             near its floor, and every method has had the same budget to converge.
Every group statistic is given as mean ± standard deviation over seeds (ddof = 1) with a
percentile bootstrap 95% interval of the mean (seeds resampled with replacement, `--resamples`
draws, numpy generator seeded with `--bootstrap-seed`; no interval for one seed). Also: per-task
success in the window (ALFWorld games pooled by task type), the training success of the first and
last quarter of the steps, and the policy entropy (`entropy`: the token mean of each step's update
batch): first and last step, and its variance across the steps of each seed, over the whole run
and over each half (EPO claims that variance falls).

`--published auto` puts EPO's published Table 1 rows (arXiv 2509.22576 v2; docs/algorithms.md
section 1) beside groups of the same benchmark and method (PPO, PPO + EPO, GRPO, GRPO + EPO);
`all` adds the whole published table. Plots (`--figures DIR`, PNG) need matplotlib, which is
imported only then. The report reads only JSON: neither JAX nor the engines are loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from epo_jax.envs import panels as panels_lib
from epo_jax.train.metrics import read_jsonl

DEFAULT_IGNORE = ("seed", "workdir")
WINDOW_PRESETS = {"paper": "last:0.2", "final": "evals:1"}
DEFAULT_WINDOW = "paper"

# EPO's Table 1 (arXiv 2509.22576 v2; docs/algorithms.md section 1): success %, per method
# (IID Succ.*, IID Succ., OOD Succ.*, OOD Succ.), 3 seeds.
PUBLISHED_SOURCE = "EPO, arXiv 2509.22576 v2, Table 1"
PUBLISHED = {
    "scienceworld": ("ScienceWorld", "Qwen2.5-7B-Instruct", {
        "PPO": (64.6, 38.4, 58.3, 39.1), "PPO + EPO": (100.0, 96.8, 100.0, 96.2),
        "GRPO": (93.8, 81.6, 91.7, 80.9), "GRPO + EPO": (95.8, 83.8, 95.8, 81.3)}),
    "alfworld": ("ALFWorld", "Qwen2.5-3B-Instruct", {
        "PPO": (95.8, 72.3, 87.5, 70.9), "PPO + EPO": (85.4, 73.4, 91.7, 74.3),
        "GRPO": (87.5, 63.3, 83.3, 63.5), "GRPO + EPO": (91.7, 75.8, 89.6, 75.4)}),
}
PUBLISHED_COLUMNS = (("iid", "succ_star"), ("iid", "succ"), ("ood", "succ_star"), ("ood", "succ"))

_ADVANTAGE_NAMES = {"ppo_gae": "PPO", "grpo": "GRPO", "drgrpo": "Dr.GRPO", "rloo": "RLOO", "gigpo": "GiGPO"}
_CONTROL_NAMES = {"none": "", "bonus": " + entropy bonus", "aepo": " + AEPO", "clip_cov": " + Clip-Cov",
                  "kl_cov": " + KL-Cov", "top_entropy": " + top-entropy tokens"}
# The config fields a method name says everything about (see `method_label`).
_METHOD_FIELDS = ("algo.advantage", "algo.entropy_control", "epo.smoothing", "epo.mode", "epo.beta_schedule",
                  "algo.clip_low", "algo.clip_high", "rollout.branching")


# --- Runs and groups ----------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One work directory: its config (flattened to dotted keys), metrics records and panel."""

    path: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    panel: dict[str, Any] | None

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def total_steps(self) -> int:
        return int(self.config.get("train.total_steps") or max((r["step"] for r in self.records), default=0))

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    @property
    def env_name(self) -> str:
        return str(self.config.get("env.name", ""))


@dataclasses.dataclass
class Group:
    """Runs whose configs differ only in the ignored fields (seeds of one method)."""

    label: str
    config: dict[str, Any]
    runs: list[Run]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so that values compare and hash."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _runs_below(root: epath.Path) -> list[str]:
    """Work directories below `root`: any depth locally, up to 3 levels on remote storage (where a
    recursive listing costs a request per folder)."""
    if "://" in str(root):
        hits = [p for depth in range(1, 4) for p in root.glob("/".join(["*"] * depth) + "/metrics.jsonl")]
    else:
        hits = list(pathlib.Path(root).rglob("metrics.jsonl"))
    return sorted(str(p.parent) for p in hits)


def find_run_dirs(patterns: Iterable[str]) -> list[str]:
    """The work directories named by `patterns` (directories or globs), each with a metrics.jsonl:
    a directory without one stands for every run below it. Sorted, without repeats."""
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise FileNotFoundError(f"no directory matches {pattern!r}")
        for match in matches:
            root = epath.Path(match)
            if (root / "metrics.jsonl").exists():
                found.append(str(root))
            elif root.is_dir():
                found += _runs_below(root)
    found = sorted(dict.fromkeys(found))
    if not found:
        raise FileNotFoundError(f"no run directory (a folder with metrics.jsonl) in {list(patterns)}; pass the "
                                "work directories of `python -m epo_jax.main` runs")
    return found


def load_run(path: str) -> Run:
    root = epath.Path(path)
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: the trainer writes it when a run starts; "
                                "pass work directories of `python -m epo_jax.main` runs")
    panel_path = root / panels_lib.PANEL_FILE
    panel = json.loads(panel_path.read_text()) if panel_path.exists() else None
    records = sorted(read_jsonl(root / "metrics.jsonl"), key=lambda r: r["step"])
    return Run(str(path), flatten(json.loads(config_path.read_text())), records, panel)


def _ignored(field: str, ignore: Sequence[str]) -> bool:
    return any(field == i or field.startswith(i + ".") for i in ignore)


def method_label(config: Mapping[str, Any]) -> str:
    """A run's method in the paper's words, e.g. "PPO + EPO", "GRPO", "PPO + EPO-Base (code mode)"."""
    name = _ADVANTAGE_NAMES.get(config.get("algo.advantage"), str(config.get("algo.advantage")))
    control = config.get("algo.entropy_control", "none")
    if control == "epo":
        name += " + EPO" if config.get("epo.smoothing", True) else " + EPO-Base"
        if config.get("epo.mode") == "code":
            name += " (code mode)"
        if config.get("epo.beta_schedule") == "constant":
            name += " (constant beta)"
    else:
        name += _CONTROL_NAMES.get(control, f" + {control}")
    if config.get("algo.clip_high", 0) > config.get("algo.clip_low", 0):
        name += " + clip-higher"
    if config.get("rollout.branching"):
        name += " + branching"
    return name


def _varying_fields(groups: Sequence[Group]) -> list[str]:
    """The config fields whose values are not the same in all `groups`, sorted."""
    fields = sorted({k for g in groups for k in g.config})
    return [k for k in fields if len({json.dumps(g.config.get(k), default=str) for g in groups}) > 1]


def group_runs(runs: Sequence[Run], ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Group]:
    """Groups in order of their first run; runs in a group by seed; labels from `method_label`,
    with the other differing config fields appended where two groups would share a label."""
    groups: dict[str, Group] = {}
    for run in runs:
        kept = {k: v for k, v in run.config.items() if not _ignored(k, ignore)}
        key = json.dumps(sorted(kept.items(), key=lambda kv: kv[0]), default=str)
        groups.setdefault(key, Group(method_label(kept), kept, [])).runs.append(run)
    result = list(groups.values())
    for group in result:
        group.runs.sort(key=lambda r: (r.seed, r.path))
    for label in sorted({g.label for g in result}):
        twins = [g for g in result if g.label == label]
        if len(twins) < 2:
            continue
        varying = _varying_fields(twins)
        fields = [k for k in varying if k not in _METHOD_FIELDS] or varying
        for group in twins:
            group.label += " (" + ", ".join(f"{k}={group.config.get(k)}" for k in fields) + ")"
    return result


# --- Windows ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Window:
    """Which evaluations Succ. averages: `last` F of the steps, `steps` A-B, or the last N `evals`."""

    kind: str
    low: float
    high: float = math.inf

    def select(self, points: Sequence[tuple[int, float]], total_steps: int) -> list[tuple[int, float]]:
        if self.kind == "evals":
            return list(points[-int(self.low):])
        if self.kind == "last":
            start = (1.0 - self.low) * total_steps
            return [(s, v) for s, v in points if s >= start - 1e-9]
        return [(s, v) for s, v in points if self.low <= s <= self.high]

    def describe(self) -> str:
        if self.kind == "evals":
            return f"the last {int(self.low)} evaluation{'s' if self.low > 1 else ''} of each seed"
        if self.kind == "last":
            return f"the evaluations of the last {self.low:.0%} of each run's K steps (steps >= {1 - self.low:g} K)"
        return f"the evaluations at steps {self.low:g}-{self.high:g}"


def parse_window(text: str) -> Window:
    """"paper" | "final" | "last:F" (0 < F <= 1) | "steps:A-B" | "evals:N"."""
    spec = WINDOW_PRESETS.get(text, text)
    kind, _, arg = spec.partition(":")
    try:
        if kind == "last" and 0 < float(arg) <= 1:
            return Window("last", float(arg))
        if kind == "evals" and int(arg) >= 1:
            return Window("evals", int(arg))
        if kind == "steps":
            low, high = (int(x) for x in arg.split("-"))
            if 0 <= low <= high:
                return Window("steps", low, high)
    except ValueError:
        pass
    raise ValueError(f"--window={text!r} is not a window; use {' | '.join(WINDOW_PRESETS)} | last:F (0 < F <= 1) "
                     "| steps:A-B | evals:N")


# --- Statistics ---------------------------------------------------------------------------------

def bootstrap_ci(values: Sequence[float], *, resamples: int = 10_000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` means of len(values) values drawn
    with replacement; the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means.
    numpy's own generator and quantile (no library computes this for a handful of seeds more simply)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b) - mean(a), each group's seeds resampled on its own."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = (y[rng.integers(0, y.size, size=(resamples, y.size))].mean(axis=1)
             - x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1))
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


@dataclasses.dataclass
class Stat:
    """One metric over a group's seeds (NaN values, e.g. a seed without evaluations, left out)."""

    values: list[float]
    mean: float
    std: float
    ci: tuple[float, float]

    @property
    def n(self) -> int:
        return len(self.values)


def describe(values: Iterable[float], *, resamples: int = 10_000, confidence: float = 0.95,
             seed: int = 0) -> Stat:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Stat([], math.nan, math.nan, (math.nan, math.nan))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    ci = (bootstrap_ci(finite, resamples=resamples, confidence=confidence, seed=seed) if len(finite) > 1
          else (math.nan, math.nan))
    return Stat(finite, float(np.mean(finite)), std, ci)


# --- Per-run metrics ----------------------------------------------------------------------------

def eval_points(records: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding a finite `key`, in step order."""
    return [(int(r["step"]), float(r[key])) for r in records
            if r.get(key) is not None and math.isfinite(float(r[key]))]


def splits_of(run: Run) -> list[str]:
    """The evaluation splits a run logged, in the order of its env.eval_splits."""
    logged = {k.split("/")[1] for r in run.records for k in r if k.startswith("eval/") and k.endswith("/success_rate")
              and k.count("/") == 2}
    order = [s for s in run.config.get("env.eval_splits", ()) if s in logged]
    return order + sorted(logged - set(order))


def _per_task_points(run: Run, split: str) -> dict[str, list[tuple[int, float]]]:
    """{stratum: (step, success)}: the tasks' success at each evaluation, pooled by stratum (ALFWorld
    games by task type; each game is played once per evaluation, so their mean is the type's rate)."""
    prefix = f"eval/{split}/success_rate/"
    out: dict[str, list[tuple[int, float]]] = {}
    for record in run.records:
        pooled: dict[str, list[float]] = {}
        for key, value in record.items():
            if key.startswith(prefix) and value is not None:
                pooled.setdefault(panels_lib.stratum(run.env_name, key[len(prefix):]), []).append(float(value))
        for name, values in pooled.items():
            out.setdefault(name, []).append((int(record["step"]), float(np.mean(values))))
    return out


def _window_mean(points: Sequence[tuple[int, float]], window: Window, total_steps: int) -> float:
    chosen = window.select(points, total_steps)
    return float(np.mean([v for _, v in chosen])) if chosen else math.nan


def _series(run: Run, key: str) -> np.ndarray:
    """[K] values of `key` by step 1..K (NaN where a step lacks it)."""
    out = np.full(run.total_steps, np.nan)
    for step, value in eval_points(run.records, key):
        if 1 <= step <= run.total_steps:
            out[step - 1] = value
    return out


def _nan_stat(fn: Callable[[np.ndarray], float], x: np.ndarray, minimum: int = 1) -> float:
    finite = x[np.isfinite(x)]
    return float(fn(finite)) if finite.size >= minimum else math.nan


def run_metrics(run: Run, window: Window) -> dict[str, Any]:
    """One seed's numbers: {split: {succ_star, succ, last, tasks: {stratum: succ}}} and the training
    and entropy figures (fractions, not %)."""
    out: dict[str, Any] = {"splits": {}}
    for split in splits_of(run):
        points = eval_points(run.records, f"eval/{split}/success_rate")
        out["splits"][split] = {
            "succ_star": max(v for _, v in points), "succ": _window_mean(points, window, run.total_steps),
            "last": points[-1][1],
            "tasks": {task: _window_mean(p, window, run.total_steps)
                      for task, p in sorted(_per_task_points(run, split).items())}}
    success, entropy = _series(run, "success_rate"), _series(run, "entropy")
    quarter, half = max(1, run.total_steps // 4), run.total_steps // 2
    out.update(
        train_first=_nan_stat(np.mean, success[:quarter]), train_last=_nan_stat(np.mean, success[-quarter:]),
        entropy_first=_nan_stat(lambda x: x[0], entropy), entropy_last=_nan_stat(lambda x: x[-1], entropy),
        entropy_var=_nan_stat(np.var, entropy, 2), entropy_var_first_half=_nan_stat(np.var, entropy[:half], 2),
        entropy_var_second_half=_nan_stat(np.var, entropy[half:], 2))
    return out


# --- Group summaries ----------------------------------------------------------------------------

SCALARS = ("train_first", "train_last", "entropy_first", "entropy_last", "entropy_var", "entropy_var_first_half",
           "entropy_var_second_half")


@dataclasses.dataclass
class Summary:
    """A group's statistics over its seeds: stats[name] for SCALARS, splits[split][metric] for
    succ_star / succ / last, tasks[split][stratum] for per-task Succ."""

    label: str
    runs: list[Run]
    stats: dict[str, Stat]
    splits: dict[str, dict[str, Stat]]
    tasks: dict[str, dict[str, Stat]]
    panels: dict[str, str]   # split -> digest shared by every run, or a note when runs differ

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def to_json(self) -> dict[str, Any]:
        def number(x: float) -> float | None:  # strict JSON has no NaN
            return x if math.isfinite(x) else None

        def stat(s: Stat) -> dict[str, Any]:
            return {"mean": number(s.mean), "std": number(s.std), "ci95": [number(x) for x in s.ci],
                    "values": s.values}
        return {"label": self.label, "seeds": self.seeds, "runs": [r.path for r in self.runs],
                "panels": self.panels, "stats": {k: stat(v) for k, v in self.stats.items()},
                "splits": {s: {k: stat(v) for k, v in m.items()} for s, m in self.splits.items()},
                "tasks": {s: {k: stat(v) for k, v in m.items()} for s, m in self.tasks.items()}}


def panel_digests(runs: Sequence[Run]) -> dict[str, str]:
    """split -> the panel digest all runs share; "differs" or "unknown" (a run without
    eval_panel.json) otherwise."""
    splits = sorted({s for r in runs if r.panel for s in r.panel["splits"]})
    out = {}
    for split in splits:
        digests = {(r.panel or {}).get("splits", {}).get(split, {}).get("digest") for r in runs}
        out[split] = ("unknown" if None in digests else "differs" if len(digests) > 1 else digests.pop())
    return out


def summarize(group: Group, window: Window, *, resamples: int = 10_000, confidence: float = 0.95,
              seed: int = 0) -> Summary:
    per_run = [run_metrics(r, window) for r in group.runs]

    def stat(values):
        return describe(values, resamples=resamples, confidence=confidence, seed=seed)

    splits = list(dict.fromkeys(s for m in per_run for s in m["splits"]))
    split_stats = {s: {k: stat(m["splits"][s][k] for m in per_run if s in m["splits"])
                       for k in ("succ_star", "succ", "last")} for s in splits}
    tasks = {}
    for s in splits:
        names = sorted({t for m in per_run if s in m["splits"] for t in m["splits"][s]["tasks"]})
        tasks[s] = {t: stat(m["splits"][s]["tasks"].get(t, math.nan) for m in per_run if s in m["splits"])
                    for t in names}
    return Summary(group.label, group.runs, {k: stat(m[k] for m in per_run) for k in SCALARS}, split_stats, tasks,
                   panel_digests(group.runs))


def select_complete(runs: Sequence[Run], include_incomplete: bool = False) -> tuple[list[Run], list[Run]]:
    """(runs to report, runs left out because they stopped before their last step)."""
    if include_incomplete:
        return list(runs), []
    return ([r for r in runs if r.last_step >= r.total_steps], [r for r in runs if r.last_step < r.total_steps])


# --- Markdown -----------------------------------------------------------------------------------

def _cell(stat: Stat, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± std [low, high]" (one seed: the value alone; none: n/a)."""
    if not math.isfinite(stat.mean):
        return "n/a"
    if stat.n < 2:
        return f"{stat.mean * scale:.{digits}f}"
    low, high = stat.ci
    return (f"{stat.mean * scale:.{digits}f} ± {stat.std * scale:.{digits}f} "
            f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]")


def _mean_cell(stat: Stat, scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat.mean * scale:.{digits}f}" if math.isfinite(stat.mean) else "n/a"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_splits(summaries: Sequence[Summary]) -> list[str]:
    return list(dict.fromkeys(s for summary in summaries for s in summary.splits))


def success_table(summaries: Sequence[Summary]) -> str:
    splits = report_splits(summaries)
    header = ["method", "seeds"] + [f"{s.upper()} {name}" for s in splits for name in ("Succ.*", "Succ.")]
    empty = Stat([], math.nan, math.nan, (math.nan, math.nan))
    rows = [[s.label, str(len(s.runs))] + [_cell(s.splits.get(split, {}).get(k, empty))
                                           for split in splits for k in ("succ_star", "succ")]
            for s in summaries]
    return _table(header, rows, numeric_from=1)


def training_table(summaries: Sequence[Summary]) -> str:
    header = ["method", "seeds", "train success, first 25% of steps", "train success, last 25%",
              "entropy first → last step", "Var(H) over all steps (x 1e-3)", "Var(H), 1st half", "Var(H), 2nd half"]
    rows = []
    for s in summaries:
        st = s.stats
        rows.append([s.label, str(len(s.runs)), _cell(st["train_first"]), _cell(st["train_last"]),
                     f"{_mean_cell(st['entropy_first'], 1, 3)} → {_mean_cell(st['entropy_last'], 1, 3)}",
                     _cell(st["entropy_var"], 1e3, 2), _cell(st["entropy_var_first_half"], 1e3, 2),
                     _cell(st["entropy_var_second_half"], 1e3, 2)])
    return _table(header, rows)


def task_table(summaries: Sequence[Summary], split: str) -> str:
    """Per-task Succ. (%, mean over seeds): one row per task, one column per group."""
    tasks = sorted({t for s in summaries for t in s.tasks.get(split, {})})
    empty = Stat([], math.nan, math.nan, (math.nan, math.nan))
    rows = [[t] + [_mean_cell(s.tasks.get(split, {}).get(t, empty)) for s in summaries] for t in tasks]
    return _table(["task"] + [s.label for s in summaries], rows)


def published_table(benchmarks: Iterable[str] = tuple(PUBLISHED)) -> str:
    rows = [[f"{PUBLISHED[b][0]} ({PUBLISHED[b][1]})", method] + [f"{v:.1f}" for v in values]
            for b in benchmarks for method, values in PUBLISHED[b][2].items()]
    return _table(["benchmark", "method", "IID Succ.*", "IID Succ.", "OOD Succ.*", "OOD Succ."], rows, numeric_from=2)


def beside_published(summaries: Sequence[Summary]) -> str:
    """Each group whose benchmark and method have a published Table 1 row, with that row under it;
    "" when none has."""
    rows = []
    empty = Stat([], math.nan, math.nan, (math.nan, math.nan))
    for s in summaries:
        env = s.runs[0].env_name
        if env not in PUBLISHED or s.label not in PUBLISHED[env][2]:
            continue
        benchmark, model, table = PUBLISHED[env]
        rows.append([s.label, f"this report ({len(s.runs)} seed{'s' if len(s.runs) != 1 else ''})"]
                    + [_cell(s.splits.get(split, {}).get(k, empty)) for split, k in PUBLISHED_COLUMNS])
        rows.append([s.label, f"{PUBLISHED_SOURCE}, {benchmark}, {model}"] + [f"{v:.1f}" for v in table[s.label]])
    if not rows:
        return ""
    return _table(["method", "source", "IID Succ.*", "IID Succ.", "OOD Succ.*", "OOD Succ."], rows, numeric_from=2)


def panel_notes(summaries: Sequence[Summary]) -> str:
    """Which panel each split was evaluated on, and whether every run shares it."""
    lines = [f"Evaluation panels (`epo_jax/envs/panels.py`): {panels_lib.RULE_SUMMARY}.", ""]
    for split in report_splits(summaries):
        digests = {s.panels.get(split, "unknown") for s in summaries}
        runs = [r for s in summaries for r in s.runs if r.panel and split in r.panel["splits"]]
        size = len(runs[0].panel["splits"][split]["episodes"]) if runs else None
        if len(digests) == 1 and not digests & {"unknown", "differs"}:
            lines.append(f"- {split.upper()}: every run evaluated the same {size} episodes "
                         f"(panel {digests.pop()}, rule {runs[0].panel['rule']}).")
        else:
            lines.append(f"- {split.upper()}: the runs were NOT evaluated on one shared panel "
                         f"({', '.join(sorted(digests))}); their success rates are not comparable episode for "
                         "episode (runs without eval_panel.json predate fixed panels).")
    return "\n".join(lines)


def config_differences(groups: Sequence[Group]) -> str:
    """The config fields that differ between the groups, per group."""
    varying = _varying_fields(groups)
    if not varying:
        return ""
    rows = [[g.label] + [str(g.config.get(k, "")) for k in varying] for g in groups]
    return _table(["method"] + varying, rows, numeric_from=len(varying) + 1)


def markdown(groups: Sequence[Group], summaries: Sequence[Summary], window: Window, *, published: str = "auto",
             figures: Sequence[str] = (), figures_rel: str = "", left_out: Sequence[Run] = (),
             resamples: int = 10_000) -> str:
    """The report's sections (level-2 headings), for `--out` or to embed in a longer document."""
    sections = [
        "## Success (%)\n\nMean ± standard deviation over seeds [bootstrap 95% interval of the mean, "
        f"{resamples} resamples of the seeds]. Succ.* = each seed's best evaluation; Succ. = the mean of "
        f"{window.describe()}; each then averaged over seeds.\n\n" + success_table(summaries)]
    beside = beside_published(summaries) if published in ("auto", "all") else ""
    if beside:
        sections.append(f"## Beside the published numbers\n\nSuccess % of {PUBLISHED_SOURCE} (3 seeds; the "
                        "paper's own evaluation episodes and model) under our rows of the same benchmark and "
                        "method.\n\n" + beside)
    if published == "all":
        sections.append(f"## The published Table 1, for context ({PUBLISHED_SOURCE})\n\n" + published_table())
    sections.append("## Training and entropy\n\nTraining success of the rollouts (%), the policy entropy (token "
                    "mean of each step's update batch, nats) and its variance across the RL steps of each seed "
                    "(x 1e-3); mean ± std [95% interval] over seeds.\n\n" + training_table(summaries))
    for split in report_splits(summaries):
        if any(s.tasks.get(split) for s in summaries):
            sections.append(f"## Per-task Succ. ({split.upper()}, %, mean over seeds)\n\n"
                            + task_table(summaries, split))
    sections.append("## Evaluation panels\n\n" + panel_notes(summaries))
    runs = "\n".join(f"- {s.label}: seeds {', '.join(map(str, s.seeds))} ({', '.join(r.path for r in s.runs)})"
                     for s in summaries)
    differences = config_differences(groups)
    sections.append("## Runs\n\n" + runs + ("\n\nWhat differs between the groups' configs:\n\n" + differences
                                              if differences else ""))
    if left_out:
        sections[-1] += ("\n\nLeft out (stopped before their last step): "
                         + ", ".join(f"{r.path} (step {r.last_step} of {r.total_steps})" for r in left_out) + ".")
    if figures:
        sections.append("## Figures\n\n" + "\n".join(f"![{f}]({figures_rel}/{f})" for f in figures))
    return "\n\n".join(sections) + "\n"


# --- Figures ------------------------------------------------------------------------------------

FIGURES = ("success_vs_step.png", "entropy_vs_step.png", "eval_success_vs_step.png",
           "success_and_entropy_variance.png")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("--figures needs matplotlib (pip install matplotlib, or pip install -e '.[test]'); "
                         "leave --figures out for the tables alone") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the finite values (window 1: unchanged)."""
    out = np.full_like(x, np.nan)
    for i in range(len(x)):
        part = x[max(0, i - window + 1):i + 1]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = part.mean()
    return out


def _curves_figure(plt, summaries, key: str, ylabel: str, smooth: int, colors):
    """One panel per advantage estimator: each group's mean curve over seeds, band = min..max."""
    families = list(dict.fromkeys(s.runs[0].config.get("algo.advantage", "") for s in summaries))
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        for i, s in enumerate(summaries):
            if s.runs[0].config.get("algo.advantage", "") != family:
                continue
            steps = max(r.total_steps for r in s.runs)
            curves = np.full((len(s.runs), steps), np.nan)
            for j, run in enumerate(s.runs):
                series = _smooth(_series(run, key), smooth)
                curves[j, :series.size] = series
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps (no seed logged them)
                mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
            x = np.arange(1, steps + 1)
            ax.plot(x, mean, color=colors[i], label=f"{s.label} (n={len(s.runs)})")
            ax.fill_between(x, low, high, color=colors[i], alpha=0.15, linewidth=0)
        ax.set(title=f"{_ADVANTAGE_NAMES.get(family, family)} family", xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mean over seeds; band = min..max over seeds")
    fig.tight_layout()
    return fig


def _eval_figure(plt, summaries, colors):
    splits = report_splits(summaries)
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for i, s in enumerate(summaries):
            by_step: dict[int, list[float]] = {}
            for run in s.runs:
                for step, value in eval_points(run.records, f"eval/{split}/success_rate"):
                    by_step.setdefault(step, []).append(value)
            xs = sorted(by_step)
            if xs:
                ax.errorbar(xs, [np.mean(by_step[x]) for x in xs], yerr=[np.std(by_step[x]) for x in xs],
                            color=colors[i], label=s.label, marker="o", capsize=3, markersize=3)
        ax.set(title=f"{split.upper()} evaluation success (mean ± std over seeds)", xlabel="RL step",
               ylabel="success rate", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bars_figure(plt, summaries):
    """Succ. per split with its bootstrap interval, and Var(H) of each half of the run."""
    splits = report_splits(summaries)
    x = np.arange(len(summaries))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(splits))
    for k, split in enumerate(splits):
        stats = [s.splits.get(split, {}).get("succ") for s in summaries]
        means = [st.mean if st else np.nan for st in stats]
        errors = np.array([[m - st.ci[0], st.ci[1] - m] if st and st.n > 1 else [0, 0]
                           for st, m in zip(stats, means)]).T
        axes[0].bar(x + (k - (len(splits) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
                    label=split.upper())
    axes[0].set(title="Succ. (mean over seeds, bootstrap 95% interval)", ylim=(0, 1.05))
    for k, (key, label) in enumerate((("entropy_var_first_half", "first half"),
                                      ("entropy_var_second_half", "second half"))):
        stats = [s.stats[key] for s in summaries]
        axes[1].bar(x + (k - 0.5) * 0.4, [st.mean for st in stats], 0.4,
                    yerr=[st.std if st.n > 1 else 0 for st in stats], capsize=3, label=label)
    axes[1].set(title="variance of the policy entropy across RL steps (± std over seeds)")
    for ax in axes:
        ax.set_xticks(x, [s.label for s in summaries], rotation=25, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(summaries: Sequence[Summary], fig_dir: str | pathlib.Path) -> list[str]:
    """Writes FIGURES into `fig_dir`; returns their file names."""
    plt = _pyplot()
    fig_dir = pathlib.Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(summaries))]
    steps = max(r.total_steps for s in summaries for r in s.runs)
    figures = [
        _curves_figure(plt, summaries, "success_rate", f"train success rate (moving average of "
                       f"{max(1, steps // 10)} steps)", max(1, steps // 10), colors),
        _curves_figure(plt, summaries, "entropy", "policy entropy (token mean, nats)", 1, colors),
        _eval_figure(plt, summaries, colors),
        _bars_figure(plt, summaries)]
    for name, fig in zip(FIGURES, figures):
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
    return list(FIGURES)


# --- Command line -------------------------------------------------------------------------------

def build(patterns: Sequence[str], *, window: str = DEFAULT_WINDOW, ignore: Sequence[str] = DEFAULT_IGNORE,
          include_incomplete: bool = False, resamples: int = 10_000, confidence: float = 0.95,
          bootstrap_seed: int = 0) -> tuple[list[Group], list[Summary], list[Run]]:
    """Loads, filters, groups and summarizes the runs: (groups, their summaries, runs left out)."""
    chosen = parse_window(window)
    runs, left_out = select_complete([load_run(p) for p in find_run_dirs(patterns)], include_incomplete)
    if not runs:
        raise ValueError("every run stopped before its last step; pass --include-incomplete to report them")
    groups = group_runs(runs, ignore)
    summaries = [summarize(g, chosen, resamples=resamples, confidence=confidence, seed=bootstrap_seed)
                 for g in groups]
    return groups, summaries, left_out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epo_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run work directories, folders holding them, or globs")
    parser.add_argument("--out", default="", help="markdown file to write (default: print it)")
    parser.add_argument("--figures", default="", help="folder for the PNG figures (needs matplotlib)")
    parser.add_argument("--window", default=DEFAULT_WINDOW, help="Succ.'s convergence window: paper (= last:0.2) "
                        "| final (= evals:1) | last:F | steps:A-B | evals:N")
    parser.add_argument("--published", choices=("auto", "all", "none"), default="auto",
                        help="EPO's Table 1 beside matching rows (auto), plus the whole table (all), or not")
    parser.add_argument("--ignore", action="append", default=[],
                        help="config field (or section) to ignore when grouping, besides seed and workdir")
    parser.add_argument("--include-incomplete", action="store_true", help="also report runs that stopped early")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap's generator")
    parser.add_argument("--json", default="", help="also write every statistic as JSON here")
    args = parser.parse_args(argv)
    try:
        groups, summaries, left_out = build(
            args.runs, window=args.window, ignore=DEFAULT_IGNORE + tuple(args.ignore),
            include_incomplete=args.include_incomplete, resamples=args.resamples, bootstrap_seed=args.bootstrap_seed)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    figures, rel = [], ""
    if args.figures:
        figures = plot(summaries, args.figures)
        base = pathlib.Path(args.out).resolve().parent if args.out else pathlib.Path.cwd()
        rel = pathlib.Path(os.path.relpath(pathlib.Path(args.figures).resolve(), base)).as_posix()
    text = "# Results\n\n" + markdown(groups, summaries, parse_window(args.window), published=args.published,
                                      figures=figures, figures_rel=rel, left_out=left_out,
                                      resamples=args.resamples)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    else:
        print(text, end="")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"window": args.window,
                                                       "groups": [s.to_json() for s in summaries]},
                                                      indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
