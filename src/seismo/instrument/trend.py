"""An early warning, during training, that the max attention logit is running away.

Wortsman et al. 2023 (arXiv 2309.14322, section 3.1, Fig. 1 and 9; docs/methods.md §1.3) found that
every small-scale run whose layer-0 max attention logit grew past about 1e4 diverged, and that
the logit grows roughly exponentially in the steps before. The trend is the least-squares line
of log(logit) against step over the last few probe rows; when it crosses the threshold
before the run ends, the trainer records a `warning` row. It is a heuristic for an early look,
not a verdict: read it beside the loss.

This module is used inside the training loop, so it imports nothing heavier than numpy.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import numpy as np

DIVERGENCE_LOGIT = 1e4  # every run above this diverged in the paper's sweep (section 3.1)
ADVICE = ("runs whose logit exceeded 1e4 diverged in Wortsman et al. 2023 (arXiv 2309.14322); "
          "qk-layernorm (model.qk_norm=true) or a lower LR keeps it down")


def logit_trend_warning(
    steps: Sequence[float],
    logits: Sequence[float],
    total_steps: int,
    threshold: float = DIVERGENCE_LOGIT,
    window: int = 8,
    min_points: int = 4,
) -> str | None:
    """A warning when the recent trend of the max attention logit crosses `threshold` before
    `total_steps`, else None.

    The trend is a least-squares line of log(logit) against step over the last `window`
    finite probe points (exponential growth, the way logits run away). A flat or falling
    trend never warns; a logit already above the threshold always does."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(logits, dtype=float)
    ok = np.isfinite(s) & np.isfinite(v) & (v > 0)
    s, v = s[ok][-window:], v[ok][-window:]
    if not len(s):
        return None
    now, last = s[-1], v[-1]
    where = f"layer-0 max attention logit {last:.3g} at step {now:.0f}"
    if last > threshold:
        return f"{where} is above {threshold:.3g}: {ADVICE}"
    if len(s) < min_points or np.ptp(s) == 0:
        return None
    slope, intercept = np.polyfit(s, np.log(v), 1)
    if slope <= 0:
        return None
    cross = (math.log(threshold) - intercept) / slope
    if cross > total_steps:
        return None
    doubling = math.log(2) / slope
    return (f"{where} doubles every {doubling:.0f} steps; at this rate it crosses {threshold:.3g} "
            f"near step {max(cross, now):.0f} of {total_steps}: {ADVICE}")


class LogitTrend:
    """The running check: `update(step, logit)` keeps only the last `window` points (constant
    work per probe row) and returns the warning the first time there is one, then None."""

    def __init__(self, total_steps: int, threshold: float = DIVERGENCE_LOGIT, window: int = 8):
        self.total_steps, self.threshold = total_steps, threshold
        self.history: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.warned = False

    def update(self, step: int, logit: float) -> str | None:
        if self.warned:
            return None
        self.history.append((step, logit))
        steps, values = zip(*self.history)
        msg = logit_trend_warning(steps, values, self.total_steps, self.threshold, window=len(self.history))
        self.warned = msg is not None
        return msg
