"""Device mesh, logical-axis rules and shardings: pjit is `jax.jit` with shardings.

One code path for one CPU, a GPU box and a TPU pod slice: a `Mesh` with axes
(`data`, `fsdp`, `tensor`), parameters annotated with logical axis names by the model
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`) and one rule table mapping those names
onto mesh axes. Batches are split over (`data`, `fsdp`); each host feeds its own rows with
`jax.make_array_from_process_local_data`. On one CPU the same code runs on fake devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on two processes over loopback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seismo.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical parameter axis -> mesh axis (None: replicated). FSDP shards the model dimension of
# every matrix; tensor parallelism shards heads, the MLP hidden dimension and the vocabulary.
LOGICAL_RULES: Mapping[str, str | None] = {
    "layers": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
}
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); a -1 entry takes what is left of `n_devices`."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh: {n_devices} devices cannot be split with fixed sizes "
                f"{dict(zip(MESH_AXES, sizes))}; make the product of the fixed sizes divide {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {n_devices} devices are available; "
            f"set one of mesh.data/mesh.fsdp/mesh.tensor to -1 to infer it"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices or unusual topologies: a plain reshape is fine
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names; a dimension that the mesh axis
    does not divide stays replicated (small vocabularies, odd head counts)."""
    if axes is None:
        return PartitionSpec()
    out: list[str | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(param_axes: Any, params_shape: Any, mesh: Mesh) -> Any:
    """NamedShardings for a params pytree, from the model's logical axis names."""
    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(mesh, spec_for(axes, leaf.shape, mesh)),
        param_axes,
        params_shape,
        is_leaf=is_axes,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over (data, fsdp); sequence positions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_rows(sharding: NamedSharding, global_rows: int, axis: int = 0) -> slice:
    """The contiguous rows of the global batch that this process's devices hold; the rows
    are dimension `axis` (1 for a batch stacked over vmapped points)."""
    shape = (1,) * axis + (global_rows,) + (1,) * max(len(sharding.spec) - axis - 1, 0)
    index_map = sharding.addressable_devices_indices_map(shape)
    starts = [idx[axis].start or 0 for idx in index_map.values()]
    stops = [global_rows if idx[axis].stop is None else idx[axis].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int,
              axis: int = 0) -> dict[str, jax.Array]:
    """Device arrays of the global batch from this host's rows (`host_rows`) along `axis`."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (*v.shape[:axis], global_rows, *v.shape[axis + 1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def match_shardings(tree: Any, params: Any, param_sh: Any, fallback: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path
    and has its shape takes that parameter's sharding (Adam's mu and nu); others get
    `fallback` (replicated)."""
    by_path = {tuple(map(str, path)): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    sh_by_path = {tuple(map(str, p)): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}

    def pick(path: Any, leaf: Any) -> Any:
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            if by_path.get(keys[i:]) == leaf.shape:
                return sh_by_path[keys[i:]]
        return fallback

    return jax.tree_util.tree_map_with_path(pick, tree)


def maybe_initialize_distributed(mesh_cfg: MeshConfig) -> bool:
    """`jax.distributed.initialize()` when the config asks for it ('on'), or ('auto') when the
    environment describes a multi-process job: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (any machine, e.g. two CPU processes over loopback), SLURM, or a TPU
    pod (auto-detected by JAX). On CPU the cross-process collectives use gloo."""
    if mesh_cfg.multihost == "off" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1
    cluster = int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env
    if not (mesh_cfg.multihost == "on" or explicit or cluster):
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True
