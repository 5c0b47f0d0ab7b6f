"""Checkpoints with orbax: the whole train state plus the run's JSON metadata, verified on restore.

What a resumed run needs to continue as if never stopped: parameters, optimizer state, EPO's
entropy history, PRNG key and step (all in the `state` pytree), and the environment task cursor
(in `meta`, JSON). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a kill mid-save leaves the previous checkpoint as the latest.

What a finished save can still suffer (a disk or copy that flips bytes, a truncated file, a lost
`_METADATA`) orbax does not verify: a flipped byte can load as a wrong number, and a damaged
file ends in a cascade of tracebacks. So every save records a fingerprint of the state in `meta` (per leaf: its shape,
dtype and two 32-bit checksums of its bits, computed on device in one pass that also counts
non-finite values), and every restore recomputes it. A checkpoint that cannot be read or does
not match its fingerprint is moved to `<workdir>/rejected_checkpoints/` (nothing is deleted) with
a one-line warning, and the next older one is tried. A state with a NaN or inf anywhere is never
written.

Before a run resumes, `check_resume_config` compares the config the run was started with (its
`config.json`) with the new one: only fields that leave the experiment as it was may differ.

Before any data is read, the fingerprint's leaf list is compared with the state this run builds:
a checkpoint of another model or algorithm is refused naming the leaves that differ, and left
where it is (it is not damaged, only not this run's).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

RUN_CONFIG_FILE = "config.json"
FINGERPRINT_KEY = "fingerprint"
REJECTED_DIR = "rejected_checkpoints"
_FINGERPRINT_VERSION = 1
_SHOWN_LEAVES = 4  # leaves named in one message; the count says how many more


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or its data does not match its fingerprint."""


class IncompatibleCheckpointError(ValueError):
    """A sound checkpoint whose state has other leaves, shapes or dtypes than this run's state."""


class NonFiniteStateError(ValueError):
    """A state holding NaN or inf, which must never be written to a checkpoint."""


