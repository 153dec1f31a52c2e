"""A run directory has one identity and one writer.

* **Identity.** A run directory keeps the config that made it (`config.yaml`). Training again
  on it with a different config is refused before anything is written (`check_config_matches`):
  the message lists the keys that differ, old against new, and the ways out (another
  `--run-dir`, or `--restart`, which moves the old run aside, `set_aside`, and starts over).
  Two kinds of change continue: extending `run.steps` (the LR schedule's horizon moves, said
  in one line and recorded as a `warning` row), and the keys that only change what is
  recorded, where it runs and how the same numbers are computed (`CADENCE_KEYS`: the mesh,
  the attention implementation, rematerialisation, loss chunks).
* **One writer.** `RunLock` is a lock file (`.seismo.lock`, JSON with pid, host, start time
  and command) taken with an exclusive create. A second writer is refused, naming the holder;
  a lock left by a process of this host that no longer runs is stale and taken over.

Both refusals are `ConfigError`s: the CLI prints them as one line and exits 2.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from seismo import config as config_lib
from seismo import rundir
from seismo.config import Config, ConfigError

LOCK_FILE = ".seismo.lock"
# Keys whose change leaves the trajectory as it is: what is recorded, how often, and where.
CADENCE_KEYS = frozenset({
    "run.log_every", "run.eval_every", "run.probe_every", "run.progress", "run.logit_warning_threshold",
    "run.log_seconds", "run.trackers",
    "run.checkpoint_every", "run.checkpoint_log_until", "run.checkpoint_log_points", "run.checkpoint_async",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.multihost", "mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor",
    "mesh.layout", "run.profile_steps", "run.peak_flops",
    # how the same numbers are computed: attention kernels, rematerialisation, loss chunks
    "model.attention_impl", "model.attention_block", "model.remat", "model.scan_unroll", "loss.chunk",
})


class RunDirConflict(ConfigError):
    """The run directory was made by another config, or another process is writing it."""


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def stored_config(run_dir: Path) -> Config | None:
    """The config a run directory records, or None when it has none."""
    path = rundir.path(run_dir) / rundir.CONFIG_FILE
    if not path.exists():
        return None
    try:
        return config_lib.load(path)
    except ConfigError as e:
        raise RunDirConflict(f"{path} cannot be read as a seismo config ({e}); use another --run-dir, "
                             "or --restart to move the old run aside") from None


def check_config_matches(run_dir: Path, cfg: Config) -> str | None:
    """Refuse (RunDirConflict) when `run_dir` was made by a config that differs from `cfg` in
    a key that changes the run; a one-line notice when only run.steps grew, else None."""
    old = stored_config(run_dir)
    if old is None:
        return None
    a, b = _flat(old), _flat(cfg)
    diff = [k for k in a if a[k] != b.get(k) and k not in CADENCE_KEYS]
    if diff == ["run.steps"] and b["run.steps"] > a["run.steps"]:
        return (f"run.steps extended from {a['run.steps']} to {b['run.steps']}: the LR schedule's horizon "
                f"moves with it, so the steps from here differ from a run planned with {b['run.steps']} steps")
    if not diff:
        return None
    changes = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in diff[:6]) + (", ..." if len(diff) > 6 else "")
    raise RunDirConflict(f"{run_dir} was made by another config ({changes}); train into another --run-dir, "
                         f"or pass --restart to move the old run aside and start over")


def set_aside(run_dir: Path) -> Path | None:
    """Move an existing run directory aside (`<name>.aside-<UTC time>`), never deleting it;
    the new location, or None when there was nothing."""
    run_dir = rundir.path(run_dir)
    if not run_dir.exists():
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir.with_name(f"{run_dir.name}.aside-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.aside-{stamp}-{n}")
    run_dir.rename(target)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """The run directory's writer lock (module docstring). Use as a context manager, or
    `acquire()` / `release()`."""

    def __init__(self, run_dir: Path, what: str = "train"):
        self.path = rundir.path(run_dir) / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what,
                   "command": " ".join(sys.argv)[:500]}
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _create(self) -> bool:
        return rundir.create_exclusive(self.path, json.dumps(self.me))

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            h = self.holder()
            if h is None:  # half-written by a writer that just started, or unreadable: look again
                time.sleep(0.1)
                if self.holder() is None and self.path.exists():
                    self.path.replace(self.path.with_name(f"{LOCK_FILE}.unreadable-{os.getpid()}"))
                continue
            same_host = h.get("host") == self.me["host"]
            if same_host and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
                # stale: its process is gone. Rename it away (atomic; one taker wins), then retry.
                try:
                    self.path.rename(self.path.with_name(f"{LOCK_FILE}.stale-{h['pid']}"))
                except FileNotFoundError:
                    pass
                continue
            since = datetime.datetime.fromtimestamp(h.get("started", 0), datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
            hint = ("" if same_host else
                    f"; if no seismo process on {h.get('host')} is using it, remove {self.path}")
            raise RunDirConflict(f"{self.path.parent} is in use by {h.get('what', 'a seismo process')} "
                                 f"(pid {h.get('pid')} on {h.get('host')}, since {since}){hint}")
        raise RunDirConflict(f"could not take the lock {self.path}; is another seismo process starting on it?")

    def release(self) -> None:
        if self.held:
            h = self.holder()
            if h is not None and h.get("pid") == self.me["pid"] and h.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
