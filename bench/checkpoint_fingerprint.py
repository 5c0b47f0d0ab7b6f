"""Cost of the checkpoint fingerprint against the checkpoint save it protects, on the default run's
train state (configs/scienceworld.py: the embedded SmolLM2-135M-Instruct policy with its value head,
AdamW moments, EPO's entropy history and the PRNG key; float32, on the default devices).

Every save first checks the state for NaN / inf (`non_finite_leaves`: a float sum per leaf,
which is finite exactly when the leaf is), then hands the state to orbax and takes the state's
fingerprint (two 32-bit checksums of each leaf's bits) on a background thread while orbax writes;
the meta, fingerprint included, is written last. Every restore computes the fingerprint again.
Timed in the same run, interleaved, best of `--repeats`:

  fingerprint, on the save's path   what the save waits for of the fingerprint: taking numpy
                                    views of the leaves (and dispatching any device pass);
  fingerprint, the rest (1 thread)  the checksums themselves on one thread, which a save runs
                                    beside orbax's write (the write compresses on the other core);
  fingerprint, whole                fingerprint(state), both parts on a thread per core (what a
                                    restore pays);
  non-finite check                  non_finite_leaves(state);
  save                              Checkpointer.save(...) until the checkpoint is complete on
                                    disk, with the default run's async_save and keep;
  save returns                      the part of that save the training loop waits for before its
                                    next step (with async_save the rest is written in the
                                    background);
  save without fingerprint          the reference: the same save without the fingerprint (the
                                    non-finite check, then orbax with the same options and meta),
                                    complete on disk; "save - save without fingerprint" is the
                                    median over the repeats of the paired differences: what the
                                    fingerprint adds to a save, contention included (with the
                                    quartiles of those differences: the save's own spread).

Wall-clock and CPU seconds (the process's, all threads: orbax's write is bound by its compression
on this machine's two cores, so CPU taken beside it lengthens it).

    python bench/checkpoint_fingerprint.py [--repeats 5] [--dir /tmp/ckpt-bench]
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from epo_jax.models.loading import load_pretrained
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.checkpoint import Checkpointer, fingerprint, non_finite_leaves, start_fingerprint
from epo_jax.train.update import init_train_state

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.scienceworld import get_config  # noqa: E402


MEASURES = ("fingerprint, on the save's path", "fingerprint, the rest (1 thread)", "fingerprint, whole",
            "non-finite check", "save", "save returns", "save without fingerprint")


def default_train_state():
    """The train state of `python -m epo_jax.main --config=configs/scienceworld.py` at step 0."""
    config = get_config()
    mesh = sharding.make_mesh(config.mesh)
    loaded = load_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                             remat=config.model.remat, mesh=mesh)
    params = actor_critic.init_params(config, loaded.params, loaded.config.hidden_size)
    return config, init_train_state(config, params, optim.make_run_optimizer(config), mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="", help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    config, state = default_train_state()
    leaves = jax.tree.leaves(state)
    size = sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x.dtype, "itemsize"))
    workdir = args.dir or tempfile.mkdtemp(prefix="epo_jax_ckpt_bench_")
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)

    reference = ocp.CheckpointManager(
        pathlib.Path(workdir, "reference").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                             enable_async_checkpointing=config.checkpoint.async_save),
        item_names=("state", "meta"))

    fingerprint(state), non_finite_leaves(state)  # warm-up
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in MEASURES}  # (wall, CPU) seconds

    def timed(name: str, fn) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        return out

    def save_without_fingerprint(step: int) -> None:
        non_finite_leaves(state)
        reference.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave({"step": step, "cursor": 0})))
        reference.wait_until_finished()

    def save(step: int) -> None:
        timed("save returns", lambda: checkpointer.save(step, state, {"step": step, "cursor": 0}))
        checkpointer.wait()

    for step in range(1, args.repeats + 1):
        finish = timed("fingerprint, on the save's path", lambda: start_fingerprint(state))
        timed("fingerprint, the rest (1 thread)", lambda: finish(1))
        timed("fingerprint, whole", lambda: fingerprint(state))
        timed("non-finite check", lambda: non_finite_leaves(state))
        pair = (("save without fingerprint", save_without_fingerprint), ("save", save))
        for name, fn in pair if step % 2 else pair[::-1]:  # each goes first in half the pairs
            timed(name, functools.partial(fn, step))
    checkpointer.close()
    reference.close()
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)

    best = {name: tuple(min(column) for column in zip(*values)) for name, values in timings.items()}
    differences = [[s - r for s, r in zip(ours, theirs)]
                   for ours, theirs in zip(zip(*timings["save"]), zip(*timings["save without fingerprint"]))]
    added = tuple(statistics.median(column) for column in differences)
    quartiles = [statistics.quantiles(column, n=4) for column in differences] if args.repeats > 1 else None
    print(f"jax {jax.__version__} ({jax.devices()[0].platform} x {jax.device_count()}), train state: "
          f"{len(leaves)} leaves, {size / 2**20:.0f} MiB; async_save={config.checkpoint.async_save}; "
          f"best of {args.repeats}; CPU: process time, all threads")
    width = max(map(len, MEASURES)) + 2
    header = f"{'measure':<{width}} | {'seconds':>8} | {'/ save':>7} | {'/ save returns':>14} | {'CPU s':>6} | {'/ save CPU':>10}"
    print(header)
    print("-" * len(header))
    save_wall, save_cpu = best["save"]
    for name, (wall, cpu) in [*best.items(), ("save - save without fingerprint (median)", added)]:
        print(f"{name:<{width}} | {wall:8.3f} | {wall / save_wall:7.2%} | {wall / best['save returns'][0]:14.2%} | "
              f"{cpu:6.3f} | {cpu / save_cpu:10.2%}")
    if quartiles:
        (wall_q1, _, wall_q3), (cpu_q1, _, cpu_q3) = quartiles
        print(f"paired differences, quartiles: {wall_q1:+.3f} / {wall_q3:+.3f} s wall "
              f"({wall_q1 / save_wall:+.1%} / {wall_q3 / save_wall:+.1%} of a save), "
              f"{cpu_q1:+.3f} / {cpu_q3:+.3f} s CPU")


if __name__ == "__main__":
    main()
