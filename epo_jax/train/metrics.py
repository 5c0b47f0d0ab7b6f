"""Run metrics: a JSONL log, TensorBoard event files and a readable progress line.

Only process 0 writes. Every record carries its RL step. A resumed run first drops the records
logged after its checkpoint (steps that will be run again), so the log never repeats or skips
a step. TensorBoard handles the same case itself: a later event for a step replaces an
earlier one in its plots.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

# Short names of the progress line, in display order.
_PROGRESS_FIELDS = (
    ("success_rate", "succ", "{:.2f}"),
    ("reward_mean", "rew", "{:+.2f}"),
    ("entropy", "H", "{:.3f}"),
    ("epo/beta", "beta", "{:.3f}"),
    ("epo/smooth_penalty", "pen", "{:.4f}"),
    ("pg_clipfrac", "clip", "{:.3f}"),
    ("ppo_kl", "kl", "{:+.4f}"),
    ("time/rollout_s", "roll", "{:.1f}s"),
    ("time/update_s", "upd", "{:.1f}s"),
    ("throughput/rollout_tokens_per_s", "tok/s", "{:.0f}"),
)


def _to_scalar(value: Any) -> float | None:
    try:
        scalar = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return scalar


class MetricsWriter:
    """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard events."""

    def __init__(self, workdir: str, *, resume_step: int = 0, jsonl: bool = True,
                 tensorboard: bool = True, enabled: bool = True):
        """`resume_step`: the step of the checkpoint the run resumes from; records of later
        steps (logged before a crash, and about to be run again) are dropped."""
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if jsonl:
            path = os.path.join(workdir, "metrics.jsonl")
            _truncate_after(path, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes every scalar of `metrics` at `step`; returns them as floats."""
        scalars = {}
        for key, value in metrics.items():
            scalar = _to_scalar(value)
            if scalar is not None:
                scalars[key] = scalar
        if self._jsonl is not None:
            record = {"step": int(step), **{k: (v if math.isfinite(v) else None)
                                            for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        return scalars

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """One human-readable line per RL step."""
    parts = [f"step {step}/{total_steps}"]
    for key, short, fmt in _PROGRESS_FIELDS:
        if key in scalars and scalars[key] is not None and math.isfinite(scalars[key]):
            parts.append(f"{short} " + fmt.format(scalars[key]))
    return " | ".join(parts)


def _truncate_after(path: str, step: int) -> None:
    """Keeps the records of steps <= `step` (atomically: write a copy, then rename)."""
    if not os.path.exists(path):
        return
    kept = [record for record in read_jsonl(path) if record["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl into a list of records; a torn last line (a kill mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
