"""Orbax checkpoints on a schedule that dynamics studies need.

Training dynamics change fastest at the start, so the schedule keeps log-spaced early steps
(1, 2, 4, ... up to `run.checkpoint_log_until`) plus every `run.checkpoint_every`-th step
plus the last, plus step 0 (the initialisation), and never prunes any of them (the Pythia schedule used by Gallego-Feliciano
et al. 2025, arXiv 2508.03616, is the same idea). `run.checkpoint_log_points: N` adds N
distinct steps log-spaced over the whole run, from 1 to `run.steps` (`log_points`): the
schedule of a short run whose checkpoints should be evenly spread in log(step). Saves are asynchronous (Orbax
`CheckpointManager`); a restore lands on whatever mesh the job has now (the target's
shardings); every array is checked against a checksum saved with it, and an unreadable or
mismatched checkpoint is set aside (renamed, with its reason; never deleted) and the previous
one is used. With several processes the choice is agreed: a step is used only when every
process read it (`restore_latest(..., agree=...)`), so no host restores another step than
the others.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from seismo import rundir
from seismo.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def log_spaced_steps(bound: int) -> list[int]:
    """1, 2, 4, ... up to and including `bound` (if it is a power of two)."""
    out, s = [], 1
    while s <= bound:
        out.append(s)
        s *= 2
    return out


def log_points(n: int, last: int) -> list[int]:
    """`n` distinct steps from 1 to `last` (both included when n >= 2), evenly spaced in
    log(step) where that spacing is at least one step and consecutive where it is not.

    Each step is the geometric step from the one before towards `last` over the points still
    to place, rounded, and at least one more than the one before: [1, 2, 3, 4, 6, 8, 11, ...].
    Rounding log-spaced values and dropping duplicates would give fewer than n. n = 1: [1];
    n <= 0: []. ValueError when n > last (there are not n distinct steps)."""
    if n <= 0:
        return []
    if n > last:
        raise ValueError(f"{n} distinct steps do not fit between 1 and {last}")
    out = [1]
    while len(out) < n:
        prev, left = out[-1], n - len(out)  # `left` points still to place, the last of them at `last`
        nxt = max(prev + 1, round(prev * (last / prev) ** (1.0 / left)))
        out.append(min(nxt, last - left + 1))
    return out


class CheckpointSchedule:
    """Which steps get a checkpoint. Step s means 'the state after s updates'; 0 is the init."""

    def __init__(self, run: RunConfig):
        self.every = run.checkpoint_every
        self.log_steps = frozenset(log_spaced_steps(run.checkpoint_log_until)
                                   + log_points(run.checkpoint_log_points, run.steps))
        self.last = run.steps

    def __call__(self, step: int) -> bool:
        return step in self.log_steps or step % self.every == 0 or step == self.last

    def steps(self, upto: int | None = None) -> list[int]:
        end = self.last if upto is None else upto
        return [s for s in range(0, end + 1) if self(s)]


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be read (or failed its checksum) and was set aside."""


class NoReadableCheckpoint(ConfigError):
    """A run directory has checkpoints but none can be read: it is not started over."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of one array's bits: sum_i bits_i * (2 i + 1) mod 2^32. Integer sums
    wrap exactly, so the value does not depend on reduction order (any device, any sharding),
    and a flipped bit changes it (the weights are odd, so 2^k * w is never 0 mod 2^32)."""
    x = jnp.asarray(x)
    nbits = x.dtype.itemsize * 8
    if nbits not in (8, 16, 32):
        x = x.astype(jnp.float32)
        nbits = 32
    u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[nbits]).astype(jnp.uint32)
    w = jnp.arange(u.size, dtype=jnp.uint32).reshape(u.shape) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(u * w, dtype=jnp.uint32)


@jax.jit
def checksums(tree: Any) -> Any:
    """One uint32 checksum per leaf of a pytree of arrays (`_leaf_checksum`)."""
    return jax.tree.map(_leaf_checksum, tree)


