"""Cost of the checkpoint fingerprint against the checkpoint save it protects, on the default run's
train state (configs/scienceworld.py: the embedded SmolLM2-135M-Instruct policy with its value head,
AdamW moments, EPO's entropy history and the PRNG key; float32, on the default devices).

Every save first checks the state for NaN / inf (`non_finite_leaves`: a float sum per leaf,
which is finite exactly when the leaf is) and records its fingerprint (`fingerprint`: two
32-bit checksums of each leaf's bits), then hands the state to orbax; every restore computes the
fingerprint again. Timed in the same run, interleaved, best of `--repeats`:

  fingerprint       fingerprint(state);
  non-finite check  non_finite_leaves(state);
  save              Checkpointer.save(...) until the checkpoint is complete on disk (both of the
                    above included), with the default run's async_save and keep;
  save returns      the part of that save the training loop waits for before its next step
                    (with async_save the rest is written in the background).

    python bench/checkpoint_fingerprint.py [--repeats 5] [--dir /tmp/ckpt-bench]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import jax

from epo_jax.models.loading import load_pretrained
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.checkpoint import Checkpointer, fingerprint, non_finite_leaves
from epo_jax.train.update import init_train_state

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.scienceworld import get_config  # noqa: E402


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

    fingerprint(state), non_finite_leaves(state)  # warm-up
    timings: dict[str, list[float]] = {"fingerprint": [], "non-finite check": [], "save": [], "save returns": []}
    for step in range(1, args.repeats + 1):
        for name, fn in (("fingerprint", fingerprint), ("non-finite check", non_finite_leaves)):
            t0 = time.perf_counter()
            fn(state)
            timings[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpointer.save(step, state, {"step": step, "cursor": 0})
        timings["save returns"].append(time.perf_counter() - t0)
        checkpointer.wait()
        timings["save"].append(time.perf_counter() - t0)
    checkpointer.close()
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)

    best = {name: min(values) for name, values in timings.items()}
    print(f"jax {jax.__version__} ({jax.devices()[0].platform} x {jax.device_count()}), train state: "
          f"{len(leaves)} leaves, {size / 2**20:.0f} MiB; async_save={config.checkpoint.async_save}; "
          f"best of {args.repeats}")
    print(f"{'measure':<16} | {'seconds':>8} | {'/ save':>7} | {'/ save returns':>14}")
    print("-" * 55)
    for name, seconds in best.items():
        print(f"{name:<16} | {seconds:8.3f} | {seconds / best['save']:7.2%} | {seconds / best['save returns']:14.2%}")


if __name__ == "__main__":
    main()
