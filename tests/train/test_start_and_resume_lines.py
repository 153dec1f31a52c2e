"""What a run says before its silent start (init, the step-0 eval, the compiles), and a
resumed run's logit warning: said once per run, not again after the resume."""

import json
import re
from pathlib import Path

import pytest

from seismo import config
from seismo.instrument.trend import LogitTrend
from seismo.train.loop import train

TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16",
    "data.batch_size=4", "data.seq_len=16", "data.eval_sequences=4", "optimizer.warmup_steps=1",
    "run.steps=8", "run.log_every=2", "run.eval_every=4", "run.probe_every=1", "run.checkpoint_every=4",
    "run.checkpoint_log_until=0", "run.checkpoint_async=false", "run.progress=off",
    "run.logit_warning_threshold=1e-3",  # every logit is above it: the crossing warning fires at step 1
]
pytestmark = pytest.mark.xdist_group("train_loop")


def warnings_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "warning" and r.get("metric") == "attn_logit_max"]


def test_start_line_first_and_the_crossing_warned_once_across_a_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = train(config.load(None, TINY), run_dir, stop_at=4)
    assert first.status == "preempted" and first.step == 4
    err = capsys.readouterr().err.splitlines()
    start = next(i for i, x in enumerate(err) if re.search(r"run: [\d,]+ parameters, 8 steps of 4 x 16 tokens, "
                                                           r"attention \w+, on 1 cpu device; run directory ", x))
    assert start < next(i for i, x in enumerate(err) if "compiling the " in x)  # every step probes here
    assert err[start].endswith(str(run_dir))
    said = [x for x in err if "seismo: warning: run:" in x]
    assert len(said) == 1 and "above" in said[0]
    assert [w["event"] for w in warnings_of(run_dir)] == ["logit_crossed"] and warnings_of(run_dir)[0]["step"] == 1

    second = train(config.load(None, TINY), run_dir)  # resumes at step 4 and finishes
    assert second.status == "finished" and second.step == 8
    assert not [x for x in capsys.readouterr().err.splitlines() if "seismo: warning: run:" in x]
    assert [(w["event"], w["step"]) for w in warnings_of(run_dir)] == [("logit_crossed", 1)]


def test_trend_restore_continues_history_and_flags():
    """LogitTrend.restore from kept rows: the last `window` positive logits, and what was warned."""
    trend = LogitTrend(total_steps=100, threshold=1e4, window=3)
    rows = [{"step": s, "kind": "probe", "attn_logit_max": [v, 0.5]} for s, v in [(1, 2.0), (2, -1.0), (3, 4.0),
                                                                                   (4, 8.0), (5, 16.0)]]
    rows.insert(3, {"step": 3, "kind": "warning", "metric": "attn_logit_max", "event": "logit_predicted",
                    "predicted_step": 40, "warning": "..."})
    rows.append({"step": 5, "kind": "train", "loss": 1.0})
    trend.restore(rows)
    assert list(trend.history) == [(3, 4.0), (4, 8.0), (5, 16.0)]  # -1 is not a usable logit
    assert trend.predicted_at == 3 and not trend.crossed
    assert trend.update(6, 32.0) is None  # predicted before the resume: not said again
    event = trend.update(7, 2e4)
    assert event is not None and event.event == "logit_crossed" and "predicted at step 3" in event.message
