"""An early warning, during training, that the max attention logit is running away.

Wortsman et al. 2023 (arXiv 2309.14322, section 3.1, Fig. 1 and 9; docs/methods.md §1.3) found that
every small-scale run whose layer-0 max attention logit grew past about 1e4 diverged, and that
the logit grows roughly exponentially in the steps before. The rule here is seismo's own
heuristic (docs/methods.md §1.3, "In-run warning"), chosen so that it does not cry wolf:

* the trend is the least-squares line of log(logit) against step over the last `window`
  probe rows (exponential growth, the way logits run away); it must rise (slope > 0), the
  newest point must be the highest of the window (still growing), and with three or more
  points the line must explain the points (R^2 of the log-linear fit >= MIN_R2);
* the crossing is extrapolated from the newest value at that rate, and it must fall both
  before the run ends and within as many steps ahead as the window spans behind: a line is
  never extrapolated further than the evidence it was fitted on. This is what keeps early
  noise quiet: a logit of 6 at step 40 growing slowly does not predict a crossing at step
  1269;
* at the first probe row there is no trend yet; the run's growth since initialisation is
  then the trend, from an assumed INIT_LOGIT = 1 at step 0 (attention logits start of order
  one), and with the horizon rule it only warns when the logit has already covered more
  than half the way (in log scale) to the threshold.

`LogitTrend` is the running check the probes use: it reports a prediction once and the
crossing (the logit above the threshold) once. A heuristic for an early look, not a
verdict: read it beside the loss.

This module is used inside the training loop, so it imports nothing heavier than numpy.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

DIVERGENCE_LOGIT = 1e4  # every run above this diverged in the paper's sweep (section 3.1)
ADVICE = ("runs whose logit exceeded 1e4 diverged in Wortsman et al. 2023 (arXiv 2309.14322); "
          "qk-layernorm (model.qk_norm=true) or a lower LR keeps it down")
WINDOW = 4  # probe rows in the trend
MIN_R2 = 0.5  # the log-linear fit must explain at least this much of the window (3+ points)
INIT_LOGIT = 1.0  # assumed logit at step 0, used only while there is a single probe row
METRIC = "attn_logit_max"


def _usable(steps: Sequence[float], logits: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The (step, logit) points the trend uses: finite, with a positive logit."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(logits, dtype=float)
    ok = np.isfinite(s) & np.isfinite(v) & (v > 0)
    return s[ok], v[ok]


def predict_crossing(
    steps: Sequence[float],
    logits: Sequence[float],
    total_steps: int,
    threshold: float = DIVERGENCE_LOGIT,
    window: int = WINDOW,
) -> tuple[float, float] | None:
    """(predicted crossing step, growth rate per step in log units) by the rule of the module
    docstring, or None when it predicts no crossing within the run. Non-finite and
    non-positive points are left out; a logit already above `threshold` returns
    (its step, nan)."""
    s, v = _usable(steps, logits)
    s, v = s[-window:], v[-window:]
    if not len(s):
        return None
    now, last = float(s[-1]), float(v[-1])
    if last > threshold:
        return now, float("nan")
    if len(s) == 1:
        if now <= 0 or last <= INIT_LOGIT:
            return None
        s, v = np.array([0.0, now]), np.array([INIT_LOGIT, last])
    if np.ptp(s) == 0 or last < v.max():
        return None
    y = np.log(v)
    ds = s - s.mean()  # the least-squares line in closed form (np.polyfit's, without its SVD)
    slope = float(np.dot(ds, y - y.mean()) / np.dot(ds, ds))
    intercept = float(y.mean() - slope * s.mean())
    if not slope > 0:
        return None
    if len(s) >= 3:
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        ss_res = float(np.sum((y - (slope * s + intercept)) ** 2))
        if ss_tot <= 0 or 1.0 - ss_res / ss_tot < MIN_R2:
            return None
    ahead = (math.log(threshold) - math.log(last)) / slope
    if ahead > now - s[0] or now + ahead > total_steps:
        return None
    return now + ahead, float(slope)


def logit_trend_warning(
    steps: Sequence[float],
    logits: Sequence[float],
    total_steps: int,
    threshold: float = DIVERGENCE_LOGIT,
    window: int = WINDOW,
) -> str | None:
    """The warning text when `predict_crossing` predicts a crossing (or the logit is already
    above `threshold`), else None."""
    got = predict_crossing(steps, logits, total_steps, threshold, window)
    if got is None:
        return None
    s, v = _usable(steps, logits)
    now, last = float(s[-1]), float(v[-1])
    cross, rate = got
    return _predicted(now, last, cross, rate, total_steps, threshold) if rate == rate else \
        _crossed(now, last, threshold, None)


def _where(step: float, value: float) -> str:
    return f"layer-0 max attention logit {value:.3g} at step {step:.0f}"


def _predicted(now: float, last: float, cross: float, rate: float, total: int, threshold: float) -> str:
    return (f"{_where(now, last)} doubles every {math.log(2) / rate:.0f} steps; at this rate it crosses "
            f"{threshold:.3g} near step {cross:.0f} of {total}: {ADVICE}")


def _crossed(now: float, last: float, threshold: float, predicted_at: int | None) -> str:
    said = "" if predicted_at is None else f" (predicted at step {predicted_at})"
    return f"{_where(now, last)} is above {threshold:.3g}{said}: {ADVICE}"


@dataclass(frozen=True)
class TrendEvent:
    """One warning of `LogitTrend`: `event` is "logit_predicted" (a crossing is predicted at
    `predicted_step`) or "logit_crossed" (the logit is above the threshold now)."""

    event: Literal["logit_predicted", "logit_crossed"]
    step: int
    value: float
    threshold: float
    predicted_step: int | None
    message: str

    def fields(self) -> dict[str, Any]:
        """The extra fields of the run's `warning` row (docs/metrics.md)."""
        out: dict[str, Any] = {"event": self.event, "metric": METRIC, "layer": 0, "value": self.value,
                               "threshold": self.threshold}
        if self.predicted_step is not None:
            out["predicted_step"] = self.predicted_step
        return out


