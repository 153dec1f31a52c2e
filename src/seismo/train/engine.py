"""The one builder: everything that runs a config's steps, for one run or a vmapped group.

    engine = build(cfg, mesh)                        # one run
    engine = build(cfg, mesh, points=cfgs)           # a vmapped group: a leading points axis
    state = engine.init_state()
    state, metrics = engine.train_step(state, batch)
    state, metrics, packed = engine.probe_step(state, batch)
    probes = engine.unpack_probes(packed)                   # fetched: {name: numpy array}
    total, count = engine.eval_step(state.params, batch, row_weights)

`build` makes the model, the optimizer, the state and batch shardings for the mesh, and the
jitted init, plain, probe and eval steps. The probe step returns its summary (dozens of
scalars and per-layer vectors) packed into one vector per dtype, so that the host fetches it
in one transfer each and the step has a few outputs, not dozens (`SummaryLayout`). Training
(seismo.train.loop), vmapped sweeps (the same loop with a points axis) and the ahead-of-time
check (seismo.train.aot, which lowers the very functions built here with abstract arguments)
all call it, so what the AOT check measures is what training runs.

A vmapped group is a set of configs that differ only in scalar hyperparameters
(`VMAPPABLE_KEYS`: peak LR, weight decay, z-loss coefficient, seed). The hyperparameters
become one constant vector per key, the train state gets a leading points axis, and `jax.vmap`
runs the points together, as in the LR sweeps of Wortsman et al. 2023 (arXiv 2309.14322,
section 2; docs/methods.md §1.2). The points axis is never sharded: every other axis keeps the
sharding it has in a single run, so a group runs on any mesh a single run does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seismo import config as config_lib
from seismo import data as data_lib
from seismo import models
from seismo.config import Config, ConfigError
from seismo.config.sweepfile import VMAPPABLE_KEYS
from seismo.instrument.probes import ProbeFactory, StepProbe, make_step_probes
from seismo.models import Model
from seismo.train import mesh as mesh_lib
from seismo.train import optimizer as opt_lib
from seismo.train import trackers
from seismo.train.step import TrainState, make_eval_step, make_train_step, under_mesh

Hparams = Mapping[str, Any]  # dotted key -> scalar (a traced value inside a vmapped step)


def check_config(cfg: Config) -> None:
    """The checks a config needs beyond its schema, by the layers that own the names: the
    data source (seismo.data), the activation, norm and attention (seismo.models), the
    trackers' packages (seismo.train.trackers). Raises ConfigError, before anything compiles."""
    data_lib.check_config(cfg)
    models.check_config(cfg)
    trackers.check_available(cfg)


def with_hparams(cfg: Config, hp: Hparams) -> Config:
    """`cfg` with the vmappable hyperparameters of `hp` (values may be traced scalars)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in hp.items():
        section, name = key.split(".")
        if key != "run.seed":  # the seed acts through the init key and the data, not the step
            sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


def check_vmappable(cfgs: Sequence[Config]) -> None:
    """All configs must be equal once the vmappable hyperparameters are set equal."""
    ref = cfgs[0].to_dict()
    for c in cfgs[1:]:
        d = c.to_dict()
        for key in VMAPPABLE_KEYS:
            s, f = key.split(".")
            d[s][f] = ref[s][f]
        if d != ref:
            diff = [f"{s}.{k}" for s in ref for k in ref[s] if ref[s][k] != d[s][k]]
            raise ConfigError(f"these points cannot be vmapped together: they differ in {', '.join(diff)} "
                              f"(only {', '.join(VMAPPABLE_KEYS)} may differ)")


def check_batch(cfg: Config, mesh: Mesh) -> None:
    div = mesh_lib.batch_divisor(mesh)
    if cfg.data.batch_size % (div * cfg.optimizer.grad_accum_steps):
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be divisible by mesh data*fsdp ({div}) "
            f"times optimizer.grad_accum_steps ({cfg.optimizer.grad_accum_steps})")


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory one device can hold: the allocator's limit on accelerators, the machine's
    physical memory on the CPU; None when neither is known."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - compile-only and some plugin devices do not report
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_memory(engine: Engine) -> None:
    """Refuse, before anything compiles, a state that cannot fit: params, Adam's two moments
    (float32, 12 bytes per parameter) per point, split at best over every device of the mesh.
    A lower bound: activations come on top (the AOT check, seismo.train.aot, measures them)."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(engine.params_shape))
    need = 12 * n * (engine.n_points or 1) / engine.mesh.size
    have = device_memory_bytes(engine.mesh.devices.flat[0])
    if have and need > have:
        raise ConfigError(
            f"the model has {n / 1e9:.3g}B parameters: their float32 values and Adam moments need at least "
            f"{need / 2**30:.1f} GiB per device on this mesh of {engine.mesh.size}, more than the "
            f"{have / 2**30:.1f} GiB a device has; shrink the model (model.d_model, model.n_layers) or add devices")


