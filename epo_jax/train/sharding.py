"""The device mesh and the placement of batches, for one CPU up to a multi-host pod.

Axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer
state sharded across it), `tensor` (heads / MLP columns split across it). A batch is split over
data x fsdp; parameters follow the model's partition specs. The same code runs whatever the
axis sizes, 1 x 1 x 1 included.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves the one -1 axis (if any) to the remaining devices and checks the product."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes "
                             f"{dict(zip(AXES, sizes))}; set --config.mesh.* so their product divides it")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: axes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)} but "
                         f"{num_devices} devices are present; make the product equal, or use -1 on one axis")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A Mesh over all (global) devices with axes (data, fsdp, tensor)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    # Auto axes: partitioning is propagated by XLA from the in/out shardings we give.
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree, sharding_or_tree):
    """`jax.device_put` that also works when the sharding spans other processes' devices: every
    process holds the same host values (e.g. the same checkpoint) and contributes its shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding_or_tree)

    def one(x, s):
        host = np.asarray(jax.device_get(x)) if not jax.dtypes.issubdtype(
            getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else None
        if host is None:  # typed PRNG keys: place their raw data, then wrap again
            impl = jax.random.key_impl(x)
            data = one(jax.random.key_data(x), s)
            return jax.random.wrap_key_data(data, impl=impl)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    if isinstance(sharding_or_tree, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding_or_tree), tree)
    return jax.tree.map(one, tree, sharding_or_tree)


def rollout_mesh(mesh: Mesh) -> Mesh:
    """The mesh this process generates on: the whole mesh on one process; on several, a mesh of
    this process's own devices (axes data=1, fsdp, tensor), so that every host samples for its own
    environments without waiting for the others' turns.

    The tensor axis keeps the training mesh's size where it divides the local devices (tensor
    parallelism normally stays within a host); the remaining local devices go to fsdp.
    """
    if jax.process_count() == 1:
        return mesh
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    tensor = mesh.shape["tensor"] if len(local) % mesh.shape["tensor"] == 0 else 1
    return Mesh(np.asarray(local).reshape(1, len(local) // tensor, tensor), AXES)


def host_local_params(params, mesh: Mesh, local_mesh: Mesh):
    """A copy of `params` held by every process on its own devices (laid out for `local_mesh`),
    for the rollout; the identity on one process.

    On several processes the params are resharded in one jitted collective onto a mesh with a
    leading `hosts` axis that no param uses (each host gets a whole copy, split over its devices
    as the model's partition specs say), and each process then wraps its own shards as an array
    on `local_mesh`. Every process must call this at the same point (it is a collective).
    """
    if local_mesh is mesh:
        return params
    from epo_jax.models import transformer

    hosts = sorted({d.process_index for d in mesh.devices.flat})
    rows = [[d for d in mesh.devices.flat if d.process_index == h] for h in hosts]
    grid = np.asarray(rows).reshape(len(hosts), *local_mesh.devices.shape)
    # This process's row of the hosts mesh is its local mesh, device for device (both list the
    # process's devices in the training mesh's order), so its shards land where local_mesh wants them.
    assert (grid[hosts.index(jax.process_index())] == local_mesh.devices).all()
    hosts_mesh = Mesh(grid, ("hosts",) + AXES)
    specs = transformer.param_partition_specs(params, local_mesh)
    gathered = jax.jit(lambda x: x, out_shardings=jax.tree.map(lambda s: NamedSharding(hosts_mesh, s), specs))(params)

    def local(x, spec):
        return jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(local_mesh, spec), [shard.data for shard in x.addressable_shards])

    return jax.tree.map(local, gathered, specs)


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's rows of a batch on the mesh (global batch = all processes' rows).

    On one process this is a plain device_put; on several, each process contributes the rows
    it collected from its own environments (`jax.make_array_from_process_local_data`).
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        if jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def place_packing(layout: dict[str, np.ndarray], shard_axis: dict[str, int | None], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a packing layout (`epo_jax.train.batch.pack_batch`), which every process computes
    whole, with axis `shard_axis[key]` of each array over data x fsdp (None: replicated)."""
    out = {}
    for key, value in layout.items():
        axes = [None] * value.ndim
        if shard_axis[key] is not None:
            axes[shard_axis[key]] = BATCH_AXES
        out[key] = put(np.asarray(value), NamedSharding(mesh, P(*axes)))
    return out


def place_params(params: dict, mesh: Mesh) -> dict:
    """Places the run's params on the mesh: transformer weights ("policy", "critic.backbone") by
    the model's partition specs, the small heads replicated."""
    from epo_jax.models import transformer

    def place_model(model_params):
        specs = transformer.param_partition_specs(model_params, mesh)
        return put(model_params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    placed = {}
    for name, value in params.items():
        if name == "policy":
            placed[name] = place_model(value)
        elif name == "critic":
            placed[name] = {"backbone": place_model(value["backbone"]),
                            "head": put(value["head"], replicated(mesh))}
        else:
            placed[name] = put(value, replicated(mesh))
    return placed
