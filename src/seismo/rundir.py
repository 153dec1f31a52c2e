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

**Where a run directory lives.** A local path, or a URL on object storage: `gs://bucket/...`
(Google Cloud Storage, with the `gcs` extra: `pip install 'seismo[gcs]'`, which brings gcsfs).
`path()` turns either into one path object: `pathlib.Path` for a local path (exactly as
before), an `etils.epath.Path` for a URL, which Orbax and tensorstore write checkpoints
through, and fsspec/gcsfs everything else. A scheme seismo cannot serve (`s3://`, or
`gs://` without gcsfs) is refused there, before anything is written, with the extra to
install (`StorageUnavailable`). Object stores have no appends and no renames, so the few
writes that need them go through this module: `write_atomic` (a temporary file and a rename
locally; one object upload, which is atomic, on a store), `append_text` (a read and a whole
rewrite on a store), `create_exclusive` (O_EXCL locally; GCS's if-generation-match=0
precondition on a store, then read back) and `save_figure`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

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


# ----------------------------------------------------------------------------- where it lives

# URL schemes seismo serves, with the module that serves each and the extra that installs it.
SCHEMES: dict[str, tuple[str, str]] = {"gs": ("gcsfs", "gcs")}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# pathlib.Path for local paths, etils.epath.Path (a pathlib.PurePosixPath) for URLs
RunPath: TypeAlias = Any


class StorageUnavailable(ValueError):
    """A run-directory URL whose scheme seismo cannot serve here (say which extra to install)."""


def scheme(p: str | os.PathLike[str]) -> str | None:
    """'gs' for 'gs://bucket/x', None for a local path (and for 'file://...')."""
    m = _URL.match(os.fspath(p))
    if m is None or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(p: str | os.PathLike[str]) -> bool:
    return scheme(p) is not None


def check_served(p: str | os.PathLike[str]) -> None:
    """Refuse (StorageUnavailable) a URL whose scheme cannot be served by what is installed."""
    s = scheme(p)
    if s is None:
        return
    if s not in SCHEMES:
        known = ", ".join(f"{k}:// (pip install 'seismo[{e}]')" for k, (_, e) in SCHEMES.items())
        raise StorageUnavailable(f"{os.fspath(p)}: seismo cannot write run directories to {s}:// URLs; "
                                 f"use a local path or {known}")
    module, extra = SCHEMES[s]
    if importlib.util.find_spec(module) is None:
        raise StorageUnavailable(f"{os.fspath(p)}: {s}:// run directories need {module}, which is not installed; "
                                 f"install seismo's {extra!r} extra (pip install 'seismo[{extra}]') and run again")


def path(p: str | os.PathLike[str]) -> RunPath:
    """One path object for a local path or a URL (module docstring). A path object already
    made by this function comes back as it is; `file://x` is the local path x."""
    if isinstance(p, pathlib.PurePath) and not isinstance(p, pathlib.Path) and is_remote(str(p)):
        return p  # an epath.Path for a URL already
    text = os.fspath(p)
    if is_remote(text):
        check_served(text)
        from etils import epath

        s = scheme(text)
        return epath.Path(s + text[len(s):])  # GS://b -> gs://b: schemes are case-insensitive
    if text.startswith("file://"):
        text = text[len("file://"):]
    return p if isinstance(p, pathlib.Path) else pathlib.Path(text)


def write_atomic(target: RunPath, text: str) -> None:
    """Replace a file's whole content at once: readers see the old text or the new, never half."""
    if is_remote(target):
        target.write_text(text)  # an object upload: the object appears whole or not at all
        return
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def append_text(target: RunPath, text: str) -> None:
    """Add `text` at the end of a file (created if absent). On an object store, which has no
    appends, the object is read and written again whole."""
    if is_remote(target):
        old = target.read_text() if target.exists() else ""
        target.write_text(old + text)
        return
    with target.open("a") as f:
        f.write(text)


def create_exclusive(target: RunPath, text: str) -> bool:
    """Create a file holding `text` only if it does not exist; False when it does. Locally
    O_CREAT|O_EXCL. On GCS the upload carries the precondition if-generation-match=0 (gcsfs's
    exclusive mode), and the file is read back, so a store that ignores the precondition
    (an emulator) still lets at most the last of two racing writers believe it won."""
    if not is_remote(target):
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    import fsspec

    if target.exists():
        return False
    fs, where = fsspec.core.url_to_fs(os.fspath(target))
    try:
        with fs.open(where, "xb") as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    except OSError as e:  # gcsfs reports a failed precondition (HTTP 412) as an OSError subclass
        if "412" in str(e) or "recondition" in str(e):
            return False
        raise
    return target.read_text() == text


def save_figure(fig: Any, target: str | os.PathLike[str], **kwargs: Any) -> None:
    """`fig.savefig` into a local path or a URL (rendered in memory, then uploaded)."""
    target = path(target)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, **kwargs)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format=kwargs.pop("format", None) or target.suffix.lstrip(".") or "png", **kwargs)
    target.write_bytes(buf.getvalue())
