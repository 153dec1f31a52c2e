"""A `jax.profiler` trace of chosen training steps: `run.profile_steps: [a, b]`.

    profiler = StepProfiler(cfg.run.profile_steps, run_dir / PROFILE_DIR)
    profiler.before(step)         # before step `step` runs (1-based, as the rows count)
    ...run the step...
    profiler.after(step, state)   # after it: the trace stops once step b has finished

The trace starts just before step a is dispatched and stops after step b has finished on the
device (the state is waited for, so its work is inside the trace), with each step marked by a
`StepTraceAnnotation` (TensorBoard's profile plugin reads the steps off them). It is written by
`jax.profiler` into `<run_dir>/profile/plugins/profile/<time>/`: `<host>.xplane.pb` for
TensorBoard (`tensorboard --logdir <run_dir>/profile`, with `tensorboard-plugin-profile`) and
`perfetto_trace.json.gz` for ui.perfetto.dev. Every process writes its own host's trace; a
later trace (a resumed run) goes into a new `<time>` folder beside the earlier ones. A run
resumed past step b traces nothing; one resumed inside [a, b] traces the rest of it. In a
vmapped group the trace is the group's one program, written under the first point's directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax

PROFILE_DIR = "profile"


class StepProfiler:
    """Starts and stops one `jax.profiler` trace around the steps `[first, last]` (none when
    `steps` is empty)."""

    def __init__(self, steps: Sequence[int], log_dir: str | os.PathLike[str]):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.log_dir = str(log_dir)
        self.active = False
        self._annotation: Any = None

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched."""
        if not self.first <= step <= self.last:
            return
        if not self.active:
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.active = True
        self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self._annotation.__enter__()

    def after(self, step: int, state: Any) -> None:
        """Called once step `step` has been dispatched; ends the trace after the last step."""
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Stop the trace if one runs (the loop ended inside the window: a stop, a divergence)."""
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
