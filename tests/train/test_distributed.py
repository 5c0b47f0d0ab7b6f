"""A real two-process `jax.distributed` run (localhost coordinator, gloo CPU collectives): the
sharded update equals the one-process update on the same global batch and mesh shape."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from distributed_worker import ROWS, sharded_update  # noqa: E402
from test_update import random_batch, tiny_config  # noqa: E402

from epo_jax.train import sharding  # noqa: E402

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_update_equals_one_process(tmp_path):
    out, port = tmp_path / "two_process.npz", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    two = dict(np.load(out))

    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 2, 2
    one = sharded_update(random_batch(ROWS), sharding.make_mesh(config.mesh, jax.devices()[:4]))
    assert sorted(one) == sorted(two) and len(one) > 10
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
