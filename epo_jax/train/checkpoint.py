"""Checkpoints with orbax: the whole train state plus the run's JSON metadata, verified on restore.

What a resumed run needs to continue as if never stopped: parameters, optimizer state, EPO's
entropy history, PRNG key and step (all in the `state` pytree), and the environment task cursor
(in `meta`, JSON). Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a kill mid-save leaves the previous checkpoint as the latest.

What a finished save can still suffer (a disk or copy that flips bytes, a truncated file, a lost
`_METADATA`) orbax does not verify: a flipped byte can load as a wrong number, and a damaged
file ends in a cascade of tracebacks. So every save records a fingerprint of the state in `meta`
(per leaf: its shape, dtype and two 32-bit checksums of its bits, taken where the state lies,
while orbax writes), and every restore recomputes it. A checkpoint that cannot be read or does
not match its fingerprint is moved to `<workdir>/rejected_checkpoints/` (nothing is deleted)
with a one-line warning, and the next older one is tried. A state with a NaN or inf anywhere is never written.

Before a run resumes, `check_resume_config` compares the config the run was started with (its
`config.json`) with the new one: only fields that leave the experiment as it was may differ.

Before any data is read, the fingerprint's leaf list is compared with the state this run builds:
a checkpoint of another model or algorithm is refused naming the leaves that differ, and left
where it is (it is not damaged, only not this run's).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from epo_jax.errors import ConfigError, UserError

RUN_CONFIG_FILE = "config.json"
FINGERPRINT_KEY = "fingerprint"
REJECTED_DIR = "rejected_checkpoints"
_FINGERPRINT_VERSION = 2
_SHOWN_LEAVES = 4  # leaves named in one message; the count says how many more


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, or its data does not match its fingerprint."""


class IncompatibleCheckpointError(UserError, ValueError):
    """A sound checkpoint whose state has other leaves, shapes or dtypes than this run's state."""


class NonFiniteStateError(UserError, ValueError):
    """A state holding NaN or inf, which must never be written to a checkpoint."""


# The checksums of a leaf, over its bits as unsigned words u_i (flat, row-major; 16- and 8-bit
# values widened to 32 bits, 64-bit ones split into two words), in uint32 arithmetic mod 2^32:
#   sum      = sum_i u_i
#   weighted = sum_i (2 floor(i / _ROW_WORDS) + 1) u_i
# A changed word changes the sum; the odd weights make the weighted sum change too, and catch
# blocks of words that moved. Integer sums are exact and order-free: the values do not depend on
# how a leaf is sharded, reduced or on which backend, so a checkpoint verifies on any mesh.
_ROW_WORDS = 1024
_MOD = 2**32


