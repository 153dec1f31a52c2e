"""The run's record: `metrics.jsonl` (append-only JSON lines), `status.json`, progress bar.

One JSON object per logged step, with its `kind` (seismo.rundir.ROW_KINDS); per-layer values are lists indexed by layer; non-finite
numbers are written as null (JSON has no NaN). Only process 0 writes. On resume the rows
past the restored step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from seismo import rundir
from seismo.config import Config
from seismo.rundir import METRICS_ASIDE_FILE, METRICS_FILE, STATUS_FILE, parse_row, row_kind
from seismo.train.trackers import Trackers


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def to_jsonable(value: Any) -> Any:
    """numpy/jax scalars and arrays -> Python floats/ints/lists; NaN and inf -> None.

    It runs on every row (a probe row holds dozens of arrays), so the common cases come first:
    an array becomes its list in one `tolist`, and a finite float vector is returned as it is."""
    if type(value) is np.ndarray or isinstance(value, (np.generic, jax.Array)):
        arr = np.asarray(value)
        out = arr.tolist()
        kind = arr.dtype.kind
        if kind != "f":
            return out if kind in "biu" else to_jsonable(out)
        if arr.ndim == 0:
            return out if math.isfinite(out) else None
        if arr.ndim == 1 and all(map(math.isfinite, out)):
            return out
        return _finite_or_none(out)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


class MetricsWriter:
    """Appends rows to metrics.jsonl and replaces status.json. On object storage (a `gs://`
    run directory, seismo.rundir), where an object cannot be appended to, the rows are kept
    and the object is written again whole at most every `REMOTE_UPLOAD_S` seconds, and always
    before status.json is written (at every checkpoint and at the end), so the record on the
    store is never behind the newest checkpoint it names."""

    REMOTE_UPLOAD_S = 30.0

    def __init__(self, run_dir: Path, enabled: bool = True, cfg: Config | None = None):
        self.path = rundir.path(run_dir) / METRICS_FILE
        self.status_path = rundir.path(run_dir) / STATUS_FILE
        self.enabled = enabled
        # the run's other trackers (cfg.run.trackers: TensorBoard, W&B), on the writer host only
        self.trackers = Trackers(cfg, run_dir) if enabled and cfg is not None else None
        self.remote = rundir.is_remote(self.path)
        self._text: str | None = None  # on a store: metrics.jsonl as last uploaded
        self._pending: list[str] = []
        self._uploaded = time.monotonic()
        self._file: Any = None  # locally: metrics.jsonl open for appending, flushed after each row

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Make the file read as one uninterrupted run up to `step` (the restored checkpoint):
        rows logged past it by a run killed after its last checkpoint, preemption rows, and
        lines that are not rows at all (a half-written last line, bytes that are not UTF-8)
        move to `metrics.aside.jsonl`, after a line saying when and why; nothing is deleted.
        Returns the rows kept. The trackers are told where the run continues (seismo.train.trackers)."""
        if self.trackers:
            self.trackers.resume(step)
        self._pending = []
        self._close_file()  # the file is replaced below: a later row opens the new one
        if not (self.enabled and self.path.exists()):
            return []
        kept_lines, kept, aside = [], [], []
        for raw in self.path.read_bytes().splitlines():
            line = raw.decode("utf-8", errors="replace")
            row = parse_row(line)
            if row is not None and row["step"] <= step and row_kind(row) != "preemption":
                kept_lines.append(line)
                kept.append(row)
            elif line.strip():
                aside.append(line)
        if aside:
            note = {"set_aside": time.time(), "resumed_from_step": step, "lines": len(aside)}
            rundir.append_text(self.path.parent / METRICS_ASIDE_FILE,
                               json.dumps(note) + "\n" + "".join(a + "\n" for a in aside))
        self._text = "".join(k + "\n" for k in kept_lines)
        rundir.write_atomic(self.path, self._text)
        return kept

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = to_jsonable(row)  # once, for the file and the trackers
        if self.trackers:
            self.trackers.write(row)
        line = json.dumps(row, allow_nan=False) + "\n"
        if not self.remote:
            if self._file is None:
                self._file = self.path.open("a")
            self._file.write(line)
            self._file.flush()  # in the file now: a killed run loses no row it recorded
            return
        self._pending.append(line)
        if time.monotonic() - self._uploaded >= self.REMOTE_UPLOAD_S:
            self.flush()

    def flush(self) -> None:
        """On object storage, upload the rows kept since the last upload (locally every row
        is in the file already)."""
        if not (self.enabled and self.remote and self._pending):
            return
        if self._text is None:
            self._text = self.path.read_text() if self.path.exists() else ""
        text = self._text + "".join(self._pending)
        rundir.write_atomic(self.path, text)
        self._text, self._pending, self._uploaded = text, [], time.monotonic()

    def status(self, status: str, step: int, **extra: Any) -> None:
        if not self.enabled:
            return
        if self.trackers:  # at every checkpoint and at the end: the trackers' files follow the record
            self.trackers.flush()
        self.flush()  # the rows up to the step it names are on the store before it names it
        data = {"status": status, "step": step, "time": time.time(), **to_jsonable(extra)}
        rundir.write_atomic(self.status_path, json.dumps(data, indent=1))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close metrics.jsonl and the trackers (the end of the run)."""
        self._close_file()
        if self.trackers:
            self.trackers.close()


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = rundir.path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def duration(seconds: float) -> str:
    """A length of time as a person reads it: '42 s', '3 min 05 s', '2 h 07 min'."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def say(message: str) -> None:
    """One line on stderr, flushed at once (a log file or a pipe shows it now, not at exit)."""
    print(f"seismo: {message}", file=sys.stderr, flush=True)


