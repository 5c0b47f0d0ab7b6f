"""Run metrics: a JSONL log, TensorBoard event files and a readable progress line.

Only process 0 writes. The work directory may be local or remote (e.g. `gs://bucket/run`,
through `etils.epath`): a remote JSONL is rewritten whole at each write (objects there cannot be
appended to) and TensorBoard events are written locally and copied over. Every record carries its RL step. A resumed run first drops the records
logged after its checkpoint (steps that will be run again), so the log never repeats or skips
a step. TensorBoard handles the same case itself: a later event for a step replaces an
earlier one in its plots.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
from etils import epath

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
        self._jsonl_path = None
        self._records: list[dict[str, Any]] = []
        self._tb = None
        self._tb_local = self._tb_remote = None
        if not enabled:
            return
        root = epath.Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self._remote = is_remote(workdir)
        if jsonl:
            self._jsonl_path = root / "metrics.jsonl"
            if self._jsonl_path.exists():
                self._records = [r for r in read_jsonl(self._jsonl_path) if r["step"] <= resume_step]
            self._rewrite_jsonl()
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb_remote = root / "tensorboard"
            self._tb_local = (tempfile.mkdtemp(prefix="epo_jax_tb_") if self._remote
                              else str(self._tb_remote))
            self._tb = SummaryWriter(self._tb_local)

    def _rewrite_jsonl(self) -> None:
        """Writes all records atomically (a copy, then a rename where the filesystem has one)."""
        text = "".join(json.dumps(r) + "\n" for r in self._records)
        if self._remote:
            self._jsonl_path.write_text(text)
            return
        tmp = self._jsonl_path.with_name("metrics.jsonl.tmp")
        tmp.write_text(text)
        os.replace(tmp, self._jsonl_path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes every scalar of `metrics` at `step`; returns them as floats."""
        scalars = {}
        for key, value in metrics.items():
            scalar = _to_scalar(value)
            if scalar is not None:
                scalars[key] = scalar
        if self._jsonl_path is not None:
            record = {"step": int(step), **{k: (v if math.isfinite(v) else None)
                                            for k, v in scalars.items()}}
            self._records.append(record)
            if self._remote:
                self._rewrite_jsonl()
            else:
                with open(self._jsonl_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
            if self._remote:
                self._copy_tensorboard()
        return scalars

    def _copy_tensorboard(self) -> None:
        self._tb_remote.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self._tb_local):
            (self._tb_remote / name).write_bytes(epath.Path(self._tb_local, name).read_bytes())

    def close(self) -> None:
        self._jsonl_path = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._remote:
                self._copy_tensorboard()
                shutil.rmtree(self._tb_local, ignore_errors=True)


def is_remote(path: str) -> bool:
    """A URL-style path (gs://, s3://, ...) rather than a local one."""
    return "://" in str(path)


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """One human-readable line per RL step."""
    parts = [f"step {step}/{total_steps}"]
    for key, short, fmt in _PROGRESS_FIELDS:
        if key in scalars and scalars[key] is not None and math.isfinite(scalars[key]):
            parts.append(f"{short} " + fmt.format(scalars[key]))
    return " | ".join(parts)


def read_jsonl(path) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl (local or remote) into a list of records; a torn last line (a kill
    mid-write) is skipped."""
    records = []
    for line in epath.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
