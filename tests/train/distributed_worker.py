"""Test-only worker: one process of a two-process `jax.distributed` run of the sharded update.

    python tests/train/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 2 CPU devices and contributes its half of the batch rows (as each host of a
pod contributes the rows of its own environments); process 0 writes the updated params.
"""
import os
import sys

if __name__ == "__main__":  # a worker process (imported by the test, it must not touch XLA_FLAGS)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_update import random_batch, tiny_config, tiny_model  # noqa: E402

from epo_jax.train import actor_critic, optim, sharding  # noqa: E402
from epo_jax.train.update import init_train_state, make_update_fn  # noqa: E402

ROWS = 16


def sharded_update(batch_rows: dict, mesh) -> dict:
    """The trainer's update path: place state, shard this process's rows, update, gather."""
    config = tiny_config(micro_batch_size=8)
    (graphdef, policy_params), model_cfg = tiny_model()
    params = actor_critic.init_params(config, policy_params, model_cfg.hidden_size)
    optimizer = optim.make_optimizer(config.optim, 10)
    state = init_train_state(config, params, optimizer, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    update = jax.jit(make_update_fn(config, actor_critic.make_forward_fn(config, graphdef), optimizer),
                     in_shardings=(state_sharding, None), out_shardings=(state_sharding, None))
    new_state, metrics = update(state, sharding.shard_batch(batch_rows, mesh))
    gathered = multihost_utils.process_allgather(new_state.params, tiled=True)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    flat["loss"] = np.asarray(metrics["loss"].addressable_data(0))  # replicated scalar
    return flat


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 2, 2
    mesh = sharding.make_mesh(config.mesh)
    batch = random_batch(ROWS)
    per_process = ROWS // num_processes
    local = {k: v[process_id * per_process:(process_id + 1) * per_process] for k, v in batch.items()}
    result = sharded_update(local, mesh)
    if process_id == 0:
        np.savez(out, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
