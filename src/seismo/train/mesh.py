"""Device mesh, logical-axis rules and shardings: pjit is `jax.jit` with shardings.

One code path for one CPU, a GPU box and a TPU pod slice: a `Mesh` with axes
(`data`, `fsdp`, `tensor`), parameters annotated with logical axis names by the model
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`) and one rule table mapping those names
onto mesh axes. Batches are split over (`data`, `fsdp`); each host feeds its own rows with
`jax.make_array_from_process_local_data`. On one CPU the same code runs on fake devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on two processes over loopback.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import warnings
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


# --------------------------------------------------------------------------- layouts
#
# Which device sits where in the mesh decides which collectives run over which links. jax's
# `mesh_utils.create_device_mesh` lays the axes onto the physical torus of a TPU slice, the
# last (most communication-heavy) axis onto the nearest chips; when an axis size does not
# match whole physical axes (data=16, fsdp=4 on a v5e 8x8) it refuses unless
# `allow_split_physical_axes=True`, which splits a physical axis between two mesh axes. A
# multislice job (devices with several `slice_index` values, or a multi-node GPU job with
# mesh.dcn_* > 1: processes are its units) gets `create_hybrid_device_mesh`: each axis is
# mesh.dcn_<axis> slices times a part within one slice. When jax has no layout for the devices,
# the devices are reshaped in the order given: that is `fallback`, warned about and recorded.

LAYOUTS = ("physical", "split", "fallback")


class MeshFallbackWarning(UserWarning):
    """The mesh was laid out in device order because jax has no physical layout for it."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a mesh's devices were arranged: `layout` (physical | split | fallback), the DCN
    part of each axis (`dcn`, slices per axis; all 1 in one slice), and for a fallback the
    reason (`note`), one sentence."""

    layout: str
    dcn: tuple[int, int, int] = (1, 1, 1)
    note: str | None = None

    def resolve(self, mesh_cfg: MeshConfig) -> MeshConfig:
        """`mesh_cfg` with what was used: the layout and the DCN sizes (what config.yaml records)."""
        return dataclasses.replace(mesh_cfg, layout=self.layout, dcn_data=self.dcn[0], dcn_fsdp=self.dcn[1],
                                   dcn_tensor=self.dcn[2])


def _slices(devices: Sequence[Any]) -> list[Any] | None:
    """The distinct `slice_index` values of the devices, or None when they carry none."""
    idx = [getattr(d, "slice_index", None) for d in devices]
    return None if any(i is None for i in idx) else sorted(set(idx))


def _dcn_shape(mesh_cfg: MeshConfig, shape: tuple[int, int, int], devices: Sequence[Any]) -> tuple[int, int, int]:
    """Slices per axis: mesh.dcn_* as given; on a multislice job that names none (all 1), the
    data axis spans the slices (the axis whose traffic, one gradient all-reduce, DCN carries best)."""
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, mesh_cfg.dcn_tensor)
    slices = _slices(devices)
    n_slices = len(slices) if slices else 1
    if math.prod(dcn) == 1 and n_slices > 1:
        dcn = (n_slices, 1, 1)
    for axis, size, d in zip(MESH_AXES, shape, dcn):
        if size % d:
            raise ConfigError(f"mesh: {axis}={size} cannot span {d} slices (mesh.dcn_{axis}={d}); make mesh.{axis} a "
                              f"multiple of {d} or set mesh.dcn_* so that their product is the {n_slices} slice(s)")
    if math.prod(dcn) > 1:
        units = n_slices if slices else len({d.process_index for d in devices})
        if math.prod(dcn) != units:
            what = "slices" if slices else "processes (the devices name no slice, so each process is one unit)"
            raise ConfigError(f"mesh.dcn_data*dcn_fsdp*dcn_tensor = {math.prod(dcn)} but the job has {units} {what}; "
                              "set mesh.dcn_* so that their product matches, or all to 1 in one slice")
    return dcn  # type: ignore[return-value]


def _arrange(shape: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[Any], split: bool) -> np.ndarray:
    """jax's physical layout: `create_device_mesh`, or `create_hybrid_device_mesh` over slices
    (over processes when the devices name no slice). Raises when jax has none."""
    from jax.experimental import mesh_utils

    if math.prod(dcn) == 1:
        return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=split)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=split,
                                                process_is_granule=_slices(devices) is None)


def _in_order(shape: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """The fallback: the devices in the order given (grouped by slice first on a multislice
    job, as the hybrid layout groups them), reshaped."""
    if math.prod(dcn) == 1:
        return np.asarray(list(devices), dtype=object).reshape(shape)
    key = "slice_index" if _slices(devices) is not None else "process_index"
    groups: dict[Any, list[Any]] = {}
    for d in devices:
        groups.setdefault(getattr(d, key), []).append(d)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    blocks = np.empty(dcn, dtype=object)
    for i, k in enumerate(sorted(groups)):
        blocks[np.unravel_index(i, dcn)] = np.asarray(groups[k], dtype=object).reshape(ici)
    return np.block(blocks.tolist())


def device_layout(mesh_cfg: MeshConfig, devices: Sequence[Any]) -> tuple[np.ndarray, Layout]:
    """The devices arranged as the (data, fsdp, tensor) mesh, and how (`Layout`).

    mesh.layout `physical` insists on jax's layout without splitting a physical axis, `split`
    allows splitting, `fallback` takes the device order; `auto` tries them in that order, and
    a fallback carries a note saying why (the caller warns). A layout asked for by name that
    jax cannot make is a ConfigError that says which to choose."""
    devices = list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    dcn = _dcn_shape(mesh_cfg, shape, devices)
    wanted = mesh_cfg.layout
    if wanted == "fallback":
        return _in_order(shape, dcn, devices), Layout("fallback", dcn)
    errors = []
    for layout in ("physical", "split"):
        if wanted not in ("auto", layout):
            continue
        try:
            return _arrange(shape, dcn, devices, split=layout == "split"), Layout(layout, dcn)
        except (ValueError, NotImplementedError, AssertionError) as e:  # jax's refusals
            text = " ".join(str(e).split()) or type(e).__name__
            errors.append(text if len(text) <= 160 else text[:157] + "...")
    sizes = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape)) + (
        f" (slices per axis {', '.join(map(str, dcn))})" if math.prod(dcn) > 1 else "")
    kind = getattr(devices[0], "device_kind", "?")
    if wanted != "auto":
        hint = "mesh.layout=split" if wanted == "physical" else "mesh.layout=fallback (device order) or other sizes"
        raise ConfigError(f"mesh.layout={wanted}: jax has no such layout of {sizes} on {len(devices)} x {kind} "
                          f"({errors[-1]}); use {hint}")
    note = (f"mesh {sizes} on {len(devices)} x {kind}: jax has no physical layout for it ({errors[-1]}); the "
            f"devices are used in their listed order (mesh.layout: fallback), so collectives may cross "
            f"slower links; choose mesh sizes that match the slice's torus")
    return _in_order(shape, dcn, devices), Layout("fallback", dcn, note)


def build_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Layout]:
    """The mesh for `mesh_cfg` over `devices` (default: all of the job's) and its `Layout`;
    a fallback is not warned about here (the training loop records it in the run)."""
    arr, layout = device_layout(mesh_cfg, list(jax.devices() if devices is None else devices))
    return Mesh(arr, MESH_AXES), layout


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`build_mesh`'s mesh; a fallback layout warns (MeshFallbackWarning)."""
    mesh, layout = build_mesh(mesh_cfg, devices)
    if layout.note:
        warnings.warn(layout.note, MeshFallbackWarning, stacklevel=2)
    return mesh


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


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _expand_slurm_counts(text: str) -> list[int]:
    """SLURM's per-node counts, '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in text.split(","):
        count, _, rep = part.strip().partition("(x")
        out += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
    return out


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """How many tasks (processes) of this job step run on this node."""
    if env.get("SLURM_NTASKS_PER_NODE", "").strip().isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = _expand_slurm_counts(env[key])
            return counts[min(int(env.get("SLURM_NODEID", "0")), len(counts) - 1)]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return max(1, int(env["SLURM_NTASKS"]) // max(nodes, 1))


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
    """The GPUs this SLURM task trains on, as indices among the GPUs it can see; None when the
    job is not SLURM's, no GPU is known, or JAX_LOCAL_DEVICE_IDS says already.

    JAX alone gives each SLURM task `local_device_ids=[SLURM_LOCALID]`: right for one task per
    GPU, but one task per node with 8 GPUs would train on one GPU per node. Here the tasks on
    a node share its GPUs: a task that sees only its own GPUs (CUDA_VISIBLE_DEVICES narrowed
    by --gpus-per-task or --gpu-bind, or fewer GPUs than tasks) takes all it sees; otherwise
    task SLURM_LOCALID of n takes the SLURM_LOCALID-th of n equal blocks (one task: all of
    them; one task per GPU: its own). GPUs that cannot be shared out equally are a ConfigError."""
    env = os.environ if env is None else env
    if not all(k in env for k in _SLURM_VARS) or env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    local_id, tasks = int(env["SLURM_LOCALID"]), _slurm_tasks_on_node(env)
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    allocated = int(on_node) if on_node.isdigit() else None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1", "none", "NoDevFiles"):
        gpus = len([x for x in visible.split(",") if x.strip()])
        own = gpus < tasks or (allocated is not None and gpus * tasks <= allocated and tasks > 1)
        if tasks == 1 or own:
            return list(range(gpus))
    else:
        gpus = allocated if allocated is not None else len(glob.glob("/dev/nvidia[0-9]*"))
        if gpus == 0:
            return None
    if gpus % tasks:
        raise ConfigError(
            f"SLURM runs {tasks} tasks on this node but it has {gpus} GPUs, which they cannot share equally; "
            "run one task per node (--ntasks-per-node=1), one per GPU, or a number that divides the GPUs "
            "(or set JAX_LOCAL_DEVICE_IDS per task)")
    per_task = gpus // tasks
    return list(range(local_id * per_task, (local_id + 1) * per_task))


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """Whether JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, GKE, Kubernetes) finds
    a multi-process job here."""
    try:
        from jax._src.clusters import ClusterEnv

        return any(c.is_env_present() for c in ClusterEnv._cluster_types if not c.opt_in_only_method)
    except Exception:  # noqa: BLE001 - a JAX without these internals: the variables below decide
        return all(k in env for k in _SLURM_VARS) or "TPU_WORKER_HOSTNAMES" in env


def maybe_initialize_distributed(mesh_cfg: MeshConfig) -> bool:
    """`jax.distributed.initialize()` when the config asks for it ('on'), or ('auto') when the
    environment describes a multi-process job: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (any machine, e.g. two CPU processes over loopback), SLURM, or a TPU
    pod (auto-detected by JAX). On CPU the cross-process collectives use gloo. Under SLURM each
    task gets its share of the node's GPUs (`slurm_local_device_ids`). 'on' with no job to
    join, or variables that do not describe one, is a ConfigError (one sentence, exit 2)."""
    if mesh_cfg.multihost == "off" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    if explicit:
        try:
            n, pid = int(env.get("JAX_NUM_PROCESSES", "")), int(env.get("JAX_PROCESS_ID", ""))
        except ValueError:
            raise ConfigError(
                f"JAX_COORDINATOR_ADDRESS is set ({env['JAX_COORDINATOR_ADDRESS']}) but JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID are not both whole numbers; set them on every process (JAX_PROCESS_ID 0 .. "
                "JAX_NUM_PROCESSES-1), or unset JAX_COORDINATOR_ADDRESS") from None
        if not 0 <= pid < n:
            raise ConfigError(f"JAX_PROCESS_ID={pid} is not one of the {n} processes of JAX_NUM_PROCESSES={n}; "
                              f"give each process its own id from 0 to {n - 1}")
        explicit = n > 1
    cluster = int(env.get("SLURM_NTASKS", "1") or 1) > 1 or "TPU_WORKER_HOSTNAMES" in env
    if not (mesh_cfg.multihost == "on" or explicit or cluster):
        return False
    if not (explicit or cluster or _cluster_detected(env)):
        raise ConfigError(
            "mesh.multihost is 'on' but this process is not part of a multi-process job: set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process, start it under "
            "SLURM (srun) or on every worker of a TPU pod slice, or set mesh.multihost=auto to train here alone")
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = slurm_local_device_ids(env)
    try:
        if explicit:
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], n, pid, local_device_ids=local)
        else:
            jax.distributed.initialize(local_device_ids=local)
    except ValueError as e:  # JAX could not tell from the environment what to join
        raise ConfigError(f"cannot start the multi-process job ({e}); set JAX_COORDINATOR_ADDRESS, "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or set mesh.multihost=off") from None
    return True