@functools.lru_cache(maxsize=None)
def _is_key_dtype(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_key(x: Any) -> bool:
    return _is_key_dtype(x.dtype)


def _device_words(x: jax.Array) -> jax.Array:
    if _is_key(x):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jnp.dtype(x.dtype).itemsize * 8
    words = jax.lax.bitcast_convert_type(x, jnp.uint32 if bits == 64 else jnp.dtype(f"uint{bits}"))
    return words.astype(jnp.uint32).reshape(-1)


def _device_checksums(x: jax.Array) -> jax.Array:
    words = _device_words(x)
    weights = 2 * (jnp.arange(words.shape[0], dtype=jnp.uint32) // _ROW_WORDS) + 1
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


_device_checksums_all = jax.jit(lambda leaves: [_device_checksums(x) for x in leaves])
# sum(x * 0) is NaN exactly when some value is NaN or inf (inf * 0 = NaN), else 0.
_device_any_non_finite_all = jax.jit(lambda leaves: [~jnp.isfinite(jnp.sum(x * 0, dtype=jnp.float32))
                                                     for x in leaves])
_device_non_finite_all = jax.jit(lambda leaves: [jnp.sum(~jnp.isfinite(x)) for x in leaves])


def _host_words(x: jax.Array) -> np.ndarray:
    """The words of a leaf in this host's memory, as a flat numpy view (no copy on one device)."""
    a = np.asarray(jax.random.key_data(x) if _is_key(x) else x).reshape(-1)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    return a.view(np.uint32 if a.dtype.itemsize == 8 else np.dtype(f"uint{a.dtype.itemsize * 8}"))


_row_weights_cache = np.ones(0, np.uint32)


def _row_weights(rows: int) -> np.ndarray:
    """(2r + 1) mod 2^32 for r < rows, from one array that grows to the largest leaf seen."""
    global _row_weights_cache
    weights = _row_weights_cache
    if weights.size < rows:
        weights = (2 * np.arange(max(rows, 2 * weights.size), dtype=np.uint64) + 1).astype(np.uint32)
        _row_weights_cache = weights  # one reference swap: threads see the old array or the new one
    return weights[:rows]


def _host_checksums(words: np.ndarray) -> tuple[int, int]:
    """The checksums by rows of _ROW_WORDS words: sum = sum_r s_r, weighted = sum_r (2r + 1) s_r.

    The array reductions stay in uint32, whose wrap-around is the arithmetic mod 2^32 the
    checksums are defined in: one pass over the leaf's memory and a few over its row sums (1/1024
    of it); the few scalars are combined as Python integers (numpy warns when a scalar wraps).
    """
    rows = words.size // _ROW_WORDS
    tail = int(words[rows * _ROW_WORDS:].sum(dtype=np.uint32))
    if not rows:
        return tail, tail
    row_sums = words[:rows * _ROW_WORDS].reshape(rows, _ROW_WORDS).sum(axis=1, dtype=np.uint32)
    total = int(row_sums.sum(dtype=np.uint32)) + tail
    weighted = int((row_sums * _row_weights(rows)).sum(dtype=np.uint32)) + (2 * rows + 1) * tail
    return total % _MOD, weighted % _MOD


def _host_map(fn, items: Sequence[Any], nbytes: Sequence[int], workers: int | None = None) -> list[Any]:
    """[fn(x) for x in items] on `workers` threads (default: one per core): numpy's reductions
    release the GIL, so passes over host memory run side by side (a restore reads the whole state).
    Each thread takes one run of consecutive items holding about the same number of bytes (`nbytes`,
    per item): a task per item would make the threads queue for the GIL between the state's many
    small leaves."""
    workers = min(len(items), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    total, seen, groups = max(sum(nbytes), 1), 0, [[] for _ in range(workers)]
    for i, size in enumerate(nbytes):
        groups[min(workers - 1, seen * workers // total)].append(i)
        seen += size
    out: list[Any] = [None] * len(items)

    def run(group: list[int]) -> None:
        for i in group:
            out[i] = fn(items[i])

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, groups))
    return out


def _nbytes(x: jax.Array) -> int:
    return x.size * (8 if _is_key(x) else x.dtype.itemsize)  # a key's size is of its uint32 data


def _in_host_memory(x: jax.Array) -> bool:
    """Whether numpy can read the leaf where it lies: XLA:CPU runs integer reductions ~8x slower
    than numpy does (and than it runs float ones), so on CPU the checksums are taken by numpy."""
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)


def _dispatch_per_device_set(leaves: Sequence[jax.Array], fn) -> list[jax.Array]:
    """`fn(leaves)` (a jitted function of a list), dispatched once per set of devices the leaves use
    (one call takes the arrays of one device set only); its results in leaf order, not yet awaited."""
    groups: dict[frozenset, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
    out: list[Any] = [None] * len(leaves)
    for indices in groups.values():
        for i, value in zip(indices, fn([leaves[i] for i in indices])):
            out[i] = value
    return out


def _to_host(values: Sequence[jax.Array]) -> list[np.ndarray]:
    return [np.asarray(v if v.is_fully_addressable else v.addressable_data(0)) for v in values]


def _per_device_set(leaves: Sequence[jax.Array], fn) -> list[np.ndarray]:
    """`_dispatch_per_device_set`'s results, on the host."""
    return _to_host(_dispatch_per_device_set(leaves, fn))


def _start_checksums(leaves: Sequence[jax.Array]) -> Callable[..., list[tuple[int, int]]]:
    """Starts the checksums of `leaves`, and returns the function that finishes them (its
    `workers`: the threads that read the leaves in host memory, by default one per core).

    What must happen in the caller's thread happens here: the jitted device pass is dispatched
    (every process dispatches its programs in one order, so a collective is never launched from
    another thread), and the leaves in host memory are taken as numpy views of their buffers
    (one device: no copy). A view holds its buffer: while it lives, JAX does not donate that
    buffer to a later computation (it gives the computation a new one), so the finishing function
    reads the state as it was here, on any thread, while the caller goes on.
    """
    on_host = [_in_host_memory(x) for x in leaves]
    device = _dispatch_per_device_set([x for x, host in zip(leaves, on_host) if not host],
                                      _device_checksums_all)
    words = [_host_words(x) for x, host in zip(leaves, on_host) if host]

    def finish(workers: int | None = None) -> list[tuple[int, int]]:
        device_sums = iter(_to_host(device))
        host_sums = iter(_host_map(_host_checksums, words, [w.nbytes for w in words], workers))
        return [next(host_sums) if host else tuple(int(v) for v in next(device_sums)) for host in on_host]

    return finish


def _non_finite_counts(leaves: Sequence[jax.Array]) -> list[int]:
    """NaN / inf per leaf: a float reduction flags the leaves that may hold any, and only those
    are counted. In host memory numpy's sum of the float32 / float64 values does (finite when
    every value is, unless large values overflow it, which the count then clears), elsewhere a
    jitted sum(x * 0)."""
    floats = [i for i, x in enumerate(leaves) if not _is_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)]
    on_host = {i for i in floats if _in_host_memory(leaves[i]) and leaves[i].dtype in (np.float32, np.float64)}
    elsewhere = [i for i in floats if i not in on_host]
    host_order = sorted(on_host)
    host_finite = _host_map(lambda i: bool(np.isfinite(np.asarray(leaves[i]).sum())), host_order,
                            [_nbytes(leaves[i]) for i in host_order])
    flagged = [i for i, finite in zip(host_order, host_finite) if not finite]
    if elsewhere:
        flags = _per_device_set([leaves[i] for i in elsewhere], _device_any_non_finite_all)
        flagged += [i for i, flag in zip(elsewhere, flags) if flag]
    counts = [0] * len(leaves)
    if flagged:
        for i, count in zip(flagged, _per_device_set([leaves[i] for i in flagged], _device_non_finite_all)):
            counts[i] = int(count)
    return counts


def _leaf_specs(state: Any) -> dict[str, tuple[list[int], str]]:
    """Leaf path -> (shape, dtype name) of a pytree of arrays or jax.ShapeDtypeStruct."""
    return {jax.tree_util.keystr(path): (list(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _start_fingerprint(paths_leaves: Sequence[tuple[Any, jax.Array]]) -> Callable[..., dict[str, Any]]:
    """Starts `_fingerprint` (see `_start_checksums`); the function returned finishes it."""
    finish_checksums = _start_checksums([leaf for _, leaf in paths_leaves])

    def finish(workers: int | None = None) -> dict[str, Any]:
        # Paths, shapes and dtypes are read here, off the caller's path (a donated array keeps them).
        leaves = {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype), *s]
                  for (path, leaf), s in zip(paths_leaves, finish_checksums(workers))}
        return {"version": _FINGERPRINT_VERSION, "leaves": leaves}

    return finish


def _fingerprint(paths_leaves: Sequence[tuple[Any, jax.Array]]) -> dict[str, Any]:
    return _start_fingerprint(paths_leaves)()


def _non_finite_leaves(paths_leaves: Sequence[tuple[Any, jax.Array]]) -> dict[str, int]:
    counts = _non_finite_counts([leaf for _, leaf in paths_leaves])
    return {jax.tree_util.keystr(path): n for (path, _), n in zip(paths_leaves, counts) if n}


def fingerprint(state: Any) -> dict[str, Any]:
    """The JSON fingerprint of a state of jax arrays: leaf path -> [shape, dtype, sum, weighted sum].

    Taken where the state lies (numpy for host memory, one jitted pass on accelerators); only
    two numbers per leaf travel.
    """
    return _fingerprint(jax.tree_util.tree_flatten_with_path(state)[0])


def start_fingerprint(state: Any) -> Callable[..., dict[str, Any]]:
    """`fingerprint(state)` in two parts: what must run in the caller's thread runs now, and the
    function returned finishes it, on any thread, while the caller goes on (`_start_checksums`)."""
    return _start_fingerprint(jax.tree_util.tree_flatten_with_path(state)[0])


def non_finite_leaves(state: Any) -> dict[str, int]:
    """Leaf path -> number of NaN / inf values, for the leaves of a state that hold any."""
    return _non_finite_leaves(jax.tree_util.tree_flatten_with_path(state)[0])


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
    bad = [path for path, values in saved.items() if restored[path][2:] != values[2:]]
    if bad:
        raise CheckpointError(f"its data does not match the fingerprint written with it "
                              f"({len(bad)} of {len(saved)} leaves differ: {_listing(bad)})")


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
    "rollout.drift_every", "algo.pack", "algo.pack_tokens",
    "rollout.engine", "rollout.num_slots", "rollout.chunk_len",  # the same samples: each reply keyed by (episode, turn)
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
        raise CheckpointError(f"{path} is not valid JSON ({error}); restore it, or start the run in a new "
                              "workdir") from error
    resumable, refused, unrecorded = config_changes(saved, json.loads(config.to_json_best_effort()))

    def listing(changes: dict) -> str:
        return ", ".join(f"{field} ({old!r} -> {new!r})" for field, (old, new) in changes.items())

    if refused:
        raise ConfigError(
            f"workdir {workdir!r} holds a run started with another config, and these fields cannot change "
            f"on resume: {listing(refused)}; set them back to the run's values, or start this config in a "
            f"new workdir (--config.workdir=...). Fields that may change: {', '.join(RESUMABLE_CHANGES)}")
    if resumable:
        logging.warning("resuming %s with changed %s", workdir, listing(resumable))
    if unrecorded:
        logging.warning("resuming %s: fields %s are not in both the run's config.json and this config "
                        "(the code changed since); the current values apply", workdir, ", ".join(unrecorded))


class _MetaHandler(ocp.JsonCheckpointHandler):
    """orbax's JSON handler for the meta item, whose fingerprint may still be being computed.

    A save passes the fingerprint as a concurrent.futures.Future: the checksums are taken while
    orbax writes the state, not before it (they read the state's memory at ~20 GB/s; the write
    goes at the speed of orbax's compression and the disk), and the meta is written once they are
    done, inside the save's commit. orbax renames a checkpoint into place only after every commit
    of the save, so a checkpoint is never complete without its fingerprint; if the checksums
    fail, the save fails.
    """

    async def _save_fn(self, x, directory):
        fingerprint_or_future = x.get(FINGERPRINT_KEY)
        if isinstance(fingerprint_or_future, concurrent.futures.Future):
            x = {**x, FINGERPRINT_KEY: await asyncio.wrap_future(fingerprint_or_future)}
        await super()._save_fn(x, directory)


@ocp.checkpoint_args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    item: Mapping[str, Any]


@ocp.checkpoint_args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    """Reads the meta item, also of checkpoints written with orbax's own JsonSave (same file)."""


def _fulfil(future: concurrent.futures.Future, compute: Callable[[], Any]) -> None:
    try:
        future.set_result(compute())
    except BaseException as error:  # the save's commit raises it (orbax reports it at wait / the next save)
        future.set_exception(error)


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
        self._async_save = async_save
        self._fingerprint_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fingerprint")

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving (asynchronously when enabled); `wait()` or the next save finishes it.

        Raises NonFiniteStateError (and writes nothing) if any leaf holds NaN or inf. The state's
        fingerprint is finished on a background thread while orbax writes (see `_MetaHandler`);
        the caller may go on using, or donating, the state as soon as this returns.
        """
        paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        non_finite = [f"{path} ({count})" for path, count in _non_finite_leaves(paths_leaves).items()]
        if non_finite:
            raise NonFiniteStateError(
                f"refusing to write checkpoint {step}: the train state holds non-finite values in "
                f"{len(non_finite)} leaves ({_listing(non_finite)}); the checkpoints already in "
                f"{self.directory} are untouched")
        finish_fingerprint = _start_fingerprint(paths_leaves)
        fingerprint_future: concurrent.futures.Future = concurrent.futures.Future()
        # On one thread: it runs beside orbax's write, which compresses on the other cores; more
        # threads would not finish it sooner than the write, only take more of the machine meanwhile.
        compute = functools.partial(self._fingerprint_thread.submit, _fulfil, fingerprint_future,
                                    functools.partial(finish_fingerprint, 1))
        if not self._async_save:
            compute()  # orbax's save returns once it is complete, meta included: it needs the fingerprint
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=_MetaSave({**meta, FINGERPRINT_KEY: fingerprint_future})))
        if self._async_save:
            # Started once orbax holds its copy of the state (when its save returns), so the
            # checksums do not compete with that copy for memory bandwidth.
            compute()

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
            meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore())).meta)
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
            if saved_fp.get("version") != _FINGERPRINT_VERSION:
                logging.warning("%s has a fingerprint of another version (%s, this one computes %d); "
                                "restoring it unverified", where, saved_fp.get("version"), _FINGERPRINT_VERSION)
                saved_fp = None
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
        self._fingerprint_thread.shutdown()
