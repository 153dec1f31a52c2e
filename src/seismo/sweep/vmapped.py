"""Vmapped sweeps: many tiny runs as one program.

Points that differ only in scalar hyperparameters (peak LR, seed, weight decay, z-loss
coefficient) share one compiled step: the hyperparameters become a leading axis of traced
values, the train state is stacked over points, and `jax.vmap` runs them together. This is
how an accelerator is filled with the tiny models of a Wortsman et al. 2023 (arXiv
2309.14322) LR sweep. Each point still gets its own run directory, metrics, checkpoints and
status, identical in form (and, up to float reduction order, in numbers) to a separate run.

The vmapped program runs on the default device without a mesh: a group of tiny models is
the unit that fills one device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seismo import config as config_lib
from seismo import data as data_lib
from seismo import models
from seismo.config import Config
from seismo.sweep.spec import VMAPPABLE_KEYS
from seismo.train import checkpoint as ckpt_lib
from seismo.train import optimizer as opt_lib
from seismo.train.loop import RunResult
from seismo.train.metrics import MetricsWriter, Progress
from seismo.train.step import TrainState, make_eval_step, make_train_step, padded_chunks


def _with_hparams(cfg: Config, hp: dict[str, Any]) -> Config:
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, lr=hp["optimizer.lr"], weight_decay=hp["optimizer.weight_decay"]),
        loss=dataclasses.replace(cfg.loss, z_loss=hp["loss.z_loss"]),
    )


def check_vmappable(cfgs: Sequence[Config]) -> None:
    """All configs must be equal once the vmappable hyperparameters are set equal."""
    ref = config_lib.to_dict(cfgs[0])
    for c in cfgs[1:]:
        d = config_lib.to_dict(c)
        for key in VMAPPABLE_KEYS:
            s, f = key.split(".")
            d[s][f] = ref[s][f]
        if d != ref:
            diff = [f"{s}.{k}" for s in ref for k in ref[s] if ref[s][k] != d[s][k]]
            raise ValueError(f"these points cannot be vmapped together: they differ in {', '.join(diff)} "
                             f"(only {', '.join(VMAPPABLE_KEYS)} may differ)")


class VmappedGroup:
    """Compiled init/step/eval for a group of points; the state is stacked over points."""

    def __init__(self, cfgs: Sequence[Config]):
        check_vmappable(cfgs)
        self.cfgs, self.base = list(cfgs), cfgs[0]
        self.n = len(cfgs)
        self.model = models.build(self.base.model)
        self.hp = {k: jnp.asarray([float(config_lib.get(c, k)) for c in cfgs], jnp.float32) for k in VMAPPABLE_KEYS}
        self.datasets = {}
        for c in cfgs:  # one dataset per distinct seed (batches depend on it)
            if c.run.seed not in self.datasets:
                self.datasets[c.run.seed] = data_lib.build(c.data, c.run.seed)
        self.eval_set = self.datasets[cfgs[0].run.seed].eval_set()
        dummy = jnp.zeros((1, self.base.data.seq_len), jnp.int32)
        params_shape = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), dummy)
        steps = self.base.run.steps

        def parts(hp):
            cfg = _with_hparams(self.base, hp)
            return cfg, opt_lib.build(cfg.optimizer, cfg.model, params_shape, steps), opt_lib.schedule(cfg.optimizer, steps)

        def init(rng, hp):
            _, tx, _ = parts(hp)
            params = self.model.init(rng, dummy)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

        def step(state, batch, hp):
            cfg, tx, sched = parts(hp)
            return make_train_step(self.model, tx, cfg, sched)(state, batch)

        def probe_step(state, batch, hp):
            from seismo.instrument.probes import make_step_probes

            cfg, tx, sched = parts(hp)
            return make_train_step(self.model, tx, cfg, sched, make_step_probes(self.model, cfg))(state, batch)

        self._init = jax.jit(jax.vmap(init))
        self._step = jax.jit(jax.vmap(step), donate_argnums=(0,))
        self._probe_step = jax.jit(jax.vmap(probe_step), donate_argnums=(0,))
        self._eval = jax.jit(jax.vmap(make_eval_step(self.model, self.base), in_axes=(0, None, None)))
        self.rngs = jnp.stack([jax.random.PRNGKey(c.run.seed) for c in cfgs])

    def init_state(self) -> TrainState:
        return self._init(self.rngs, self.hp)

    def batch(self, step: int) -> dict[str, jax.Array]:
        per_point = [self.datasets[c.run.seed].batch(step) for c in self.cfgs]
        return {k: jnp.stack([b[k] for b in per_point]) for k in per_point[0]}

    def step(self, state: TrainState, batch: dict[str, jax.Array], probe: bool = False) -> tuple:
        """(state, metrics, probes or None); every value has a leading points axis."""
        if probe:
            return self._probe_step(state, batch, self.hp)
        return (*self._step(state, batch, self.hp), None)

    def evaluate(self, params: Any) -> np.ndarray:
        """Each point's mean token cross-entropy on the shared evaluation set."""
        chunk = min(len(self.eval_set["inputs"]), self.base.data.batch_size)
        total, count = np.zeros(self.n), 0.0
        for part, weights in padded_chunks(self.eval_set, chunk):
            s, c = jax.device_get(self._eval(params, part, weights))
            total, count = total + np.asarray(s, np.float64), count + float(np.asarray(c)[0])
        return total / max(count, 1.0)


