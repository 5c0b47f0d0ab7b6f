"""Checkpoints with orbax: the whole train state plus the run's JSON metadata.

What a resumed run needs to continue as if never stopped: parameters, optimizer state, EPO's
entropy history, PRNG key and step (all in the `state` pytree), and the environment task cursor
(in `meta`, JSON). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a kill mid-save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """Keep-N checkpoints of (state pytree, JSON meta) under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        # Local paths made absolute (orbax needs that); gs:// and other URLs go to orbax as they are.
        directory = (epath.Path(workdir) / "checkpoints" if "://" in str(workdir)
                     else epath.Path(os.path.abspath(workdir)) / "checkpoints")
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving (asynchronously when enabled); `wait()` or the next save finishes it."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings and dtypes of `abstract_state` (a pytree of arrays or
        jax.ShapeDtypeStruct), so a run resumes sharded as it was configured now."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
