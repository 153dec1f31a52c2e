"""Training: one loop for one run (`seismo train`) and for a vmapped group of runs (a sweep).

    result = train(cfg, run_dir)                     # one run directory
    results = train_group(cfgs, run_dirs)            # vmappable points, one directory each

The run directory is the unit of record (seismo.rundir): `config.yaml` (resolved),
`metrics.jsonl`, `status.json`, `checkpoints/`. The steps come from the one builder
(seismo.train.engine); a vmapped group is the same loop with a points axis, so every point of
a group gets what a single run gets:

* exact resume: starting on directories that have checkpoints resumes from the newest step
  that every point can read, and continues exactly as if never interrupted (batches are a
  pure function of the step);
* SIGTERM/SIGINT save at the next step boundary and exit 0 (status 'preempted');
* the host waits for the device only every `run.log_every` steps (at most every
  `FETCH_WINDOW`), and then while the next step runs: the losses of the steps since the last
  fetch come back as one array, the full metrics of a step only when its row is due, and
  batches go to the jitted step as host arrays (it places them, with no Python per array);
* a non-finite loss is a result: a `divergence` row at the first step whose loss is not
  finite, with the last probe row before it, status 'diverged' (exit code 3), and nothing
  recorded after it (the at most `FETCH_WINDOW` steps run past it are dropped); the other
  points of a group go on;
* the probes' host half (the logit-trend warning) and `loss_at_init` (the step-0 eval).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seismo import config as config_lib
from seismo import data as data_lib
from seismo import models, rundir
from seismo.config import Config
from seismo.instrument.probes import ProbeFactory, StepProbe
from seismo.rundir import row_kind
from seismo.train import checkpoint as ckpt_lib
from seismo.train import engine as engine_lib
from seismo.train import flops as flops_lib
from seismo.train import mesh as mesh_lib
from seismo.train import ownership
from seismo.train import stop as stop_lib
from seismo.train.engine import Engine
from seismo.train.metrics import MetricsWriter, Progress, duration, say
from seismo.train.profile import PROFILE_DIR, StepProfiler
from seismo.train.step import TrainState, padded_chunks
from seismo.train.stop import StopAgreement, StopFlag

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


class Feed:
    """The data side of an engine: each point's batches (one dataset per distinct seed) and
    the shared evaluation set, placed on the engine's mesh from this host's rows."""

    def __init__(self, engine: Engine):
        self.engine = engine
        cfg = engine.cfg
        self.datasets: dict[int, data_lib.Dataset] = {}
        for c in engine.cfgs:
            if c.run.seed not in self.datasets:
                self.datasets[c.run.seed] = data_lib.build(c.data, c.run.seed)
        ds = self.datasets[cfg.run.seed]
        if ds.vocab_size > cfg.model.vocab_size:
            raise config_lib.ConfigError(
                f"data {cfg.data.source!r} has {ds.vocab_size} token ids but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size={ds.vocab_size} or larger")
        self.info = ds.info
        self.eval_set = ds.eval_set()
        self.axis = 1 if engine.vmapped else 0  # the rows axis of a batch
        self.rows = mesh_lib.host_rows(engine.batch_sharding, cfg.data.batch_size, self.axis)
        self.single_process = jax.process_count() == 1

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of `step` for the engine's steps. In a single process it stays numpy: the
        jitted step places it on its devices by its input sharding, in C++ (cheaper than one
        `jax.device_put` per array, 0.3-0.4 ms a step on the tiny model). Across processes
        each host's rows become one global array (`mesh.put_batch`)."""
        e = self.engine
        if not e.vmapped:
            host = self.datasets[e.cfg.run.seed].batch(step, self.rows)
        else:
            per_point = [self.datasets[c.run.seed].batch(step, self.rows) for c in e.cfgs]
            host = {k: np.stack([b[k] for b in per_point]) for k in per_point[0]}
        if self.single_process:
            return host
        return mesh_lib.put_batch(host, e.batch_sharding, e.cfg.data.batch_size, self.axis)

    def evaluate(self, params: Any) -> np.ndarray:
        """Each point's mean token cross-entropy on the evaluation set ([1] for one run);
        padding rows weigh 0."""
        e = self.engine
        sharding = mesh_lib.batch_sharding(e.mesh)
        n = len(self.eval_set["inputs"])
        div = mesh_lib.batch_divisor(e.mesh)
        chunk = -(-min(n, e.cfg.data.batch_size) // div) * div
        rows = mesh_lib.host_rows(sharding, chunk)
        total, count = np.zeros(e.n_points or 1), 0.0
        for part, weights in padded_chunks(self.eval_set, chunk):
            dev = mesh_lib.put_batch({k: v[rows] for k, v in part.items()}, sharding, chunk)
            w = mesh_lib.put_batch({"w": weights[rows]}, sharding, chunk)["w"]
            s, c = jax.device_get(e.eval_step(params, dev, w))
            total, count = total + np.asarray(s, np.float64).reshape(-1), count + float(np.asarray(c).reshape(-1)[0])
        return total / max(count, 1.0)


class PointRun:
    """One run directory inside the loop: its config, metrics writer, checkpoints, probe and
    the state of its record (active until it diverges or is stopped)."""

    def __init__(self, cfg: Config, run_dir: Path, writer_host: bool, probe: StepProbe | None):
        self.cfg, self.run_dir, self.probe = cfg, rundir.path(run_dir), probe
        self.writer = MetricsWriter(self.run_dir, enabled=writer_host, cfg=cfg)
        self.ckpt = ckpt_lib.Checkpointer(self.run_dir / rundir.CHECKPOINTS_DIR, async_save=cfg.run.checkpoint_async)
        self.status = "running"
        self.step = 0
        self.last_probe: dict[str, Any] = {}
        self.loss_at_init: float | None = None
        self.final_eval: float | None = None

    @property
    def active(self) -> bool:
        return self.status == "running"

    # RunLog, for the probe's host half
    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.write(row)

    def warn(self, step: int, message: str, **fields: Any) -> None:
        """A `warning` row (message and `fields`, e.g. the logit warning's event, value and
        predicted step: docs/metrics.md) and one plain line on stderr from the writing host."""
        self.writer.write({"step": step, "kind": "warning", "warning": message, **fields})
        if self.writer.enabled:
            print(f"seismo: warning: {self.run_dir.name}: {message}", file=sys.stderr, flush=True)

    def record(self, step: int, metrics: Mapping[str, Any], probes: Mapping[str, Any] | None, row_due: bool,
               timing: Mapping[str, Any]) -> None:
        """One step's fetched metrics (and probe summary) for this run."""
        self.step = step
        if probes is not None:
            self.last_probe = dict(probes)
            if self.probe is not None:
                self.probe.on_step(step, probes, self)
        if not np.isfinite(metrics["loss"]):
            self.writer.write({"step": step, "kind": "divergence", **metrics,
                               **{f"last_probe/{k}": v for k, v in self.last_probe.items()}})
            self.status = "diverged"
            self.writer.status("diverged", step)
            return
        if row_due:
            self.writer.write({"step": step, "kind": "train", **metrics, **timing})


def _take(tree: Mapping[str, Any], i: int | None) -> dict[str, Any]:
    return {k: (v if i is None else np.asarray(v)[i]) for k, v in tree.items()}


FETCH_WINDOW = 10  # at most this many steps between two waits for the device (loss fetches)


class Recorder:
    """Takes each step's outputs (`add`) and records them in order (`flush`): the losses of
    the pending steps fetched as one array (every step's loss is checked), the whole metrics
    of a step only when its row is due or its loss is not finite, and each active run gets
    its part. `due(step)` says when to flush: after a row step, or once `window` steps wait."""

    def __init__(self, engine: Engine, runs: Sequence[PointRun], progress: Progress, step: int,
                 clock: RunClock | None = None):
        self.engine, self.runs, self.progress = engine, runs, progress
        self.clock = clock if clock is not None else RunClock(engine, runs, step, progress.desc, speak=False)
        cfg = engine.cfg
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        # mfu (seismo.train.flops): one point's PaLM model FLOPs over the whole mesh's peak
        self.flops_per_step = flops_lib.model_flops_per_step(cfg, engine.params_shape)
        self.peak_flops = flops_lib.peak_flops_per_device(jax.devices()[0], cfg.model.dtype, cfg.run.peak_flops)
        self.t_last, self.step_last = time.perf_counter(), step
        self.window = max(1, min(cfg.run.log_every, FETCH_WINDOW))
        self.pending: list[tuple[int, dict[str, jax.Array], dict[str, jax.Array] | None]] = []
        # one compiled stack for any number of pending losses (padded to `window`)
        self._stack = jax.jit(jnp.stack)

    def row_due(self, step: int) -> bool:
        cfg = self.engine.cfg
        return step % cfg.run.log_every == 0 or step == cfg.run.steps

    def add(self, step: int, metrics: dict[str, jax.Array], probes: dict[str, jax.Array] | None) -> None:
        self.pending.append((step, metrics, probes))

    def due(self) -> bool:
        """Whether the steps before the newest pending one (which is still running) should be
        recorded now: `window` of them wait, or the one just before it has a row due. Called
        after every `add`, so the step just before the newest is the only one new here."""
        n = len(self.pending)
        return n > self.window or (n > 1 and self.row_due(self.pending[-2][0]))

    def flush(self, keep: int = 0) -> None:
        """Record the pending steps in order, all but the newest `keep`. Once no run is active
        (all diverged) there is nothing to record, and nothing is fetched."""
        todo = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(todo):]
        if not todo or not any(r.active for r in self.runs):
            return
        for (step, metrics, probes), losses in zip(todo, self._losses([m["loss"] for _, m, _ in todo])):
            self._record(step, metrics, probes, losses)

    def __call__(self, step: int, metrics: dict[str, jax.Array], probes: dict[str, jax.Array] | None) -> None:
        """Record one step now (the steps pending before it first)."""
        self.add(step, metrics, probes)
        self.flush()

    def _losses(self, losses: list[jax.Array]) -> list[np.ndarray]:
        """Each pending step's loss on the host (one value per point), in one transfer."""
        if len(losses) == 1:
            return [np.asarray(jax.device_get(losses[0])).reshape(-1)]
        n = -(-len(losses) // self.window) * self.window  # one compiled shape: pad to `window`
        host = np.asarray(jax.device_get(self._stack(losses + losses[-1:] * (n - len(losses)))))
        return [row.reshape(-1) for row in host[:len(losses)]]

    def _record(self, step: int, metrics: dict[str, jax.Array], probes: dict[str, jax.Array] | None,
                losses: np.ndarray) -> None:
        due = self.row_due(step)
        if due or not np.all(np.isfinite(losses)):
            metrics = jax.device_get(metrics)
        else:
            metrics = {"loss": losses if self.engine.vmapped else losses[0]}
        # the summary comes packed, one vector per dtype (engine.SummaryLayout): one transfer each
        probes = self.engine.unpack_probes(probes) if probes is not None else None
        timing: dict[str, Any] = {}
        if due:
            now = time.perf_counter()
            dt = (now - self.t_last) / max(step - self.step_last, 1)
            timing = {"tokens": step * self.tokens_per_step, "step_time_s": dt,
                      "tokens_per_s": self.tokens_per_step / dt if dt > 0 else None,
                      "mfu": flops_lib.mfu(self.flops_per_step, dt, self.engine.mesh.size, self.peak_flops)}
            self.t_last, self.step_last = now, step
        for i, run in enumerate(self.runs):
            if run.active:
                idx = i if self.engine.vmapped else None
                run.record(step, _take(metrics, idx), None if probes is None else _take(probes, idx), due, timing)
                if run.active:
                    self.clock.last_loss[i] = float(losses[i])
        self.clock.step = step
        if due:
            live = [float(losses[i]) for i, r in enumerate(self.runs) if r.active]
            tps = timing["tokens_per_s"] and timing["tokens_per_s"] * len(self.runs)
            self.progress.update(step, min(live) if live else None, tps)
        if self.progress.line_due(step, due):
            live = [float(losses[i]) for i, r in enumerate(self.runs) if r.active]
            note = f" (lowest of {len(live)} running)" if len(self.runs) > 1 else ""
            self.progress.line(step, min(live) if live else None, note)


class RunClock:
    """The wall-clock side of a run, for the people watching it (on the writer host):

    * the compile lines: the first call of each jitted step blocks while XLA traces and
      compiles it (the plain train step, and the instrumented probe step, compiled beside it,
      the first time a probe is due), so a line says so before and another how long it took;
    * the end-of-run summary (`summary`, printed by `_finish`): status, steps, wall time and
      compile time, tokens/s, parameter count, final train and eval loss, the run directory
      and what it holds."""

    STEP_WORDS = {"train": "train step", "probe": "probe step (the instrumented step, every run.probe_every steps)"}

    def __init__(self, engine: Engine, runs: Sequence[PointRun], step: int, desc: str, speak: bool = True,
                 progress: Progress | None = None):
        self.engine, self.runs, self.desc, self.speak, self.progress = engine, runs, desc, speak, progress
        self.t0, self.start_step, self.step = time.perf_counter(), step, step
        self.compile_s: dict[str, float] = {}
        self.last_loss: dict[int, float] = {}

    def call(self, name: str, fn: Any, *args: Any) -> Any:
        """`fn(*args)`; its first call is announced and timed (the compile)."""
        if name in self.compile_s:
            return fn(*args)
        if self.speak:
            say(f"{self.desc}: compiling the {self.STEP_WORDS.get(name, name)} ...")
        t = time.perf_counter()
        out = fn(*args)
        self.compile_s[name] = time.perf_counter() - t
        if self.progress is not None:
            self.progress.pause(self.compile_s[name])  # not part of the rate of the steps
        if self.speak:
            say(f"{self.desc}: {name} step compiled in {duration(self.compile_s[name])}")
        return out

    def summary(self) -> list[str]:
        """The end-of-run summary, one string per line."""
        e, cfg = self.engine, self.engine.cfg
        wall = time.perf_counter() - self.t0
        steps = self.step - self.start_step
        compile_s = sum(self.compile_s.values())
        tokens = steps * cfg.data.batch_size * cfg.data.seq_len * (e.n_points or 1)
        rate = tokens / max(wall - compile_s, 1e-9) if steps else 0.0
        n, n_body = models.param_count(e.params_shape), models.param_count(e.params_shape, non_embedding=True)
        statuses = sorted({r.status for r in self.runs})
        done = (f"{steps} steps in {duration(wall)} ({duration(compile_s)} compiling), {rate:,.0f} tokens/s after "
                "the compile" if steps else "nothing left to train")
        head = (f"{self.desc}: {'/'.join(statuses)} at step {self.step}/{cfg.run.steps}: {done}, {n:,} parameters "
                f"({n_body:,} non-embedding)" + (f" per run, {e.n_points} runs" if e.vmapped else ""))
        lines = [head]
        for i, r in enumerate(self.runs):
            loss = self.last_loss.get(i)
            word = "last finite train loss" if r.status == "diverged" else "train loss"
            parts = [f"{word} {loss:.4f}"] if loss is not None else []
            if r.final_eval is not None:
                parts.append(f"eval loss {r.final_eval:.4f}")
            lines.append(f"  {r.run_dir}: {r.status} at step {r.step}" + "".join(", " + p for p in parts))
        lines.append(f"  {'each run directory' if len(self.runs) > 1 else 'the run directory'} holds: "
                     + ", ".join(_listing(self.runs[0])))
        return lines


def _listing(run: PointRun) -> list[str]:
    """What a run directory holds, for the summary: files, and folders with a word on each."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in run.run_dir.iterdir() if not p.name.startswith("."))
    except OSError:
        return ["(cannot be listed)"]
    steps = run.ckpt.steps()
    shown = ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    words = {rundir.CHECKPOINTS_DIR + "/": f"{rundir.CHECKPOINTS_DIR}/ (steps {shown})" if steps else None}
    return [words.get(n) or n for n in names]


def train(cfg: Config, run_dir: str | Path, *, probe: ProbeFactory | None = None,
          stop_at: int | None = None, restart: bool = False) -> RunResult:
    """Train `cfg` into `run_dir`, resuming from its newest checkpoint if it has one.
    `probe` makes the in-step probe (default: seismo's instability probes, when
    run.probe_every > 0). `stop_at` ends the run early at that step (with a checkpoint), as
    a preemption would. A run directory made by another config is refused
    (seismo.train.ownership); `restart` moves it aside first and starts over."""
    return _train([cfg], [rundir.path(run_dir)], vmapped=False, probe=probe, stop_at=stop_at, restart=restart)[0]


def train_group(cfgs: Sequence[Config], run_dirs: Sequence[str | Path], *,
                stop_at: int | None = None, restart: bool = False) -> list[RunResult]:
    """Train vmappable points (configs that differ only in `engine.VMAPPABLE_KEYS`) as one
    program, each recorded in its own run directory, exactly as `train` records one run."""
    return _train(list(cfgs), [rundir.path(d) for d in run_dirs], vmapped=True, stop_at=stop_at, restart=restart)


def _claim(cfgs: Sequence[Config], run_dirs: Sequence[Path], writer_host: bool, restart: bool,
           locks: list[ownership.RunLock]) -> list[str | None]:
    """Each run directory checked against its config and locked, before anything is written;
    the notices (run.steps extended) per run."""
    notices = []
    for c, d in zip(cfgs, run_dirs):
        if restart and writer_host:
            aside = ownership.set_aside(d)
            if aside is not None:
                print(f"seismo: moved the old run {d} aside to {aside}", file=sys.stderr, flush=True)
        notices.append(ownership.check_config_matches(d, c))
    if writer_host:
        for d in run_dirs:
            locks.append(ownership.RunLock(d, "seismo train").acquire())
    return notices


def _train(cfgs: list[Config], run_dirs: list[Path], *, vmapped: bool, probe: ProbeFactory | None = None,
           stop_at: int | None = None, restart: bool = False) -> list[RunResult]:
    stop = StopFlag()
    stop.install()  # before anything slow: a signal during start-up or compile still saves
    locks: list[ownership.RunLock] = []
    try:
        for c in cfgs:
            engine_lib.check_config(c)
        mesh_lib.maybe_initialize_distributed(cfgs[0].mesh)
        agree = StopAgreement(stop)  # across processes: one stop decision, at the same step on every host
        writer_host = jax.process_index() == 0
        mesh, layout = mesh_lib.build_mesh(cfgs[0].mesh)  # mesh, memory and data are checked before anything is written
        cfgs = [c.replace(mesh=layout.resolve(c.mesh)) for c in cfgs]  # config.yaml records the layout used
        engine = engine_lib.build(cfgs[0], mesh, points=cfgs if vmapped else None, probe=probe)
        engine_lib.check_memory(engine)
        cfgs = list(engine.cfgs)  # with what `auto` resolved to (model.attention_impl), as config.yaml records
        feed = Feed(engine)
        if agree.at_start():  # stopped while starting up (on any host): nothing written, nothing to save
            return [RunResult(status="preempted", step=0, run_dir=d) for d in run_dirs]
        notices = _claim(cfgs, run_dirs, writer_host, restart, locks)
        runs = []
        for i, (c, d) in enumerate(zip(cfgs, run_dirs)):
            d.mkdir(parents=True, exist_ok=True)
            if writer_host:
                config_lib.dump(c, d / rundir.CONFIG_FILE)
            runs.append(PointRun(c, d, writer_host, engine.probes[i] if engine.probes else None))
        if writer_host:  # the first line, before the silent part (init, the step-0 eval, the compiles)
            say(_start_line(engine, runs))
        record = {"data": feed.info, "steps": engine.cfg.run.steps,
                  "attention_impl": engine.cfg.model.attention_impl}
        if vmapped:
            record["vmapped_group"] = len(cfgs)
        try:
            state, step = _start(engine, feed, runs, record)
            for r, notice in zip(runs, notices):
                if notice:
                    r.warn(step, notice)
                if layout.note:  # a mesh in device order is never silent
                    r.warn(step, layout.note)
            clock = _run_steps(engine, feed, runs, state, step, record, agree, stop_at)
            results = _finish(runs, clock)
        except Exception as e:
            unwritable = _storage_error(e, runs)
            if unwritable is None:
                raise
            raise unwritable from None
    finally:
        stop.restore()
        for lock in locks:
            lock.release()
    return results


def _desc(engine: Engine, runs: Sequence[PointRun]) -> str:
    """How the lines on stderr name a run: its directory's name, or 'vmapped xN' for a group."""
    return runs[0].run_dir.name if not engine.vmapped else f"vmapped x{engine.n_points}"


def _start_line(engine: Engine, runs: Sequence[PointRun]) -> str:
    """What is about to run: 'tiny: 131,392 parameters, 200 steps of 8 x 64 tokens, attention
    explicit, on 1 cpu device; run directory runs/tiny' (a vmapped group names its points)."""
    cfg = engine.cfg
    desc = _desc(engine, runs)
    n = models.param_count(engine.params_shape)
    where = (f"run directory {runs[0].run_dir}" if len(runs) == 1
             else f"{len(runs)} run directories in {runs[0].run_dir.parent}")
    devices = engine.mesh.size
    return (f"{desc}: {n:,} parameters{' per run' if engine.vmapped else ''}, {cfg.run.steps} steps of "
            f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens, attention {cfg.model.attention_impl}, on "
            f"{devices} {engine.mesh.devices.flat[0].platform} device{'s' if devices > 1 else ''}; {where}")


class RunDirUnwritable(OSError):
    """The run directory could not be written (a full disk, a read-only folder). Nothing is
    lost: the newest checkpoint and metrics.jsonl are as they were, and the same command
    resumes once the cause is gone."""


_STORAGE_WORDS = ("No space left on device", "Read-only file system", "os_error_code='28'", "os_error_code='30'",
                  "Disk quota exceeded", "Permission denied")


def _storage_error(e: BaseException, runs: Sequence[PointRun]) -> RunDirUnwritable | None:
    """A RunDirUnwritable for an error that comes from storage (an OSError, or Orbax and
    tensorstore reporting one in their own error types), None for anything else."""
    text = f"{type(e).__name__}: {e}"
    if not (isinstance(e, OSError) or any(w in text for w in _STORAGE_WORDS)):
        return None
    reason = next((w for w in _STORAGE_WORDS if w in text and not w.startswith("os_")), None)
    reason = reason or (e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__)
    for r in runs:  # let Orbax finish or drop what it was writing, so nothing half-made is left behind
        try:
            r.ckpt.close()
        except Exception:  # noqa: BLE001 - the storage is failing; the error below says so
            pass
    where = ", ".join(str(r.run_dir) for r in runs)
    return RunDirUnwritable(f"cannot write {where} ({reason}) at step {max(r.step for r in runs)}; free space or make "
                            "it writable, then run the same command again: it resumes from the newest checkpoint")


def _finish(runs: Sequence[PointRun], clock: RunClock | None = None) -> list[RunResult]:
    """Each run's final status (and its trackers closed); the summary, when a clock is given."""
    results = []
    for r in runs:
        r.ckpt.close()
        if r.status == "running":
            r.status = "finished"
        r.writer.status(r.status, r.step, final_eval_loss=r.final_eval)
        r.writer.close()
        results.append(RunResult(status=r.status, step=r.step, run_dir=r.run_dir, final_eval_loss=r.final_eval,
                                 loss_at_init=r.loss_at_init))
    if clock is not None and clock.speak:
        for line in clock.summary():
            say(line)
    return results


def _restore(engine: Engine, runs: Sequence[PointRun]) -> tuple[int, TrainState] | None:
    """The newest step that every run has and every process can read, and the (stacked) state
    there; None for runs that have no checkpoint yet. Unreadable checkpoints are set aside on
    the way (seismo.train.checkpoint); when checkpoints exist but no step can be used, the run
    is refused rather than started over on top of its record.

    Across processes the choice is agreed (seismo.train.stop): each step is tried newest
    first, the newest any process lists; it is used when every process read it, and set aside
    for all when one could not (a host whose view of the storage is stale or failing), so
    every host restores the same step or every host refuses."""
    had = [r.ckpt.steps() for r in runs]
    common = set.intersection(*(set(h) for h in had))
    while (step := stop_lib.newest_everywhere(max(common, default=-1))) >= 0:
        common.discard(step)
        restored = [r.ckpt.restore_latest(engine.point_state_shape, steps=[step], agree=stop_lib.processes_where_false)
                    for r in runs]
        if all(x is not None for x in restored):  # the same on every process: each restore was agreed
            return step, engine.stack([x[1] for x in restored])
    if stop_lib.any_process(any(had)):
        where = "; ".join(f"{r.run_dir}: {len(h)} checkpoint(s)" for r, h in zip(runs, had) if h)
        aside = sum(len(r.ckpt.set_aside_steps) for r in runs)
        raise ckpt_lib.NoReadableCheckpoint(
            f"no checkpoint step can be restored ({where}; {aside} unreadable set aside as <step>.corrupt-*); "
            "the run is not started over on top of its record: pass --restart to move it aside and start again")
    return None


def _start(engine: Engine, feed: Feed, runs: Sequence[PointRun], record: dict) -> tuple[TrainState, int]:
    restored = _restore(engine, runs)
    if restored is not None:
        step, state = restored
        kept = [r.writer.truncate_after(step) for r in runs]
        for r, rows in zip(runs, kept):
            r.step = step
            if r.probe is not None and hasattr(r.probe, "resume"):  # host-side state (the logit trend)
                r.probe.resume(rows)
            evals = [x["eval_loss"] for x in rows if row_kind(x) == "eval"]
            r.final_eval = evals[-1] if evals else None
        # An eval row due at the restored step is missing when the run was killed between
        # that checkpoint and its eval (the final one included): compute it now.
        cfg = engine.cfg
        due = step > 0 and (step % cfg.run.eval_every == 0 or step == cfg.run.steps)
        # Every host evaluates (a collective), whatever its own copy of the file says.
        if due:
            losses = feed.evaluate(state.params)
            for i, (r, rows) in enumerate(zip(runs, kept)):
                r.final_eval = float(losses[i])
                if not any(row_kind(x) == "eval" and x["step"] == step for x in rows):
                    r.writer.write({"step": step, "kind": "eval", "eval_loss": r.final_eval})
        return state, step
    state = engine.init_state()
    losses = feed.evaluate(state.params)
    for i, r in enumerate(runs):
        r.writer.truncate_after(-1)
        r.loss_at_init = float(losses[i])
        r.writer.write({"step": 0, "kind": "eval", "eval_loss": r.loss_at_init})
        r.ckpt.save(0, engine.point(state, i), record)
    return state, 0


def _probe_due(cfg: Config, step: int) -> bool:
    return cfg.run.probe_every > 0 and step % cfg.run.probe_every == 0


def _run_steps(engine: Engine, feed: Feed, runs: Sequence[PointRun], state: TrainState, step: int, record: dict,
               stop: StopAgreement, stop_at: int | None) -> None:
    cfg = engine.cfg
    schedule = ckpt_lib.CheckpointSchedule(cfg.run)
    desc = _desc(engine, runs)
    speak = runs[0].writer.enabled  # progress, compile lines and the summary on the writer host only
    progress = Progress(cfg.run.steps, step, cfg.run.progress if speak else "off", desc=desc,
                        log_seconds=cfg.run.log_seconds,
                        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len * (engine.n_points or 1))
    clock = RunClock(engine, runs, step, desc, speak=speak, progress=progress)
    rec = Recorder(engine, runs, progress, step, clock)
    profiler = StepProfiler(cfg.run.profile_steps, runs[0].run_dir / PROFILE_DIR)  # run.profile_steps: [a, b]
    active = lambda: any(r.active for r in runs)
    for r in runs:
        r.writer.status("running", step)
    try:
        while step < cfg.run.steps and active():
            probing = engine.probe_step is not None and _probe_due(cfg, step + 1)
            profiler.before(step + 1)
            out = clock.call("probe" if probing else "train", engine.probe_step if probing else engine.train_step,
                             state, feed.batch(step))
            state, step = out[0], step + 1
            profiler.after(step, state)
            rec.add(step, out[1], out[2] if probing else None)
            if rec.due():  # the earlier steps' numbers, fetched while this one runs
                rec.flush(keep=1)
            if not active():
                break
            stopping = stop(step) or step == stop_at  # asked every step, on every host
            evaluating = step % cfg.run.eval_every == 0 or step == cfg.run.steps
            saving = schedule(step) or stopping or step == cfg.run.steps
            if saving or evaluating:  # a run that diverged before this step is neither saved nor evaluated
                rec.flush()
            if saving:
                for i, r in enumerate(runs):
                    if r.active:
                        r.ckpt.save(step, engine.point(state, i), record)
                        r.writer.status("running", step)  # status.json follows the newest checkpoint
            if evaluating and active():
                losses = feed.evaluate(state.params)
                for i, r in enumerate(runs):
                    if r.active:
                        r.final_eval = float(losses[i])
                        r.writer.write({"step": step, "kind": "eval", "eval_loss": r.final_eval})
            if stopping:
                for r in runs:
                    if r.active:
                        r.status = "preempted"
                        r.writer.write({"step": step, "kind": "preemption"})
                break
        rec.flush()
    finally:
        profiler.close()
        rec.progress.close()
    return clock