class LogitTrend:
    """The running check: `update(step, logit)` keeps only the last `window` points (constant
    work per probe row) and returns a `TrendEvent` the first time a crossing is predicted and
    the first time the logit is above the threshold, else None: at most two per run."""

    def __init__(self, total_steps: int, threshold: float = DIVERGENCE_LOGIT, window: int = WINDOW):
        self.total_steps, self.threshold, self.window = total_steps, threshold, window
        self.history: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.predicted_at: int | None = None  # the step of the prediction, once made
        self.crossed = False

    def _keep(self, step: int, logit: float) -> None:
        if math.isfinite(logit) and logit > 0:  # a usable point (`_usable`)
            self.history.append((step, logit))

    def restore(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Continue from a run's kept rows (a resumed run): the last `window` logits of its
        probe rows, and what its warning rows already said, so that a resumed run does not
        warn again about what it warned of before it stopped."""
        for row in rows:
            kind = row.get("kind")
            if kind == "probe":
                logits = row.get(METRIC)
                value = logits[0] if isinstance(logits, list) and logits else logits
                if isinstance(value, (int, float)):
                    self._keep(int(row["step"]), float(value))
            elif kind == "warning" and row.get("metric") == METRIC:
                if row.get("event") == "logit_predicted":
                    self.predicted_at = int(row["step"])
                elif row.get("event") == "logit_crossed":
                    self.crossed = True

    def update(self, step: int, logit: float) -> TrendEvent | None:
        if self.crossed:
            return None
        self._keep(step, logit)
        if math.isfinite(logit) and logit > self.threshold:
            self.crossed = True
            return TrendEvent("logit_crossed", step, logit, self.threshold, None,
                              _crossed(step, logit, self.threshold, self.predicted_at))
        if self.predicted_at is not None or not self.history:
            return None
        steps, values = zip(*self.history)
        got = predict_crossing(steps, values, self.total_steps, self.threshold, self.window)
        if got is None:
            return None
        cross, rate = got
        self.predicted_at = step
        return TrendEvent("logit_predicted", step, logit, self.threshold, round(cross),
                          _predicted(step, logit, cross, rate, self.total_steps, self.threshold))
