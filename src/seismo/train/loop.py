"""Training runs: `seismo train CONFIG` and `seismo.train.train(cfg, run_dir)`.

A run directory is the unit of record (DESIGN.md): `config.yaml` (resolved), `metrics.jsonl`,
`status.json`, `checkpoints/`. Starting a run on a directory that has checkpoints resumes
from the newest readable one and continues exactly as if never interrupted (batches are a
pure function of the step). SIGTERM/SIGINT save at the next step boundary and exit 0. A
non-finite loss is a result: a `diverged` row is written and the run ends with status
'diverged' (exit code 3), so sweeps count it instead of crashing.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seismo import config as config_lib
from seismo import data as data_lib
from seismo import models
from seismo.config import Config
from seismo.train import checkpoint as ckpt_lib
from seismo.train import mesh as mesh_lib
from seismo.train import optimizer as opt_lib
from seismo.train.metrics import MetricsWriter, Progress
from seismo.train.step import TrainState, make_eval_step, make_train_step, padded_chunks, under_mesh

EXIT_CODES = {"finished": 0, "preempted": 0, "diverged": 3}


@dataclasses.dataclass
class RunResult:
    status: str  # finished | diverged | preempted
    step: int
    run_dir: Path
    final_eval_loss: float | None = None
    loss_at_init: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def match_shardings(tree: Any, params: Any, param_sh: Any, fallback: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path
    and has its shape takes that parameter's sharding (Adam's mu and nu); others replicate."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        by_path[tuple(map(str, path))] = (leaf.shape, path)
    sh_leaves = dict((tuple(map(str, p)), s) for p, s in jax.tree_util.tree_leaves_with_path(param_sh))

    def pick(path: Any, leaf: Any) -> Any:
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return sh_leaves[keys[i:]]
        return fallback

    return jax.tree_util.tree_map_with_path(pick, tree)


class Trainer:
    """Everything a run needs, built once: mesh, data, model, optimizer, compiled steps."""

    def __init__(self, cfg: Config, run_dir: str | Path, probe_fn: Any = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        mesh_lib.maybe_initialize_distributed(cfg.mesh)
        self.is_writer = jax.process_index() == 0
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.data = data_lib.build(cfg.data, cfg.run.seed)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise config_lib.ConfigError(
                f"data {cfg.data.source!r} has {self.data.vocab_size} token ids but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size={self.data.vocab_size} or larger")
        div = mesh_lib.batch_divisor(self.mesh)
        if cfg.data.batch_size % (div * cfg.optimizer.grad_accum_steps):
            raise config_lib.ConfigError(
                f"data.batch_size ({cfg.data.batch_size}) must be divisible by mesh data*fsdp ({div}) "
                f"times optimizer.grad_accum_steps ({cfg.optimizer.grad_accum_steps})")
        self.model = models.build(cfg.model)
        self.schedule = opt_lib.schedule(cfg.optimizer, cfg.run.steps)
        self.batch_sh = mesh_lib.batch_sharding(self.mesh)
        self.rows = mesh_lib.host_rows(self.batch_sh, cfg.data.batch_size)  # this host's rows of a batch
        self.eval_set = self.data.eval_set()
        self._build_state_fns()
        repl = mesh_lib.replicated(self.mesh)  # metrics replicated: every host can fetch them
        self.step_fn = jax.jit(under_mesh(make_train_step(self.model, self.tx, cfg, self.schedule), self.mesh),
                               in_shardings=(self.state_sh, self.batch_sh),
                               out_shardings=(self.state_sh, repl), donate_argnums=(0,))
        self.probe_step_fn = None
        if probe_fn is None and cfg.run.probe_every > 0:
            from seismo.instrument.probes import make_step_probes

            probe_fn = make_step_probes(self.model, cfg)
        if probe_fn is not None:
            self.probe_step_fn = jax.jit(under_mesh(make_train_step(self.model, self.tx, cfg, self.schedule, probe_fn),
                                                    self.mesh),
                                         in_shardings=(self.state_sh, self.batch_sh),
                                         out_shardings=(self.state_sh, repl, repl), donate_argnums=(0,))
        self.eval_fn = jax.jit(under_mesh(make_eval_step(self.model, cfg), self.mesh),
                               in_shardings=(self.state_sh.params, self.batch_sh, self.batch_sh),
                               out_shardings=repl)

    def _build_state_fns(self) -> None:
        cfg = self.cfg
        dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
        rng = jax.random.PRNGKey(cfg.run.seed)
        params_shape = jax.eval_shape(self.model.init, rng, dummy)
        self.tx = opt_lib.build(cfg.optimizer, cfg.model, params_shape, cfg.run.steps)
        param_sh = mesh_lib.param_shardings(self.model.param_axes(), params_shape, self.mesh)

        def init(rng):
            params = self.model.init(rng, dummy)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        state_shape = jax.eval_shape(init, rng)
        repl = mesh_lib.replicated(self.mesh)
        self.state_sh = TrainState(step=repl, params=param_sh,
                                   opt_state=match_shardings(state_shape.opt_state, params_shape, param_sh, repl))
        self._init = jax.jit(init, out_shardings=self.state_sh)
        self._rng = rng

    def init_state(self) -> TrainState:
        return self._init(self._rng)

    def device_batch(self, step: int) -> dict[str, jax.Array]:
        return mesh_lib.put_batch(self.data.batch(step, self.rows), self.batch_sh, self.cfg.data.batch_size)

    def evaluate(self, params: Any) -> float:
        """Mean token cross-entropy on the fixed evaluation set (padding rows weigh 0)."""
        n = len(self.eval_set["inputs"])
        div = mesh_lib.batch_divisor(self.mesh)
        chunk = -(-min(n, self.cfg.data.batch_size) // div) * div
        rows = mesh_lib.host_rows(self.batch_sh, chunk)
        total, count = 0.0, 0.0
        for part, weights in padded_chunks(self.eval_set, chunk):
            dev = mesh_lib.put_batch({k: v[rows] for k, v in part.items()}, self.batch_sh, chunk)
            w = mesh_lib.put_batch({"w": weights[rows]}, self.batch_sh, chunk)["w"]
            s, c = jax.device_get(self.eval_fn(params, dev, w))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)


def _probe_due(cfg: Config, step: int) -> bool:
    return cfg.run.probe_every > 0 and step % cfg.run.probe_every == 0


def train(cfg: Config, run_dir: str | Path, *, probe_fn: Any = None, stop_at: int | None = None) -> RunResult:
    """Train `cfg` into `run_dir`, resuming from its newest checkpoint if it has one.
    `stop_at` ends the run early at that step (with a checkpoint), as a preemption would."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, run_dir, probe_fn=probe_fn)
    writer = MetricsWriter(run_dir, enabled=tr.is_writer)
    if tr.is_writer:
        config_lib.dump(cfg, run_dir / "config.yaml")
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", async_save=cfg.run.checkpoint_async)
    schedule = ckpt_lib.CheckpointSchedule(cfg.run)
    record = {"data": tr.data.info, "steps": cfg.run.steps}
    state = tr.init_state()
    restored = ckpt.restore_latest(state)
    loss_at_init = None
    if restored is None:
        step = 0
        writer.truncate_after(-1)
        loss_at_init = tr.evaluate(state.params)
        writer.write({"step": 0, "eval_loss": loss_at_init})
        ckpt.save(0, state, record)
    else:
        step, state, _ = restored
        writer.truncate_after(step)
    result = _run_steps(tr, state, step, writer, ckpt, schedule, record, stop_at)
    result.loss_at_init = loss_at_init
    ckpt.close()
    writer.status(result.status, result.step, final_eval_loss=result.final_eval_loss)
    return result


