"""Trackers: where a run's metrics go besides `metrics.jsonl`, which is always written.

    run:
      trackers: [jsonl, tensorboard, wandb]

* **tensorboard**: event files in `<run dir>/tensorboard/`, written with TensorBoard's own
  event writer (`tensorboard.summary.writer.EventFileWriter`, no TensorFlow needed). View
  with `tensorboard --logdir runs/` (a sweep: `--logdir runs/<sweep>/runs`).
* **wandb**: a Weights & Biases run in `<run dir>/wandb/`, offline unless `WANDB_MODE` says
  otherwise (`WANDB_MODE=online` with a `wandb login`); upload an offline run later with
  `wandb sync <run dir>/wandb/offline-run-*`. Project `WANDB_PROJECT` (default `seismo`),
  run name the run directory's name, group the sweep's name for a sweep point, config the
  resolved config. The run id is kept in `<run dir>/wandb/seismo-run-id`, so every start of
  the same run directory logs to the same W&B run.

Names are those of metrics.jsonl (`scalars`): a scalar keeps its key (`loss`, `eval_loss`,
`grad_rms/head/kernel`), a per-layer list becomes one scalar per layer, `<key>/layer_<i>`
(`attn_logit_max/layer_0`); `step` is the x axis; warnings, divergence and preemption rows
become text (TensorBoard's text plugin; a string in W&B).

**Resume.** metrics.jsonl drops the rows past the restored checkpoint (seismo.train.metrics).
A tracker cannot take back what it wrote, so: TensorBoard gets a `SessionLog.START` event
at the first step the resumed run records, which makes TensorBoard's readers discard the
earlier events at and past that step (TensorBoard's own restart rule), so the curves read as
one run with no step twice. W&B accepts each step once per run and in increasing order: the
resumed run logs only the steps past the last one logged before (kept in
`<run dir>/wandb/seismo-last-step`, written with every logged step); the steps between the
checkpoint and that point keep the values logged first, which the exact resume reproduces (the
same batches, the same arithmetic), timings aside. (After a hard kill, SIGKILL or a lost
machine, W&B may not have flushed its last seconds of records to its run file: those steps
are then missing from W&B, never doubled; metrics.jsonl and TensorBoard have them.)

Only the writer host (process 0) opens trackers. A tracker that fails while running (W&B
cannot start, say) is switched off with one line on stderr; metrics.jsonl goes on. A config
that names a tracker whose package is not installed is refused before anything trains
(`check_available`): they come with the `trackers` extra, `pip install 'seismo[trackers]'`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from seismo import config as config_lib
from seismo import rundir
from seismo.config import Config, ConfigError

EXTRA = "trackers"  # pip install 'seismo[trackers]'
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs
TEXT_KINDS = ("warning", "divergence", "preemption")


def check_available(cfg: Config) -> None:
    """Refuse (ConfigError) a config whose run.trackers need a package that is not installed."""
    missing = [t for t in cfg.run.trackers if t in PACKAGES and importlib.util.find_spec(PACKAGES[t]) is None]
    if missing:
        raise ConfigError(f"run.trackers names {', '.join(missing)}, but {' and '.join(PACKAGES[t] for t in missing)} "
                          f"is not installed; install seismo's {EXTRA!r} extra (pip install 'seismo[{EXTRA}]') "
                          "or leave it out of run.trackers")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (as metrics.jsonl writes it) under their tracker names:
    a scalar keeps its key, a per-layer list becomes `<key>/layer_<i>` (a list inside that,
    `<key>/layer_<i>/<j>`), a mapping `<key>/<name>`. `step`, `kind`, text and missing
    (non-finite) values are left out; booleans count as 0 and 1."""
    out: dict[str, float] = {}

    def add(name: str, value: Any, depth: int) -> None:
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{name}/{k}", v, depth)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{name}/layer_{i}" if depth == 0 else f"{name}/{i}", v, depth + 1)

    for key, value in row.items():
        if key not in ("step", "kind"):
            add(str(key), value, 0)
    return out


def text_of(row: Mapping[str, Any]) -> str | None:
    """The sentence a warning, divergence or preemption row stands for; None for other rows."""
    kind = rundir.row_kind(row)
    if kind == "warning":
        return str(row.get("warning", ""))
    if kind == "divergence":
        return f"diverged at step {row['step']}: the training loss is not finite"
    if kind == "preemption":
        return f"stopped at step {row['step']} (preempted); the same command resumes from here"
    return None