MIN_RATE_SPAN_S = 5.0  # the shortest span a progress line measures tokens/s over


class Progress:
    """What a person watching a run sees. On a terminal (or with run.progress=on) a tqdm bar
    with loss and throughput, updated at every row. Off a terminal (a log file, a pipe,
    nohup, a cluster job; or run.progress=lines) a plain line on stderr at the first recorded
    step, then at most every `log_seconds` (0: at every row) and at the last step:

        seismo: tiny: step 120/500 (24%), loss 2.3141, 5,120 tokens/s, 41 s elapsed, ETA 2 min 10 s

    tokens/s is measured over the steps since the previous line (since the first step when the
    previous line is under `MIN_RATE_SPAN_S` old), the ETA from the rate since
    the first step (which includes the compile, and is left out; so is a later compile, `pause`).
    run.progress=off shows
    neither. The compile lines and the end-of-run summary (seismo.train.loop) are printed
    whatever the mode."""

    def __init__(self, total: int, initial: int, mode: str = "auto", desc: str = "train",
                 log_seconds: float = 30.0, tokens_per_step: int | None = None):
        tty = sys.stderr.isatty()
        show = mode == "on" or (mode == "auto" and tty)
        self.lines = mode == "lines" or (mode == "auto" and not tty)
        self.total, self.desc, self.log_seconds = total, desc, log_seconds
        self.tokens_per_step = tokens_per_step
        self._t0 = time.perf_counter()  # elapsed counts from here: the compile is part of it
        self._first: tuple[float, int] | None = None  # (time, step) of the first recorded step
        self._last: tuple[float, int] | None = None  # of the last line printed
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def line_due(self, step: int, row: bool) -> bool:
        """Whether a plain line is due at this recorded step (cheap: called at every step)."""
        if not self.lines:
            return False
        if self._last is None or step >= self.total:
            return True
        if self.log_seconds <= 0:
            return row
        return time.perf_counter() - self._last[0] >= self.log_seconds

    def line(self, step: int, loss: float | None, note: str = "") -> None:
        """Print the plain progress line of `step` (`loss`: the lowest of the live runs)."""
        now = time.perf_counter()
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}{note}")
        # over the steps since the last line; over those since the first when that span is short
        # (a burst of recorded steps, rows fetched in windows, says little about the rate)
        since = self._last if self._last is not None and now - self._last[0] >= MIN_RATE_SPAN_S else self._first
        if since is not None and self.tokens_per_step and step > since[1] and now > since[0]:
            parts.append(f"{self.tokens_per_step * (step - since[1]) / (now - since[0]):,.0f} tokens/s")
        if self._first is None:
            self._first = (now, step)
        else:
            parts.append(f"{duration(now - self._t0)} elapsed")
            done = step - self._first[1]
            if 0 < done and step < self.total:
                parts.append(f"ETA {duration((self.total - step) * (now - self._first[0]) / done)}")
        say(f"{self.desc}: " + ", ".join(parts))
        self._last = (now, step)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` out of the rates (tokens/s, the ETA): a compile in the middle of the
        run (the probe step's, the first time a probe is due) says nothing about the steps left."""
        if self._first is not None:
            self._first = (self._first[0] + seconds, self._first[1])
        if self._last is not None:
            self._last = (self._last[0] + seconds, self._last[1])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
