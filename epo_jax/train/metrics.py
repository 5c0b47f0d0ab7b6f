"""Run metrics: a JSONL log, TensorBoard event files, optionally a Weights & Biases run, and a
readable progress line.

Only process 0 writes. The work directory may be local or remote (e.g. `gs://bucket/run`,
through `etils.epath`): a remote JSONL is rewritten whole at each write (objects there cannot be
appended to); TensorBoard events (at each write) and W&B's run folder (at close) are written
locally and copied over. Every record carries its RL step. A resumed run first drops the records
logged after its checkpoint (steps that will be run again), so the log never repeats or skips a
step. TensorBoard handles the same case itself: a later event for a step replaces an earlier one
in its plots.

W&B (`logging.wandb=True`) gets the same scalars, the run config and, at each evaluation, a table
of per-task results per eval split. Its run id is kept in `<workdir>/wandb_run_id`, so a resumed
run continues the same W&B run (`resume="allow"`). W&B's own `_step` must only grow, and a resumed
run logs again the steps after its checkpoint, so every chart is plotted against the logged
`rl_step` instead: the re-run steps are kept beside the first attempt's rather than dropped.
`WANDB_MODE=offline` (or any other W&B environment variable) is honoured by wandb itself;
offline runs land in `<workdir>/wandb/offline-run-*` for a later `wandb sync`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from epo_jax.errors import UserError

# Short names of the progress line, in display order.
_PROGRESS_FIELDS = (
    ("success_rate", "succ", "{:.2f}"),
    ("reward_mean", "rew", "{:+.2f}"),
    ("score_mean", "score", "{:.1f}"),
    ("valid_turn_rate", "valid", "{:.2f}"),
    ("entropy", "H", "{:.3f}"),
    ("epo/beta", "beta", "{:.3f}"),
    ("epo/smooth_penalty", "pen", "{:.4f}"),
    ("pg_clipfrac", "clip", "{:.3f}"),
    ("ppo_kl", "kl", "{:+.4f}"),
    ("drift/logprob_diff_mean", "drift", "{:.1e}"),  # mean |log p_trainer - log p_sampler|
    ("time/rollout_s", "roll", "{:.1f}s"),
    ("time/update_s", "upd", "{:.1f}s"),
    ("throughput/rollout_tokens_per_s", "tok/s", "{:.0f}"),
)
# Shown only when non-zero: minibatch updates skipped for a non-finite loss, gradient or result.
_PROGRESS_ALERTS = (("skipped", "skipped updates", "{:.0f}"),)

WANDB_RUN_ID_FILE = "wandb_run_id"
WANDB_STEP_KEY = "rl_step"  # the x axis of every W&B chart


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """Where a W&B run goes and what it is called (`config.logging.wandb_*`). An empty `entity`
    is the W&B account's default; an empty `run_name` names the run after the work directory's
    folder."""
    project: str
    entity: str = ""
    run_name: str = ""
    tags: Sequence[str] = ()

    @classmethod
    def from_logging_config(cls, logging_config) -> "WandbOptions | None":
        """The options of `config.logging`, or None when `logging.wandb` is off."""
        if not logging_config.get("wandb", False):
            return None
        return cls(project=logging_config.wandb_project, entity=logging_config.wandb_entity,
                   run_name=logging_config.wandb_run_name, tags=tuple(logging_config.wandb_tags))


def _to_scalar(value: Any) -> float | None:
    try:
        scalar = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return scalar


class MetricsWriter:
    """Writes scalar metrics to `<workdir>/metrics.jsonl`, TensorBoard events and, with `wandb`
    options, a W&B run."""

    def __init__(self, workdir: str, *, resume_step: int = 0, jsonl: bool = True,
                 tensorboard: bool = True, wandb: WandbOptions | None = None,
                 run_config: Mapping[str, Any] | None = None, enabled: bool = True):
        """`resume_step`: the step of the checkpoint the run resumes from; records of later
        steps (logged before a crash, and about to be run again) are dropped. `run_config`: the
        run's config as plain values, stored with the W&B run."""
        self._jsonl_path = None
        self._records: list[dict[str, Any]] = []
        self._tb = None
        self._tb_local = self._tb_remote = None
        self._wandb_run = None
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
        if wandb is not None:
            self._start_wandb(root, wandb, run_config)

    @classmethod
    def from_config(cls, config, workdir: str, *, resume_step: int = 0,
                    enabled: bool = True) -> "MetricsWriter":
        """The writer a run config asks for (`config.logging`), with the config stored in W&B."""
        wandb = WandbOptions.from_logging_config(config.logging)
        run_config = json.loads(config.to_json_best_effort()) if wandb is not None else None
        return cls(workdir, resume_step=resume_step, jsonl=config.logging.jsonl,
                   tensorboard=config.logging.tensorboard, wandb=wandb, run_config=run_config,
                   enabled=enabled)

    def _start_wandb(self, root: epath.Path, options: WandbOptions,
                     run_config: Mapping[str, Any] | None) -> None:
        """Starts (or, with the id kept in the work directory, resumes) the W&B run."""
        try:
            import wandb
        except ImportError as e:
            raise UserError("logging.wandb=True needs the wandb package: pip install 'epo-jax[wandb]' "
                            "(or set --config.logging.wandb=False)") from e
        id_file = root / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B picks one
        # wandb writes into <dir>/wandb/; on a remote work directory that happens locally and is
        # copied over at close, like the TensorBoard events.
        self._wandb_local = tempfile.mkdtemp(prefix="epo_jax_wandb_") if self._remote else str(root)
        self._wandb_remote = root
        self._wandb_run = wandb.init(
            project=options.project, entity=options.entity or None,
            name=options.run_name or root.name, tags=list(options.tags),
            config=dict(run_config or {}), dir=self._wandb_local, id=run_id, resume="allow")
        id_file.write_text(self._wandb_run.id + "\n")
        self._wandb_run.define_metric(WANDB_STEP_KEY)
        self._wandb_run.define_metric("*", step_metric=WANDB_STEP_KEY)

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
                _copy_tree(self._tb_local, self._tb_remote)
        if self._wandb_run is not None:
            self._wandb_run.log({**scalars, **_wandb_tables(scalars), WANDB_STEP_KEY: int(step)})
        return scalars

    def close(self) -> None:
        """Flushes and closes every sink. Called while an exception propagates (from a `finally`),
        it marks the W&B run failed (exit code 1) rather than finished."""
        self._jsonl_path = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._remote:
                _copy_tree(self._tb_local, self._tb_remote)
                shutil.rmtree(self._tb_local, ignore_errors=True)
        if self._wandb_run is not None:
            import wandb
            exit_code = 1 if sys.exc_info()[0] is not None else 0
            self._wandb_run.finish(exit_code=exit_code)
            # finish() can return before wandb's service process has written the run's last
            # records (seen offline with wandb 0.31); teardown waits for them, so the run folder
            # is complete when it is copied or read.
            wandb.teardown(exit_code=exit_code)
            self._wandb_run = None
            if self._remote:
                _copy_tree(os.path.join(self._wandb_local, "wandb"), self._wandb_remote / "wandb")
                shutil.rmtree(self._wandb_local, ignore_errors=True)