def flat_checksums(tree: Any, prefix: tuple[Any, ...] = ()) -> dict[str, int]:
    """{key path: checksum} of every leaf; `prefix` is prepended to each path (a subtree
    keyed as it sits in the saved state, e.g. (GetAttrKey('params'),) for TrainState.params)."""
    sums = checksums(tree)  # replicated scalars: every process reads its own copy
    return {jax.tree_util.keystr((*prefix, *p)): int(np.asarray(v.addressable_shards[0].data))
            for p, v in jax.tree_util.tree_leaves_with_path(sums)}


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager`: the train state as a standard pytree plus a
    JSON record (data hash, config digest, and a checksum of every array) beside it.

    A checkpoint that cannot be read, or whose arrays do not match their checksums, is set
    aside: its folder is renamed `<step>.corrupt-<UTC time>` with a REASON.txt inside, never
    deleted, and the step can be saved again later."""

    def __init__(self, directory: str | Path, *, async_save: bool = True):
        directory = rundir.path(directory)  # a local folder, or a gs:// URL (Orbax writes there through tensorstore)
        self.directory = directory if rundir.is_remote(directory) else directory.resolve()
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            # Keep everything we save: the schedule above already chooses what to keep.
            preservation_policy=ocp.checkpoint_managers.LatestN(n=None),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.set_aside_steps: list[tuple[int, str]] = []  # (step, reason) of this session

    # -- saving
    def save(self, step: int, state: Any, record: dict[str, Any] | None = None) -> None:
        """Save `step`; a step that already exists is kept as it is (a group resumed from an
        earlier step, because another point's newer checkpoint was set aside, reaches it
        again with the same state)."""
        if step in self.manager.all_steps():
            log.info("checkpoint %d exists in %s; kept", step, self.directory)
            return
        record = {**(record or {}), "checksums": flat_checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
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
        """Restore `step` onto `target`'s shapes, dtypes and shardings (the current mesh), and
        check its arrays against the checksums saved with them (ValueError if they differ)."""
        state, record, saved = self._read(step, target)
        mismatch = self._mismatch(state, saved)
        if mismatch:
            raise ValueError(mismatch)
        return state, record

    def _read(self, step: int, target: Any) -> tuple[Any, dict[str, Any], dict[str, int] | None]:
        """This process's read of `step`: the state, the record as saved, and the checksums
        saved with it (taken out of the record).

        With several processes the read waits for no other process: Orbax's own restore ends
        with a barrier, which a process whose read failed never reaches, so the others would
        wait there for it forever. Each process reads its shards with a checkpointer of its
        own (`active_processes` = itself: no barrier), and the agreement that follows
        (`restore_latest(agree=...)`) is the barrier."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore())
        if jax.process_count() == 1:
            out = self.manager.restore(step, args=args)
        else:
            me = jax.process_index()
            own = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=own) as reader:
                out = reader.restore(self.directory / str(step), args=args)
        state, record = out["state"], dict(out["record"] or {})
        saved = record.pop("checksums", None)  # seismo's own; the caller gets its record back as saved
        return state, record, saved

    @staticmethod
    def _mismatch(state: Any, saved: dict[str, int] | None) -> str | None:
        """Why the arrays do not match their saved checksums, or None. The checksums are
        computed over the global arrays, so every process gets the same answer."""
        if saved is None:
            return None
        got = flat_checksums(state)
        bad = [k for k in saved if got.get(k) != saved[k]]
        if bad or set(got) != set(saved):
            return f"{len(bad)} array(s) do not match their saved checksums, e.g. {bad[:3]}"
        return None

    def set_aside(self, step: int, reason: str, *, everywhere: bool = False) -> Path | None:
        """Rename the folder of `step` aside with a REASON.txt (never deleted). Only the
        writing process (0) renames; the others just stop using the step. `everywhere`: every
        process calls this together (an agreed restore), waits for the rename and lists the
        checkpoints again, so that all of them save the step anew when the run reaches it."""
        target = self._rename_aside(step, reason)
        if everywhere and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"seismo: checkpoint {step} set aside")
            self.manager.reload()
        return target

    def _rename_aside(self, step: int, reason: str) -> Path | None:
        folder = self.directory / str(step)
        self.set_aside_steps.append((step, reason))
        if jax.process_index() != 0 or not folder.exists():
            return None
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = folder.with_name(f"{step}.corrupt-{stamp}")
        folder.rename(target)
        (target / "REASON.txt").write_text(f"step {step} set aside by seismo at {stamp}: {reason}\n")
        self.manager.reload()
        return target

    def restore_latest(self, target: Any, steps: Iterable[int] | None = None,
                       agree: Callable[[bool], list[int]] | None = None) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest readable checkpoint as (step, state, record), or None when there is none.
        Unreadable checkpoints are set aside with a `CorruptCheckpointWarning`.

        `agree` (several processes, seismo.train.stop.processes_where_false) takes whether
        this process read a step and returns the processes that could not, the same list on
        all: a step is used only when none failed and set aside on every process otherwise.
        Every process must then pass the same `steps`."""
        candidates = sorted(self.steps() if steps is None else steps, reverse=True)
        for step in candidates:
            reason: str | None = None
            try:
                state, record, saved = self._read(step, target)
            except Exception as e:  # noqa: BLE001 - any failure to read means: set it aside, try the previous one
                reason = f"{type(e).__name__}: {str(e)[:300]}"
            failed = ([] if reason is None else [jax.process_index()]) if agree is None else agree(reason is None)
            if not failed:
                reason = self._mismatch(state, saved)  # the same on every process
                if reason is None:
                    return step, state, record
                reason = f"ValueError: {reason}"
            elif agree is not None:
                reason = (f"{reason} " if reason else "") + f"(unreadable on process(es) {failed})"
            where = self.set_aside(step, reason, everywhere=agree is not None)
            msg = (f"checkpoint at step {step} in {self.directory} could not be read ({reason}); "
                   + (f"set aside as {where.name}; " if where else "")
                   + "falling back to the previous checkpoint")
            warnings.warn(msg, CorruptCheckpointWarning, stacklevel=2)
            log.warning(msg)
        return None