class Tracker(Protocol):
    def resume(self, step: int) -> None:
        """The run continues after `step` (the restored checkpoint; -1 for a fresh start)."""

    def write(self, row: Mapping[str, Any]) -> None:
        """One metrics row, JSON-ready (as metrics.jsonl has it)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in `<run dir>/tensorboard/`, through TensorBoard's writer (no TensorFlow)."""

    def __init__(self, run_dir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.dir = Path(run_dir) / rundir.TENSORBOARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.dir), max_queue_size=100, flush_secs=30)
        print(f"seismo: TensorBoard events in {self.dir} (tensorboard --logdir {self.dir})", file=sys.stderr, flush=True)

    def resume(self, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        # TensorBoard's restart rule: readers drop every earlier event at or past this step
        self._writer.add_event(event_pb2.Event(step=step + 1, wall_time=time.time(),
                                               session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def write(self, row: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars(row).items()]
        text = text_of(row)
        if text is not None:
            values.append(_text_value(rundir.row_kind(row), text))
        if values:
            self._writer.add_event(event_pb2.Event(step=int(row["step"]), wall_time=time.time(),
                                                   summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _text_value(tag: str, text: str) -> Any:
    """A summary value for TensorBoard's text plugin (a string tensor with its metadata)."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.text import metadata

    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata.create_summary_metadata())


RUN_ID_FILE = "seismo-run-id"
LAST_STEP_FILE = "seismo-last-step"


class WandbTracker:
    """A W&B run in `<run dir>/wandb/`, offline unless WANDB_MODE is set (module docstring)."""

    def __init__(self, run_dir: Path, cfg: Config):
        import wandb

        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / rundir.WANDB_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        # the last step logged by an earlier start of this run directory: W&B has the steps up to it
        self.resumed_through = self.last_step = self._read_last_step()
        mode = os.environ.get("WANDB_MODE") or "offline"
        group = self.run_dir.parent.parent.name if self.run_dir.parent.name == rundir.RUNS_DIR else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "seismo", dir=str(self.run_dir), id=run_id,
            resume="allow", name=self.run_dir.name, group=group, mode=mode, reinit="create_new",
            config=config_lib.to_dict(cfg),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.mode = mode
        how = f"upload it with `wandb sync {self.dir}/offline-run-*`" if mode == "offline" else f"mode {mode}"
        print(f"seismo: W&B run {run_id} in {self.dir} ({how})", file=sys.stderr, flush=True)

    def _read_last_step(self) -> int:
        try:
            return int((self.dir / LAST_STEP_FILE).read_text().strip())
        except (OSError, ValueError):
            return -1

    def resume(self, step: int) -> None:
        pass  # the steps up to self.resumed_through are in W&B already; `write` logs only those past it

    def write(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        if step <= self.resumed_through or step < self.last_step:  # logged by an earlier start, or out of order
            return
        data: dict[str, Any] = dict(scalars(row))
        text = text_of(row)
        if text is not None:
            data[rundir.row_kind(row)] = text
        if data:
            self.run.log(data, step=step)
            if step > self.last_step:
                self.last_step = step
                (self.dir / LAST_STEP_FILE).write_text(f"{step}\n")  # rows are seldom: at row steps only

    def flush(self) -> None:
        pass  # W&B writes its run file itself; seismo-last-step follows every logged step

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: Config, run_dir: Any) -> list[Tracker]:
    """The trackers `cfg.run.trackers` names for `run_dir` (jsonl is metrics.jsonl itself):
    local run directories only (a `gs://` one gets a line saying they are off)."""
    out: list[Tracker] = []
    for name in dict.fromkeys(cfg.run.trackers):
        if name == "jsonl":
            continue
        if "://" in os.fspath(run_dir):  # gs://... (seismo.rundir): TensorBoard's writer and W&B write local files
            print(f"seismo: {name} tracker: {run_dir} is on object storage; trackers write local run directories "
                  "only, so it is off for this run (metrics.jsonl has everything)", file=sys.stderr, flush=True)
            continue
        try:
            local = Path(run_dir)
            out.append(TensorBoardTracker(local) if name == "tensorboard" else WandbTracker(local, cfg))
        except Exception as e:  # noqa: BLE001 - a tracker never stops a run; say why it is off
            print(f"seismo: {name} tracker could not start ({type(e).__name__}: {' '.join(str(e).split())}); "
                  "it is off for this run, metrics.jsonl goes on", file=sys.stderr, flush=True)
    return out


class Trackers:
    """The trackers of one run directory, opened on first use; a tracker that fails is
    switched off with one line on stderr."""

    def __init__(self, cfg: Config | None, run_dir: Any):
        self.cfg, self.run_dir = cfg, run_dir  # a local path, or a URL (seismo.rundir.path), kept as given
        self._open: list[Tracker] | None = None

    @property
    def names(self) -> Sequence[str]:
        return () if self.cfg is None else tuple(t for t in self.cfg.run.trackers if t != "jsonl")

    def __bool__(self) -> bool:
        return bool(self.names)

    def _trackers(self) -> list[Tracker]:
        if self._open is None:
            self._open = open_trackers(self.cfg, self.run_dir) if self.names else []
        return self._open

    def _each(self, call: str, *args: Any) -> None:
        for t in list(self._trackers()):
            try:
                getattr(t, call)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                self._open.remove(t)
                print(f"seismo: {type(t).__name__} failed ({type(e).__name__}: {' '.join(str(e).split())}); it is off "
                      "for the rest of this run, metrics.jsonl goes on", file=sys.stderr, flush=True)

    def resume(self, step: int) -> None:
        self._each("resume", step)

    def write(self, row: Mapping[str, Any]) -> None:
        self._each("write", row)

    def flush(self) -> None:
        if self._open:
            self._each("flush")

    def close(self) -> None:
        if self._open:
            self._each("close")
        self._open = []  # closed: nothing more is written