def per_task_tables(scalars: Mapping[str, float]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The per-task eval scalars `eval/<split>/<metric>/<task>` as one table per split:
    {"eval/<split>/per_task": (["task", <metric>, ...], rows sorted by task)}; a metric a task
    lacks is None."""
    by_split: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in scalars.items():
        parts = key.split("/", 3)
        if len(parts) == 4 and parts[0] == "eval":
            _, split, metric, task = parts
            by_split.setdefault(split, {}).setdefault(task, {})[metric] = value
    tables = {}
    for split, tasks in by_split.items():
        metrics = sorted({m for values in tasks.values() for m in values})
        rows = [[task, *(tasks[task].get(m) for m in metrics)] for task in sorted(tasks)]
        tables[f"eval/{split}/per_task"] = (["task", *metrics], rows)
    return tables


def _wandb_tables(scalars: Mapping[str, float]) -> dict[str, Any]:
    import wandb  # importable: the writer's W&B run started
    return {key: wandb.Table(columns=columns, data=rows)
            for key, (columns, rows) in per_task_tables(scalars).items()}


def _copy_tree(local_dir: str, remote_dir: epath.Path) -> None:
    """Copies the files below a local folder to a remote one (object stores have no rename or
    append: each file is written whole)."""
    for folder, _, files in os.walk(local_dir):
        relative = os.path.relpath(folder, local_dir)
        target = remote_dir if relative == "." else remote_dir / relative
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).write_bytes(epath.Path(folder, name).read_bytes())


def is_remote(path: str) -> bool:
    """A URL-style path (gs://, s3://, ...) rather than a local one."""
    return "://" in str(path)


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """One human-readable line per RL step."""
    parts = [f"step {step}/{total_steps}"]
    for key, short, fmt in _PROGRESS_FIELDS:
        if key in scalars and scalars[key] is not None and math.isfinite(scalars[key]):
            parts.append(f"{short} " + fmt.format(scalars[key]))
    for key, short, fmt in _PROGRESS_ALERTS:
        if scalars.get(key):
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
