"""Stop requests: SIGTERM and SIGINT become a flag the training loop reads at step boundaries
(it saves and exits 0), from the first moment of the process; across processes the request of
any one host becomes one decision that every host takes at the same step.

`install_early()` is called by the `seismo` command before it imports anything heavy, so a
signal that arrives while JAX loads or a step compiles is remembered instead of killing the
process; `StopFlag.install()` in the loop takes the request over.

Several processes (`jax.distributed`) must stop together: saving a checkpoint and every step
are collectives, so a host that stops alone leaves the others waiting for it forever. The
decision (`StopAgreement`) comes from

* JAX's preemption sync point (`jax.experimental.multihost_utils.
  reached_preemption_sync_point`, which Orbax's `CheckpointManager.reached_preemption` uses
  too): once `jax.distributed.initialize()` has run, a SIGTERM on any host (the notice a
  preemptible or spot VM gets, and what `scripts/launch_tpu_pod.sh stop` sends) reaches
  JAX's notifier, which owns SIGTERM from then on; the hosts exchange the steps they are at
  through the coordination service and all stop at the step after the fastest one. Asking
  costs a mutex per step, no collective. A SIGINT is passed on to it as a SIGTERM to the
  process itself;
* a cross-host OR of the local flags (`any_process`, one all-gather of a boolean) for what
  the notifier cannot see: a request that arrived before `jax.distributed.initialize()`
  (asked once, before anything is written) and, when JAX's preemption service is off
  (`jax_enable_preemption_service=False`), every `CHECK_EVERY` steps.

A single process asks nothing of anyone: the flag is the decision. `all_processes` and
`newest_everywhere` are the same kind of agreement for the checkpoint to restore (the newest
step every host can read, seismo.train.loop._restore). This module imports only the standard
library at import time (JAX on first use).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

_EARLY = {"requested": False, "installed": False}
# Once jax.distributed has started its preemption notifier, SIGTERM is JAX's (a C++ handler):
# the flags here leave it alone from then on, so that no later `signal.signal` takes it back.
_JAX = {"owns_sigterm": False, "sync_calls": 0}

CHECK_EVERY = 10  # steps between two cross-host ORs of the flags when JAX's preemption service is off


def _early_handler(signum: int, frame: Any) -> None:
    _EARLY["requested"] = True


def install_early() -> None:
    """Remember SIGTERM/SIGINT from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _early_handler)
        _EARLY["installed"] = True


class StopFlag:
    """Set by SIGTERM/SIGINT (or by one that arrived before, see `install_early`); the loop
    saves and exits at the next step boundary (with other processes: at the step they agree
    on, `StopAgreement`)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        self.forward_to_jax = False  # SIGINT becomes a SIGTERM for JAX's preemption notifier

    def install(self) -> None:
        """Handle the signals from now on, taking over (and clearing) a request that arrived
        before: between the runs of a sweep, or while the command started."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and _JAX["owns_sigterm"]:
                continue
            self._old[sig] = signal.signal(sig, self._handle)
        self.forward_to_jax = _JAX["owns_sigterm"]
        self.requested = self.requested or bool(_EARLY["requested"])
        _EARLY["requested"] = False

    def yield_sigterm_to_jax(self) -> None:
        """JAX's preemption notifier has replaced this flag's SIGTERM handler: leave it there
        (never restore ours over it) and pass SIGINT on to it."""
        _JAX["owns_sigterm"] = True
        self._old.pop(signal.SIGTERM, None)
        self.forward_to_jax = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.forward_to_jax and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: the hosts agree on the step
            return
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


# --------------------------------------------------------------------------- across processes


def _multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def _gather(values: list[int]) -> Any:
    """Every process's `values`, one row per process (int32: steps and flags)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, dtype=np.int32))).reshape(-1, len(values))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: every process calls it
    at the same point); `flag` itself in a single process."""
    if not _multiprocess():
        return bool(flag)
    return bool(_gather([int(bool(flag))]).any())


def processes_where_false(flag: bool) -> list[int]:
    """The indices of the processes whose `flag` is false, the same list on every process (a
    collective); [] or [0] in a single process."""
    if not _multiprocess():
        return [] if flag else [0]
    rows = _gather([int(bool(flag))])
    return [i for i, v in enumerate(rows[:, 0]) if not v]


def all_processes(flag: bool) -> bool:
    """True on every process when `flag` is true on all of them (a collective)."""
    return not processes_where_false(flag)


def newest_everywhere(step: int) -> int:
    """The largest of every process's `step` (a collective): the candidate that all hosts
    try next when they look for the newest checkpoint they can all read."""
    if not _multiprocess():
        return int(step)
    return int(_gather([int(step)]).max())


def _preemption_service() -> bool:
    """Whether jax.distributed runs JAX's preemption sync manager (its SIGTERM notifier)."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a JAX without it: the OR of the flags decides
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopAgreement:
    """The loop's stop decision, the same on every process at the same step.

    `at_start()` is asked once, before anything is written: a request that arrived before
    the processes joined (while JAX loaded) stops every host there. `__call__(step)` is asked
    by every host after every step: with JAX's preemption service, its sync point (every
    SIGTERM and SIGINT after the join goes to it; it answers true on every host at the same
    step, at most a few steps after the request, as soon as the hosts have exchanged their
    step counters); without it, an OR of the flags every `every` steps. In a single process
    it is the flag, asked nothing of anyone."""

    def __init__(self, flag: StopFlag, every: int = CHECK_EVERY):
        self.flag, self.every = flag, max(1, every)
        self.multi = _multiprocess()
        self.sync = self.multi and _preemption_service()
        if self.sync:
            flag.yield_sigterm_to_jax()

    def at_start(self) -> bool:
        return any_process(self.flag.requested) if self.multi else self.flag.requested

    def __call__(self, step: int) -> bool:
        if not self.multi:
            return self.flag.requested
        if self.sync:
            from jax.experimental import multihost_utils

            # A counter of this process's calls, not the step: the hosts call it in the same
            # order (every step of every run), and it starts where the notifier's starts (0),
            # so a notice that comes before the first call still names a call that will come.
            _JAX["sync_calls"] += 1
            return bool(multihost_utils.reached_preemption_sync_point(_JAX["sync_calls"]))
        return step % self.every == 0 and any_process(self.flag.requested)