def _prefix(sh: NamedSharding) -> NamedSharding:
    """The sharding of the same array with an unsharded points axis in front."""
    return NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))


class SummaryLayout:
    """Where each array of a probe summary lies in the probe step's packed output: the arrays
    raveled and joined into one vector per dtype ({dtype name: [n]}, or [P, n] with a leading
    points axis of P), packed inside the compiled step. The layout is recorded when the step
    is traced (its summary's structure is known only then), so it exists before the first
    result does. `unpack` splits fetched vectors back into {name: array} (numpy views)."""

    def __init__(self, lead: tuple[int, ...]):
        self.lead = lead
        # (name, dtype name, start, end, shape with the points axis) of each array
        self.entries: tuple[tuple[str, str, int, int, tuple[int, ...]], ...] | None = None

    def pack(self, summary: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        n_lead = len(self.lead)
        entries, at, parts = [], {}, {}
        for key in sorted(summary):  # the order jit gives a returned dict: rows keep their key order
            x = summary[key]
            kind, shape = jnp.dtype(x.dtype).name, tuple(x.shape[n_lead:])
            start = at.get(kind, 0)
            entries.append((key, kind, start, start + math.prod(shape), (*self.lead, *shape)))
            at[kind] = start + math.prod(shape)
            parts.setdefault(kind, []).append(x.reshape((*self.lead, -1)))
        self.entries = tuple(entries)
        return {kind: jnp.concatenate(xs, axis=-1) for kind, xs in parts.items()}

    def unpack(self, packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """{name: numpy array} from the packed vectors, fetched here if they are on a device
        (`np.asarray`: one transfer per dtype, and less host work than `jax.device_get`)."""
        if self.entries is None:
            raise RuntimeError("the probe step has not been traced yet: no summary layout")
        host = {k: np.asarray(v) for k, v in packed.items()}
        return {key: host[kind][..., a:b].reshape(shape) for key, kind, a, b, shape in self.entries}


@dataclasses.dataclass
class Engine:
    """What `build` returns. With `n_points` None the arrays are those of one run; otherwise
    every state leaf, batch array and metric has a leading points axis of that length."""

    cfg: Config  # the (first) point's config
    cfgs: tuple[Config, ...]  # one per point (one for a single run)
    mesh: Mesh
    model: Model
    n_points: int | None
    params_shape: Any  # abstract params of one point
    point_state_shape: TrainState  # abstract state of one point, with its shardings
    state_shardings: TrainState  # NamedShardings of the (stacked) state
    batch_sharding: NamedSharding  # of a (stacked) batch
    replicated: NamedSharding
    probes: tuple[StepProbe, ...] | None  # one per point (host halves); point 0's runs inside the step
    init_state: Callable[[], TrainState]
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    probe_step: Callable[..., tuple[TrainState, dict[str, jax.Array], dict[str, jax.Array]]] | None
    eval_step: Callable[..., tuple[jax.Array, jax.Array]]
    summary_layout: SummaryLayout | None = None  # of the probe step's packed summary

    def unpack_probes(self, packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The probe step's summary {name: numpy array} from its packed output (fetched here
        when it is still on the device)."""
        assert self.summary_layout is not None, "this engine has no probe step"
        return self.summary_layout.unpack(packed)

    @property
    def vmapped(self) -> bool:
        return self.n_points is not None

    def point(self, tree: Any, i: int) -> Any:
        """Point `i` of a (stacked) tree; the tree itself for a single run."""
        return tree if self.n_points is None else jax.tree.map(lambda x: x[i], tree)

    def stack(self, trees: Sequence[Any]) -> Any:
        """The (stacked) state from one state per point, placed with the engine's shardings."""
        tree = trees[0] if self.n_points is None else jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        return jax.device_put(tree, self.state_shardings)

    def batch_shape(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Abstract (stacked) batch with its sharding, as the steps take it."""
        lead = () if self.n_points is None else (self.n_points,)
        shape = (*lead, self.cfg.data.batch_size, self.cfg.data.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)
                for k, dt in data_lib.batch_fields(self.cfg.data).items()}

    def state_shape(self) -> TrainState:
        """Abstract (stacked) state with its shardings."""
        lead = () if self.n_points is None else (self.n_points,)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype, sharding=sh),
                            self.point_state_shape, self.state_shardings)

    def lowerable(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
        """{'train': (jitted step, abstract args), 'probe': ...}: what the AOT check compiles."""
        args = (self.state_shape(), self.batch_shape())
        out = {"train": (self.train_step, args)}
        if self.probe_step is not None:
            out["probe"] = (self.probe_step, args)
        return out


def build(cfg: Config, mesh: Mesh, *, points: Sequence[Config] | None = None,
          probe: ProbeFactory | None = None, probes: bool | None = None) -> Engine:
    """The engine of `cfg` on `mesh`. `points`: the configs of a vmapped group (cfg is then
    ignored in favour of points[0]). `model.attention_impl: auto` is resolved for the mesh's
    platform (a TPU topology compiled ahead of time on a CPU gets the TPU's choice); the
    engine's `cfgs` say what it became. `probe`: makes the in-step probe of each run (default:
    seismo's instability probes), used when `probes` (default: run.probe_every > 0)."""
    cfgs = tuple(points) if points is not None else (cfg,)
    if points is not None:
        check_vmappable(cfgs)
    check_batch(cfgs[0], mesh)
    platform = mesh.devices.flat[0].platform
    cfgs = tuple(models.resolve_attention(c, platform) for c in cfgs)
    cfg = cfgs[0]
    n_points = len(cfgs) if points is not None else None
    model = models.build(cfg.model)
    steps = cfg.run.steps
    tokens = jax.ShapeDtypeStruct((1, cfg.data.seq_len), jnp.int32)
    params_shape = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32), tokens)
    run_probes = None
    if cfg.run.probe_every > 0 if probes is None else probes:
        run_probes = tuple((probe or make_step_probes)(model, c) for c in cfgs)
    probe_fn = run_probes[0] if run_probes else None
    hp = None
    if n_points is not None:
        hp = {k: np.asarray([float(config_lib.get(c, k)) for c in cfgs], np.float32) for k in VMAPPABLE_KEYS}

    def parts(point_hp: Hparams | None):
        c = cfg if point_hp is None else with_hparams(cfg, point_hp)
        tx = opt_lib.build(c.optimizer, c.model, params_shape, steps)
        return c, tx, opt_lib.schedule(c.optimizer, steps)

    dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)

    def init_one(rng, point_hp=None):
        _, tx, _ = parts(point_hp)
        params = model.init(rng, dummy)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def step_one(state, batch, point_hp=None, with_probes=False):
        c, tx, sched = parts(point_hp)
        return make_train_step(model, tx, c, sched, probe_fn if with_probes else None)(state, batch)

    def eval_one(params, batch, weights):
        return make_eval_step(model, cfg)(params, batch, weights)

    # Shardings of one point, then with the points axis in front.
    repl = mesh_lib.replicated(mesh)
    param_sh = mesh_lib.param_shardings(model.param_axes(), params_shape, mesh)
    point_shape = jax.eval_shape(init_one, jax.ShapeDtypeStruct((2,), jnp.uint32))
    point_sh = TrainState(step=repl, params=param_sh,
                          opt_state=mesh_lib.match_shardings(point_shape.opt_state, params_shape, param_sh, repl))
    point_state_shape = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     point_shape, point_sh)
    batch_sh = mesh_lib.batch_sharding(mesh)
    if n_points is None:
        state_sh = point_sh
        rngs = jax.random.PRNGKey(cfg.run.seed)
        init, step = init_one, (lambda s, b: step_one(s, b))
        probe = lambda s, b: step_one(s, b, with_probes=True)
        evaluate = eval_one
    else:
        state_sh = jax.tree.map(_prefix, point_sh)
        batch_sh = _prefix(batch_sh)
        rngs = jnp.stack([jax.random.PRNGKey(c.run.seed) for c in cfgs])
        init = lambda r: jax.vmap(init_one)(r, hp)
        step = lambda s, b: jax.vmap(step_one)(s, b, hp)
        probe = lambda s, b: jax.vmap(lambda s1, b1, h1: step_one(s1, b1, h1, True))(s, b, hp)
        evaluate = jax.vmap(eval_one, in_axes=(0, None, None))

    layout = SummaryLayout(() if n_points is None else (n_points,)) if probe_fn is not None else None

    def probe_packed(s, b):
        state, metrics, summary = probe(s, b)
        return state, metrics, layout.pack(summary)

    jit_step = lambda fn, n_out: jax.jit(under_mesh(fn, mesh), in_shardings=(state_sh, batch_sh),
                                         out_shardings=(state_sh, *[repl] * (n_out - 1)), donate_argnums=(0,))
    init_jit = jax.jit(init, out_shardings=state_sh)
    eval_batch_sh = mesh_lib.batch_sharding(mesh)  # the eval set is shared by all points
    return Engine(
        cfg=cfg, cfgs=cfgs, mesh=mesh, model=model, n_points=n_points, params_shape=params_shape,
        point_state_shape=point_state_shape, state_shardings=state_sh, batch_sharding=batch_sh, replicated=repl,
        probes=run_probes,
        init_state=lambda: init_jit(rngs),
        train_step=jit_step(step, 2),
        probe_step=jit_step(probe_packed, 3) if probe_fn is not None else None,
        eval_step=jax.jit(under_mesh(evaluate, mesh), in_shardings=(state_sh.params, eval_batch_sh, eval_batch_sh),
                          out_shardings=repl),
        summary_layout=layout,
    )