def _leaf_words(x: jax.Array) -> jax.Array:
    """The bits of a leaf as a flat uint32 vector (16- and 8-bit values widened, 64-bit split)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jnp.dtype(x.dtype).itemsize * 8
    words = jax.lax.bitcast_convert_type(x, jnp.uint32 if bits == 64 else jnp.dtype(f"uint{bits}"))
    return words.astype(jnp.uint32).reshape(-1)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """[sum of words, sum of (2i + 1) x word_i, non-finite count], uint32 arithmetic mod 2^32.

    A changed word changes the first sum; the odd weights make the second one change too, and
    catch words swapped between positions. Integer sums are exact and order-free, so the value
    does not depend on how the leaf is sharded or reduced.
    """
    words = _leaf_words(x)
    weights = 2 * jnp.arange(words.shape[0], dtype=jnp.uint32) + 1
    floating = jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)
    non_finite = jnp.sum(~jnp.isfinite(x)).astype(jnp.uint32) if floating else jnp.uint32(0)
    return jnp.stack([jnp.sum(words), jnp.sum(words * weights), non_finite])


_fingerprint_leaves = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def _leaf_specs(state: Any) -> dict[str, tuple[list[int], str]]:
    """Leaf path -> (shape, dtype name) of a pytree of arrays or jax.ShapeDtypeStruct."""
    return {jax.tree_util.keystr(path): (list(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def fingerprint(state: Any) -> dict[str, Any]:
    """The JSON fingerprint of a state: leaf path -> [shape, dtype, sum, weighted sum, non-finite].

    One jitted pass over the state on its devices; only three numbers per leaf reach the host.
    Leaves must be jax arrays.
    """
    paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    # One call per set of devices (a jitted call takes arrays of one device set only).
    groups: dict[frozenset, list[int]] = {}
    for i, (_, leaf) in enumerate(paths_leaves):
        groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
    sums: list[Any] = [None] * len(paths_leaves)
    for indices in groups.values():
        for i, s in zip(indices, _fingerprint_leaves([paths_leaves[i][1] for i in indices])):
            sums[i] = np.asarray(s if s.is_fully_addressable else s.addressable_data(0))
    leaves = {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype), *map(int, s)]
              for (path, leaf), s in zip(paths_leaves, sums)}
    return {"version": _FINGERPRINT_VERSION, "leaves": leaves}


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_LEAVES])
    return shown + (f" and {len(names) - _SHOWN_LEAVES} more" if len(names) > _SHOWN_LEAVES else "")


def _check_compatible(saved: dict[str, list], target: Any, where: str) -> None:
    """Raises IncompatibleCheckpointError naming the leaves whose path, shape or dtype differ."""
    expected = _leaf_specs(target)
    problems = []
    missing = [p for p in expected if p not in saved]
    extra = [p for p in saved if p not in expected]
    if missing:
        problems.append(f"this run's state has leaves the checkpoint lacks: {_listing(missing)}")
    if extra:
        problems.append(f"the checkpoint has leaves this run's state lacks: {_listing(extra)}")
    differing = [f"{p} is {tuple(saved[p][0])} {saved[p][1]} there, {tuple(shape)} {dtype} here"
                 for p, (shape, dtype) in expected.items()
                 if p in saved and (list(saved[p][0]), saved[p][1]) != (shape, dtype)]
    if differing:
        problems.append(_listing(differing))
    if problems:
        raise IncompatibleCheckpointError(
            f"{where} holds another model's or algorithm's state ({'; '.join(problems)}); resume it with "
            "the config it was written with, or start this config in a new workdir")


def _check_fingerprint(saved: dict[str, list], restored: dict[str, list]) -> None:
    bad = [path for path, values in saved.items() if restored[path][2:4] != values[2:4]]
    if bad:
        raise CheckpointError(f"its data does not match the fingerprint written with it "
                              f"({len(bad)} of {len(saved)} leaves differ: {_listing(bad)})")


def _non_finite(fp: dict[str, Any]) -> list[str]:
    return [f"{path} ({values[4]})" for path, values in fp["leaves"].items() if values[4]]


def _first_line(error: BaseException) -> str:
    """The root cause's type and first line (orbax wraps tensorstore's precise message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _is_abandoned_read_echo(unraisable: Any) -> bool:
    """Whether an unraisable exception comes from a restore's abandoned reads (see below)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:  # a read coroutine of orbax's, collected after its restore failed
        return os.path.dirname(ocp.__file__) in code.co_filename
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            and bool(frames) and frames[-1].name in ("call_soon_threadsafe", "_check_closed"))


def _silence_abandoned_reads() -> None:
    """Drops the follow-on errors of failed restores from here on, for the rest of the process.

    When one array of a damaged checkpoint fails to read, orbax abandons the other reads of that
    restore; their coroutines and tensorstore callbacks then fail against a closed event loop,
    some of them seconds later, and print hundreds of tracebacks that bury the one-line cause.
    Only those two kinds are dropped; every other unraisable exception reaches the usual hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read_echo(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def _processes_agree(ok: bool) -> bool:
    """Whether every process found its restore sound (one process alone decides alone)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


# Fields a resumed run may change: where and how often it is observed and saved, how the same
# computation is laid out on devices, hosts and memory, and operational limits. Everything else
# defines the experiment: model, rollout, environment, algorithm, EPO, optimiser, seed, and
# train.total_steps, which sets the learning-rate schedule and EPO's phase-weight horizon K, so a
# run extended or cut short would not continue on the schedule it followed.
RESUMABLE_CHANGES = (
    "workdir", "eval.", "logging.", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "mesh.", "distributed.", "model.remat", "model.logprob_chunk_size", "rollout.prompt_buckets",
    "env.step_timeout_s", "env.jvm_heap")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict, dict, list[str]]:
    """(resumable, refused, unrecorded) differences between two run configs as JSON dicts.

    resumable / refused: dotted field -> (saved value, new value) for fields both configs hold;
    unrecorded: fields only one of them holds (added to or removed from the code since the run
    started: there is nothing to compare them with).
    """
    before, after = _flatten(saved), _flatten(new)
    resumable, refused = {}, {}
    for field in sorted(set(before) & set(after)):
        if before[field] != after[field]:
            allowed = any(field == name or (name.endswith(".") and field.startswith(name))
                          for name in RESUMABLE_CHANGES)
            (resumable if allowed else refused)[field] = (before[field], after[field])
    return resumable, refused, sorted(set(before) ^ set(after))


def check_resume_config(workdir: str, config: Any) -> None:
    """Raises ValueError naming every field that differs from `<workdir>/config.json` and may not
    change on resume; logs the changes that may. A run without config.json is not checked."""
    path = epath.Path(workdir) / RUN_CONFIG_FILE
    if not path.exists():
        logging.warning("%s is missing: cannot check that this config matches the run being resumed", path)
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it, or start the run in a new "
                         "workdir") from error
    resumable, refused, unrecorded = config_changes(saved, json.loads(config.to_json_best_effort()))

    def listing(changes: dict) -> str:
        return ", ".join(f"{field} ({old!r} -> {new!r})" for field, (old, new) in changes.items())

    if refused:
        raise ValueError(
            f"workdir {workdir!r} holds a run started with another config, and these fields cannot change "
            f"on resume: {listing(refused)}; set them back to the run's values, or start this config in a "
            f"new workdir (--config.workdir=...). Fields that may change: {', '.join(RESUMABLE_CHANGES)}")
    if resumable:
        logging.warning("resuming %s with changed %s", workdir, listing(resumable))
    if unrecorded:
        logging.warning("resuming %s: fields %s are not in both the run's config.json and this config "
                        "(the code changed since); the current values apply", workdir, ", ".join(unrecorded))


class Checkpointer:
    """Keep-N checkpoints of (state pytree, JSON meta) under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        # Local paths made absolute (orbax needs that); gs:// and other URLs go to orbax as they are.
        root = epath.Path(workdir) if "://" in str(workdir) else epath.Path(os.path.abspath(workdir))
        self._rejected_dir = root / REJECTED_DIR
        self._manager = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving (asynchronously when enabled); `wait()` or the next save finishes it.

        Raises NonFiniteStateError (and writes nothing) if any leaf holds NaN or inf.
        """
        fp = fingerprint(state)
        non_finite = _non_finite(fp)
        if non_finite:
            raise NonFiniteStateError(
                f"refusing to write checkpoint {step}: the train state holds non-finite values in "
                f"{len(non_finite)} leaves ({_listing(non_finite)}); the checkpoints already in "
                f"{self.directory} are untouched")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, FINGERPRINT_KEY: fp})))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings and dtypes of `abstract_state` (a pytree of arrays or
        jax.ShapeDtypeStruct), so a run resumes sharded as it was configured now.

        `step` None: the newest checkpoint that reads back and matches its fingerprint; each
        newer one that does not is set aside in `<workdir>/rejected_checkpoints` with a warning.
        A given `step` is restored or raises CheckpointError, and nothing is moved.
        Raises IncompatibleCheckpointError for a checkpoint of another state structure.
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        if step is not None:
            return self._restore_verified(step, abstract_state, target)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        rejected = []
        for candidate in steps:
            try:
                return self._restore_verified(candidate, abstract_state, target)
            except CheckpointError as error:
                moved = self._set_aside(candidate)
                older = [s for s in steps if s < candidate]
                logging.warning("checkpoint %d in %s is not usable: %s; moved to %s, %s", candidate,
                                self.directory, error, moved,
                                f"falling back to step {older[0]}" if older else "no older checkpoint left")
                rejected.append(f"{candidate} ({error})")
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: {'; '.join(rejected)}. They were moved to "
            f"{self._rejected_dir}; rerun to start the run from step 0, or restore them from a copy")

    def _restore_verified(self, step: int, abstract_state: Any, target: Any) -> tuple[Any, dict[str, Any]]:
        where = f"checkpoint {step} in {self.directory}"
        error_text = "on another process"
        try:
            meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as error:  # orbax raises many types for a damaged folder; all mean "unreadable"
            meta, error_text = None, _first_line(error)
        if not _processes_agree(meta is not None):
            raise CheckpointError(f"its meta data cannot be read ({error_text})")
        saved_fp = meta.pop(FINGERPRINT_KEY, None)
        if saved_fp is not None and not (isinstance(saved_fp, dict) and isinstance(saved_fp.get("leaves"), dict)):
            raise CheckpointError(f"its fingerprint is malformed ({str(saved_fp)[:80]})")
        if saved_fp is None:
            logging.warning("%s has no fingerprint (written by an older version); restoring it unverified", where)
        else:
            _check_compatible({p: v[:2] for p, v in saved_fp["leaves"].items()}, abstract_state, where)
        _silence_abandoned_reads()  # some echoes of a failing read come before orbax raises
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target))).state
        except Exception as error:  # as above: a truncated file, a missing _METADATA, a bad manifest
            restored, error_text = None, _first_line(error)
        if not _processes_agree(restored is not None):
            raise CheckpointError(f"its state cannot be read ({error_text})")
        if saved_fp is not None:
            _check_fingerprint(saved_fp["leaves"], fingerprint(restored)["leaves"])
        return restored, meta

    def _set_aside(self, step: int) -> epath.Path:
        """Moves a step's folder out of orbax's view into `<workdir>/rejected_checkpoints/<step>[-n]`."""
        source = self.directory / str(step)
        destination = self._rejected_dir / str(step)
        if jax.process_index() == 0:
            self._rejected_dir.mkdir(parents=True, exist_ok=True)
            n = 1
            while destination.exists():
                destination, n = self._rejected_dir / f"{step}-{n}", n + 1
            source.rename(destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return destination

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