def point_state(state: TrainState, i: int) -> TrainState:
    return jax.tree.map(lambda x: x[i], state)


def stack_states(states: Sequence[TrainState]) -> TrainState:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def train_vmapped(cfgs: Sequence[Config], run_dirs: Sequence[str | Path]) -> list[RunResult]:
    """Train a group of vmappable points, each recorded in its own run directory. Resumes from
    the newest checkpoint step that every point of the group has."""
    group = VmappedGroup(cfgs)
    run_dirs = [Path(d) for d in run_dirs]
    base = group.base
    writers, ckpts = [], []
    for cfg, d in zip(cfgs, run_dirs):
        d.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, d / "config.yaml")
        writers.append(MetricsWriter(d))
        ckpts.append(ckpt_lib.Checkpointer(d / "checkpoints", async_save=base.run.checkpoint_async))
    schedule = ckpt_lib.CheckpointSchedule(base.run)
    state = group.init_state()
    common = set.intersection(*(set(c.steps()) for c in ckpts))
    step = 0
    if common:
        step = max(common)
        template = point_state(state, 0)
        restored = [c.restore_latest(template, steps=[step]) for c in ckpts]
        if all(r is not None for r in restored):
            state = stack_states([r[1] for r in restored])
        else:
            step = 0
    if step == 0:
        losses = group.evaluate(state.params)
        for w, c, i in zip(writers, ckpts, range(group.n)):
            w.truncate_after(-1)
            w.write({"step": 0, "eval_loss": float(losses[i])})
            c.save(0, point_state(state, i), {"vmapped_group": group.n})
    else:
        for w in writers:
            w.truncate_after(step)
    diverged = [False] * group.n
    tokens = base.data.batch_size * base.data.seq_len
    progress = Progress(base.run.steps, step, base.run.progress, desc=f"vmapped x{group.n}")
    t_last, step_last, final = time.perf_counter(), step, None
    for w in writers:
        w.status("running", step)
    while step < base.run.steps and not all(diverged):
        probing = base.run.probe_every > 0 and (step + 1) % base.run.probe_every == 0
        state, metrics, probes = group.step(state, group.batch(step), probe=probing)
        step += 1
        metrics = jax.device_get(metrics)  # one small fetch of [n_points] scalars per step
        probes = jax.device_get(probes) if probing else None
        due = step % base.run.log_every == 0 or step == base.run.steps
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        for i in range(group.n):
            if diverged[i]:
                continue
            row = {k: np.asarray(v)[i] for k, v in metrics.items()}
            if probes is not None:
                writers[i].write({"step": step, "probe": True, **{k: np.asarray(v)[i] for k, v in probes.items()}})
            if not np.isfinite(row["loss"]):
                diverged[i] = True
                writers[i].write({"step": step, "diverged": True, **row})
                continue
            if due:
                writers[i].write({"step": step, **row, "tokens": step * tokens, "step_time_s": dt,
                                  "tokens_per_s": tokens / dt if dt > 0 else None})
        if due:
            t_last, step_last = now, step
            progress.update(step, float(np.nanmin(metrics["loss"])), tokens * group.n / dt if dt > 0 else None)
        if schedule(step):
            for i in range(group.n):
                if not diverged[i]:
                    ckpts[i].save(step, point_state(state, i), {"vmapped_group": group.n})
        if step % base.run.eval_every == 0 or step == base.run.steps:
            final = group.evaluate(state.params)
            for i in range(group.n):
                if not diverged[i]:
                    writers[i].write({"step": step, "eval_loss": float(final[i])})
    progress.close()
    results = []
    for i, (w, c, d) in enumerate(zip(writers, ckpts, run_dirs)):
        c.close()
        status = "diverged" if diverged[i] else ("finished" if step >= base.run.steps else "preempted")
        fe = None if final is None or diverged[i] else float(final[i])
        w.status(status, step, final_eval_loss=fe)
        results.append(RunResult(status=status, step=step, run_dir=d, final_eval_loss=fe))
    return results
