"""The run's record: `metrics.jsonl` (append-only JSON lines), `status.json`, progress bar.

One JSON object per logged step, with its `kind` (seismo.rundir.ROW_KINDS); per-layer values are lists indexed by layer; non-finite
numbers are written as null (JSON has no NaN). Only process 0 writes. On resume the rows
past the restored step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from seismo.rundir import METRICS_ASIDE_FILE, METRICS_FILE, STATUS_FILE, parse_row, row_kind


def to_jsonable(value: Any) -> Any:
    """numpy/jax scalars and arrays -> Python floats/ints/lists; NaN and inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.ndim == 0:
            value = arr.item()
        else:
            return to_jsonable(arr.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.status_path = Path(run_dir) / STATUS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Make the file read as one uninterrupted run up to `step` (the restored checkpoint):
        rows logged past it by a run killed after its last checkpoint, preemption rows, and
        lines that are not rows at all (a half-written last line, bytes that are not UTF-8)
        move to `metrics.aside.jsonl`, after a line saying when and why; nothing is deleted.
        Returns the rows kept."""
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
            with (self.path.parent / METRICS_ASIDE_FILE).open("a") as f:
                f.write(json.dumps(note) + "\n" + "".join(a + "\n" for a in aside))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept_lines))
        os.replace(tmp, self.path)
        return kept

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(to_jsonable(row), allow_nan=False) + "\n")

    def status(self, status: str, step: int, **extra: Any) -> None:
        if not self.enabled:
            return
        data = {"status": status, "step": step, "time": time.time(), **to_jsonable(extra)}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.status_path)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Progress:
    """tqdm bar with loss and throughput, shown when attached to a terminal (or forced)."""

    def __init__(self, total: int, initial: int, mode: str = "auto", desc: str = "train"):
        show = mode == "on" or (mode == "auto" and sys.stderr.isatty())
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