def _run_steps(tr: Trainer, state: TrainState, step: int, writer: MetricsWriter, ckpt: ckpt_lib.Checkpointer,
               schedule: ckpt_lib.CheckpointSchedule, record: dict, stop_at: int | None) -> RunResult:
    cfg = tr.cfg
    stop = _StopFlag()
    stop.install()
    rec = _Recorder(tr, writer, Progress(cfg.run.steps, step, cfg.run.progress), step)
    pending, final_eval, status = None, None, "finished"
    try:
        writer.status("running", step)
        while step < cfg.run.steps and status != "diverged":
            probing = tr.probe_step_fn is not None and _probe_due(cfg, step + 1)
            out = (tr.probe_step_fn if probing else tr.step_fn)(state, tr.device_batch(step))
            state, step = out[0], step + 1
            if pending is not None:  # the previous step's numbers, fetched while this one runs
                status = rec(*pending)
            pending = (step, out[1], out[2] if probing else None)
            if status == "diverged":
                break
            if schedule(step) or stop.requested or step == stop_at or step == cfg.run.steps:
                status, pending = rec(*pending), None
                if status == "diverged":
                    break
                ckpt.save(step, state, record)
            if step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                final_eval = tr.evaluate(state.params)
                writer.write({"step": step, "eval_loss": final_eval})
            if stop.requested or step == stop_at:
                status = "preempted"
                writer.write({"step": step, "preempted": True})
                break
        if pending is not None and status != "diverged":
            status = rec(*pending)
    finally:
        stop.restore()
        rec.progress.close()
    return RunResult(status=status, step=step, run_dir=tr.run_dir, final_eval_loss=final_eval)


