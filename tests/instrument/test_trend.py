"""seismo.instrument.trend: the in-run logit warning, on closed-form histories, on the probe rows
of the demo's own runs (tests/instrument/data/qk_layernorm_logits.json) and through a training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from seismo.instrument import trend

DATA = Path(__file__).parent / "data"


def test_exponential_growth_predicts_the_closed_form_crossing():
    steps = np.array([100, 125, 150, 175])
    got = trend.predict_crossing(steps, 2.0 * np.exp(0.04 * steps), total_steps=1000)
    ahead = math.log(1e4 / (2.0 * math.exp(0.04 * 175))) / 0.04  # from the newest value at the fitted rate
    assert got is not None and got[0] == pytest.approx(175 + ahead, rel=1e-9) and got[1] == pytest.approx(0.04)
    msg = trend.logit_trend_warning(steps, 2.0 * np.exp(0.04 * steps), total_steps=1000)
    assert f"crosses 1e+04 near step {175 + ahead:.0f} of 1000" in msg and "qk_norm" in msg
    assert f"doubles every {math.log(2) / 0.04:.0f} steps" in msg
    assert trend.predict_crossing(steps, 2.0 * np.exp(0.04 * steps), total_steps=200) is None, "after the run ends"


def test_no_extrapolation_further_ahead_than_the_window_spans():
    # the healthy-run false alarm: slow early growth of a small logit, projected 170 steps ahead from 30 steps
    steps = np.array([10, 20, 30, 40])
    values = 2.0 * np.exp(0.04 * steps)
    assert math.log(1e4 / values[-1]) / 0.04 > np.ptp(steps)
    assert trend.predict_crossing(steps, values, total_steps=100_000) is None


def test_quiet_on_flat_falling_past_peak_or_poorly_fitted_histories(rng):
    steps = np.arange(0, 40, 10)
    assert trend.predict_crossing(steps, np.full(4, 3e3), 1000) is None
    assert trend.predict_crossing(steps, 3e3 * np.exp(-0.01 * steps), 1000) is None
    assert trend.predict_crossing(steps, 3e3 * (1 + 0.01 * rng.standard_normal(4)), 1000) is None
    assert trend.predict_crossing(steps, [1000, 3000, 9000, 8000], 1000) is None, "the newest point is not the highest"
    # a zig-zag: rising on average, fast enough, but the line explains little of it (R^2 < MIN_R2)
    zig = np.array([10.0, 1000.0, 20.0, 1001.0])
    y = np.log(zig)
    slope, icpt = np.polyfit(steps, y, 1)
    r2 = 1 - np.sum((y - slope * steps - icpt) ** 2) / np.sum((y - y.mean()) ** 2)
    assert slope > 0 and math.log(1e4 / zig[-1]) / slope <= np.ptp(steps) and r2 < trend.MIN_R2
    assert trend.predict_crossing(steps, zig, 1000) is None
    assert trend.predict_crossing([10, 20], [np.nan, -1.0], 1000) is None


def test_first_probe_row_grows_from_the_assumed_init_logit():
    # one point: the growth since step 0 from INIT_LOGIT = 1; it warns once the logit is past sqrt(threshold)
    cross, rate = trend.predict_crossing([25], [554.0], 500)
    assert rate == pytest.approx(math.log(554.0) / 25)
    assert cross == pytest.approx(25 + math.log(1e4 / 554.0) / rate)
    assert trend.predict_crossing([25], [99.0], 500) is None
    assert trend.predict_crossing([25], [101.0], 500) is not None
    assert trend.predict_crossing([25], [2e4], 500) == (25, pytest.approx(float("nan"), nan_ok=True))


def replay(rows, total_steps, threshold=1e4):
    t = trend.LogitTrend(total_steps, threshold)
    return [e for e in (t.update(s, v) for s, v in rows) if e is not None]


def test_running_check_reports_one_prediction_then_one_crossing():
    rows = [(s, 10 ** (s / 2)) for s in range(1, 12)]  # x10 every 2 steps: crosses 5e3 at step 8
    events = replay(rows, total_steps=20, threshold=5e3)
    assert [e.event for e in events] == ["logit_predicted", "logit_crossed"]
    pred, crossed = events
    assert pred.step < crossed.step == 8 and pred.predicted_step >= pred.step
    assert crossed.value == pytest.approx(1e4) and "is above 5e+03 (predicted at step" in crossed.message
    assert pred.fields() == {"event": "logit_predicted", "metric": "attn_logit_max", "layer": 0,
                             "value": pred.value, "threshold": 5e3, "predicted_step": pred.predicted_step}
    # a jump past the threshold with no warning before it is still reported, once
    jump = replay([(10, 5.0), (20, 6.0), (30, 2e4), (40, 3e4)], total_steps=100)
    assert [e.event for e in jump] == ["logit_crossed"] and "predicted" not in jump[0].message


def demo_runs():
    return json.loads((DATA / "qk_layernorm_logits.json").read_text())["runs"]


def first_crossing(rows, threshold=1e4):
    return next((s for s, v in rows if v > threshold), None)


@pytest.mark.parametrize("name", ["qk_norm=false__lr=0.1", "qk_norm=false__lr=0.3"])
def test_demo_runs_that_cross_are_warned_before_they_cross(name):
    run = demo_runs()[name]
    crossed_at = first_crossing(run["probe_rows"])
    assert crossed_at is not None and crossed_at <= run["steps"], "this demo run crossed 1e4"
    events = replay(run["probe_rows"], run["steps"])
    assert [e.event for e in events] == ["logit_predicted", "logit_crossed"]
    assert events[0].step < crossed_at == events[1].step


def test_demo_runs_that_stay_below_the_threshold_never_warn():
    quiet = {n: r for n, r in demo_runs().items() if first_crossing(r["probe_rows"]) is None}
    assert "qk_norm=false__lr=1e-3" in quiet and len(quiet) == 10, sorted(quiet)
    for name, run in quiet.items():
        assert replay(run["probe_rows"], run["steps"]) == [], name


def test_a_training_run_records_the_prediction_and_the_crossing_once(tmp_path, capsys):
    """Through train(): the default probe's host half with its layer-0 logit replaced by a planted
    runaway (x10 every 2 steps), so the real loop writes the rows and prints the lines."""
    from seismo import rundir
    from seismo.instrument.probes import InstabilityProbes
    from seismo.train.loop import train
    from tiny_run import tiny_run

    class Planted(InstabilityProbes):
        def on_step(self, step, summary, log):
            logits = np.asarray(summary["attn_logit_max"], np.float64).copy()
            logits[0] = 10 ** (step / 2)
            super().on_step(step, {**summary, "attn_logit_max": logits}, log)

    cfg = tiny_run("run.steps=10", "run.probe_every=1", "run.eval_every=10", "run.checkpoint_every=10",
                   "run.logit_warning_threshold=5e3")
    train(cfg, tmp_path, probe=lambda model, c: Planted(model, c))
    rows = [json.loads(x) for x in (tmp_path / rundir.METRICS_FILE).read_text().splitlines()]
    warned = [r for r in rows if r["kind"] == "warning"]
    assert [(r["event"], r["step"]) for r in warned] == [("logit_predicted", 5), ("logit_crossed", 8)]
    assert warned[0]["predicted_step"] == 7 and warned[0]["value"] == pytest.approx(10**2.5, rel=1e-6)
    assert warned[1]["threshold"] == 5e3 and "predicted at step 5" in warned[1]["warning"]
    lines = [x for x in capsys.readouterr().err.splitlines() if "attention logit" in x]
    assert len(lines) == 2 and all(x.startswith(f"seismo: warning: {tmp_path.name}: layer-0") for x in lines)
    assert sum(r["kind"] == "probe" for r in rows) == 10, "every probe row is still written"
