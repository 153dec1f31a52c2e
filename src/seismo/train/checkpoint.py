"""Orbax checkpoints on a schedule that dynamics studies need.

Training dynamics change fastest at the start, so the schedule keeps log-spaced early steps
(1, 2, 4, ... up to `run.checkpoint_log_until`) plus every `run.checkpoint_every`-th step
plus the last, plus step 0 (the initialisation), and never prunes any of them (the Pythia schedule used by Gallego-Feliciano
et al. 2025, arXiv 2508.03616, is the same idea). Saves are asynchronous (Orbax
`CheckpointManager`); a restore lands on whatever mesh the job has now (the target's
shardings); an unreadable newest checkpoint is reported and the previous one is used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from seismo.config import RunConfig

log = logging.getLogger(__name__)


def log_spaced_steps(bound: int) -> list[int]:
    """1, 2, 4, ... up to and including `bound` (if it is a power of two)."""
    out, s = [], 1
    while s <= bound:
        out.append(s)
        s *= 2
    return out


class CheckpointSchedule:
    """Which steps get a checkpoint. Step s means 'the state after s updates'; 0 is the init."""

    def __init__(self, run: RunConfig):
        self.every = run.checkpoint_every
        self.log_steps = frozenset(log_spaced_steps(run.checkpoint_log_until))
        self.last = run.steps

    def __call__(self, step: int) -> bool:
        return step in self.log_steps or step % self.every == 0 or step == self.last

    def steps(self, upto: int | None = None) -> list[int]:
        end = self.last if upto is None else upto
        return [s for s in range(0, end + 1) if self(s)]


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one was used instead."""


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager`: the train state as a standard pytree plus a
    JSON record (data hash, config digest) beside it."""

    def __init__(self, directory: str | Path, *, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            # Keep everything we save: the schedule above already chooses what to keep.
            preservation_policy=ocp.checkpoint_managers.LatestN(n=None),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- saving
    def save(self, step: int, state: Any, record: dict[str, Any] | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record or {}))
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- reading
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore `step` onto `target`'s shapes, dtypes and shardings (the current mesh)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["record"] or {})

    def restore_latest(self, target: Any, steps: Iterable[int] | None = None) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest readable checkpoint as (step, state, record), or None when there is none.
        Unreadable checkpoints are skipped with a `CorruptCheckpointWarning`."""
        candidates = sorted(self.steps() if steps is None else steps, reverse=True)
        for step in candidates:
            try:
                state, record = self.restore(step, target)
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                msg = (f"checkpoint at step {step} in {self.directory} could not be read "
                       f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous checkpoint")
                warnings.warn(msg, CorruptCheckpointWarning, stacklevel=2)
                log.warning(msg)
                continue
            return step, state, record
        return None
