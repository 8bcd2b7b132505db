"""Device mesh, parameter sharding rules and batch sharding.

The mesh has two axes, ('data', 'fsdp'). A batch is split over both (every device sees its own
examples); parameters, optimizer state and the EMA target are split over 'fsdp' only, each
array along its largest dimension that the axis size divides (ZeRO-3 / FSDP). Which arrays are
sharded is data in the config, a list of (regex on the parameter path, strategy) rules, first
match wins:

    rules = [('.*/embedding$', 'replicate'), ('.*', 'fsdp')]
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Params = Any
DATA_AXES = ("data", "fsdp")
DEFAULT_RULES = (("^.*$", "fsdp"),)
# Arrays smaller than this stay replicated: splitting a bias saves nothing and costs a collective.
MIN_SHARD_SIZE = 2 ** 12


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 means "all remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    data = n // fsdp if data == -1 else data
    fsdp = n // data if fsdp == -1 else fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
                         f"{n} are available; set config.mesh.data/fsdp so the product is {n}")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=axis_types, devices=devices)


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_specs(shapes: Params, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Params:
    """PartitionSpecs for a tree of arrays/ShapeDtypeStructs following the (regex, strategy) rules."""
    fsdp = mesh.shape["fsdp"]

    def spec(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for pattern, strategy in rules:
            if re.search(pattern, name):
                if strategy == "replicate":
                    return P()
                if strategy == "fsdp":
                    return _fsdp_spec(tuple(leaf.shape), fsdp)
                raise ValueError(f"sharding rule ({pattern!r}, {strategy!r}): strategy must be "
                                 "'fsdp' or 'replicate'")
        return P()

    return jax.tree_util.tree_map_with_path(spec, shapes)


def named(mesh: Mesh, specs: Params) -> Params:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Params, mesh: Mesh) -> Params:
    """Host-local numpy batch (this process's examples) -> global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_global(tree: Params, shardings: Params) -> Params:
    """Host arrays (the same on every process) -> global arrays, each device taking only its shard.

    Unlike `jax.device_put`, this needs no cross-process check, and a device never holds more
    than its shard of a large parameter.
    """
    def put(x, s):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits for every process (key-value store barrier: no collective, long timeout).

    CPU collectives give up if a peer is more than ~30 s late to the first one; processes that
    load and compile at different speeds meet here first.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def per_device_bytes(shapes: Params, shardings: Params) -> int:
    """Bytes one device holds for a sharded tree (computed from shapes, nothing allocated)."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings,
                                                                   is_leaf=lambda x: isinstance(x, NamedSharding))):
        shard_shape = sh.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total

