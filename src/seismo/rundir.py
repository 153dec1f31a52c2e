"""The run directory, the unit of record: its file names and the kinds of metrics row.

    <run dir>/config.yaml       the resolved config that made the run
    <run dir>/metrics.jsonl     one JSON object per line, each with `step` and `kind`
    <run dir>/metrics.aside.jsonl  lines a resume took out of metrics.jsonl (never deleted)
    <run dir>/status.json       running | finished | diverged | preempted, with the step
    <run dir>/checkpoints/      Orbax checkpoints (seismo.train.checkpoint)
    <run dir>/analysis/         tables of the checkpoint analysis (seismo.analysis.checkpoints)
    <run dir>/figures/          figures drawn by `seismo report`
    <run dir>/tensorboard/      TensorBoard event files (run.trackers: [tensorboard])
    <run dir>/wandb/            the Weights & Biases run, offline by default (run.trackers: [wandb])

A sweep directory keeps its spec as `sweep.yaml` and one run directory per point under
`runs/<point name>/`. Every writer and reader takes these names from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
METRICS_ASIDE_FILE = "metrics.aside.jsonl"  # lines a resume took out of metrics.jsonl, kept
STATUS_FILE = "status.json"
CHECKPOINTS_DIR = "checkpoints"
ANALYSIS_DIR = "analysis"
FIGURES_DIR = "figures"
TENSORBOARD_DIR = "tensorboard"  # seismo.train.trackers
WANDB_DIR = "wandb"
SPEC_FILE = "sweep.yaml"  # a sweep directory's self-contained copy of its spec
RUNS_DIR = "runs"  # a sweep's point run directories: <sweep dir>/runs/<point name>/

RowKind = Literal["train", "eval", "probe", "divergence", "preemption", "warning"]
ROW_KINDS: tuple[RowKind, ...] = ("train", "eval", "probe", "divergence", "preemption", "warning")


def row_kind(row: Mapping[str, Any]) -> str:
    """The kind of a metrics row: its `kind` field; rows written before seismo recorded it
    are recognised by their keys."""
    kind = row.get("kind")
    if isinstance(kind, str):
        return kind
    if row.get("diverged"):
        return "divergence"
    if row.get("preempted"):
        return "preemption"
    if "warning" in row:
        return "warning"
    if row.get("probe"):
        return "probe"
    if "eval_loss" in row:
        return "eval"
    return "train"


def parse_row(line: str) -> dict[str, Any] | None:
    """A metrics row from one line of metrics.jsonl: a JSON object with an integer `step`;
    None for anything else (a half-written line, a list, a step that is not a number)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return row