class _Recorder:
    """Fetches one step's metrics to the host, writes the rows that are due, detects divergence,
    and warns once when the layer-0 attention-logit trend predicts crossing the threshold."""

    def __init__(self, tr: Trainer, writer: MetricsWriter, progress: Progress, step: int):
        self.tr, self.writer, self.progress = tr, writer, progress
        self.tokens_per_step = tr.cfg.data.batch_size * tr.cfg.data.seq_len
        self.t_last, self.step_last = time.perf_counter(), step
        self.last_probe: dict[str, Any] = {}
        self.logit_history: list[tuple[int, float]] = []
        self.warned = False
        if tr.probe_step_fn is not None:  # load it now, not in the middle of training
            from seismo.analysis.extrapolate import logit_trend_warning

            self.logit_trend_warning = logit_trend_warning

    def __call__(self, step: int, metrics: dict, probes: dict | None) -> str:
        cfg = self.tr.cfg
        due = step % cfg.run.log_every == 0 or step == cfg.run.steps
        # Every step needs only the loss (divergence); the full dict only when a row is due.
        loss = float(jax.device_get(metrics["loss"]))
        if due or not np.isfinite(loss):
            metrics = jax.device_get(metrics)
        if probes is not None:
            probes = jax.device_get(probes)
            self.last_probe = probes
            self.writer.write({"step": step, "probe": True, **probes})
            self._check_logit_trend(step, probes)
        if not np.isfinite(loss):
            self.writer.write({"step": step, "diverged": True, **metrics,
                               **{f"last_probe/{k}": v for k, v in self.last_probe.items()}})
            return "diverged"
        if due:
            now = time.perf_counter()
            dt = (now - self.t_last) / max(step - self.step_last, 1)
            row = {"step": step, **metrics, "tokens": step * self.tokens_per_step, "step_time_s": dt,
                   "tokens_per_s": self.tokens_per_step / dt if dt > 0 else None}
            self.writer.write(row)
            self.progress.update(step, loss, row["tokens_per_s"])
            self.t_last, self.step_last = now, step
        return "finished"

    def _check_logit_trend(self, step: int, probes: dict) -> None:
        logits = probes.get("attn_logit_max")
        if logits is None or self.warned:
            return
        self.logit_history.append((step, float(np.asarray(logits).reshape(-1)[0])))
        if len(self.logit_history) < 4:
            return
        steps, values = zip(*self.logit_history)
        msg = self.logit_trend_warning(list(steps), list(values), self.tr.cfg.run.steps,
                                  self.tr.cfg.run.logit_warning_threshold)
        if msg:
            self.warned = True
            warnings.warn(msg, stacklevel=2)
            self.writer.write({"step": step, "warning": msg})
