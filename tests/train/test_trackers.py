"""run.trackers (seismo.train.trackers): TensorBoard event files read back with TensorBoard's
own EventAccumulator, the offline W&B run read back with wandb's own reader (`wandb leet
inspect --json`), both against metrics.jsonl, including after a resume that drops rows (no
step twice); the names of per-layer values; a missing package refused before training."""

import json
import math
import os
import subprocess
import sys

import pytest

from seismo import config, rundir
from seismo.train import trackers
from seismo.train.loop import train
from tiny_run import tiny_run

pytestmark = pytest.mark.xdist_group("trackers")  # its module fixture, built once


def test_per_layer_lists_become_one_scalar_per_layer_named_as_in_metrics_jsonl():
    row = {"step": 7, "kind": "probe", "loss": 2.5, "attn_logit_max": [3.0, 4.5], "grad_rms/head/kernel": 0.1,
           "nested": [[1.0, 2.0]], "missing": None, "flag": True, "note": "text", "by": {"a": 1}}
    assert trackers.scalars(row) == {
        "loss": 2.5, "attn_logit_max/layer_0": 3.0, "attn_logit_max/layer_1": 4.5, "grad_rms/head/kernel": 0.1,
        "nested/layer_0/0": 1.0, "nested/layer_0/1": 2.0, "flag": 1.0, "by/a": 1.0}
    assert trackers.text_of({"step": 3, "kind": "warning", "warning": "logits grow"}) == "logits grow"
    assert "step 9" in trackers.text_of({"step": 9, "kind": "divergence", "loss": None})
    assert trackers.text_of(row) is None


def test_unknown_tracker_and_missing_package_fail_before_training(monkeypatch):
    with pytest.raises(config.ConfigError, match="did you mean 'tensorboard'"):
        config.load(None, ["run.trackers=[tensorbord]"])
    cfg = config.load(None, ["run.trackers=[jsonl, wandb]"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(config.ConfigError, match=r"pip install 'seismo\[trackers\]'"):
        trackers.check_available(cfg)
    trackers.check_available(config.load(None, ["run.trackers=[jsonl, tensorboard]"]))  # installed: fine


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny run with both trackers, then its last checkpoint moved aside (as an unreadable one
    is) and the run started again: it resumes from step 4, and metrics.jsonl drops the rows
    past it and records steps 5-8 again."""
    keys = ("WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_API_KEY")
    saved = {k: os.environ.pop(k, None) for k in keys}
    home = tmp_path_factory.mktemp("wandb_home")
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[k] = str(home)  # nothing written to the user's home; WANDB_MODE unset: offline
    try:
        run_dir = tmp_path_factory.mktemp("tracked")
        cfg = tiny_run("run.trackers=[jsonl, tensorboard, wandb]", "run.probe_every=2")
        first = train(cfg, run_dir)
        first_rows = [rundir.parse_row(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        (run_dir / "checkpoints" / "8").rename(run_dir / "checkpoints" / "8.corrupt-by-test")
        second = train(cfg, run_dir)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    assert first.status == second.status == "finished" and second.step == 8
    rows = [rundir.parse_row(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, first_rows


def _by_step(rows, kind, key):
    return {r["step"]: r[key] for r in rows if r["kind"] == kind}


def test_tensorboard_reads_the_run_with_no_step_twice_after_a_resume(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows, _ = tracked_run
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per start
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    for tag, kind, key, index in [("loss", "train", "loss", None), ("eval_loss", "eval", "eval_loss", None),
                                  ("grad_norm", "train", "grad_norm", None),
                                  ("attn_logit_max/layer_0", "probe", "attn_logit_max", 0),
                                  ("grad_rms/head/kernel", "probe", "grad_rms/head/kernel", None)]:
        want = _by_step(rows, kind, key)
        if index is not None:
            want = {s: v[index] for s, v in want.items()}
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == sorted(want), (tag, got)  # every step once: the resume's restart rule
        for s, v in got:
            assert math.isclose(v, want[s], rel_tol=1e-6), (tag, s, v, want[s])  # float32 in the event file
    assert _by_step(rows, "eval", "eval_loss").keys() == {0, 4, 8}


def _wandb_history(run_dir):
    """Every history record of every offline segment of the run, read by wandb's own reader."""
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    items = []
    for seg in segments:
        p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(seg)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        records = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
        items += [r["history"]["item"] for r in records if r.get("type") == "history"]
        runs = [r["run"] for r in records if r.get("type") == "run"]
        assert runs and runs[0]["config"]["update"]["run"]["trackers"] == ["jsonl", "tensorboard", "wandb"]
    return segments, items


def test_offline_wandb_run_holds_each_step_once_with_the_values_of_metrics_jsonl(tracked_run):
    run_dir, rows, first_rows = tracked_run
    segments, items = _wandb_history(run_dir)
    assert len(segments) == 2  # one offline segment per start, one run id
    assert len({s.name.rsplit("-", 1)[1] for s in segments}) == 1
    steps = [it["_step"] for it in items]
    assert steps == sorted(set(steps)) == sorted({r["step"] for r in first_rows})  # each step once, in order
    # the steps the resumed start recorded again (5-8) keep the values logged first; the exact
    # resume reproduces them, so they equal what metrics.jsonl holds now
    train_loss = _by_step(rows, "train", "loss")
    logits = {s: v[0] for s, v in _by_step(rows, "probe", "attn_logit_max").items()}
    for it in items:
        s = it["_step"]
        if s in train_loss:
            assert math.isclose(it["loss"], train_loss[s], rel_tol=1e-5), (s, it["loss"], train_loss[s])
        if s in logits:
            assert math.isclose(it["attn_logit_max/layer_0"], logits[s], rel_tol=1e-5)
    assert (run_dir / "wandb" / trackers.LAST_STEP_FILE).read_text().strip() == "8"


def test_a_run_directory_on_object_storage_gets_a_line_and_no_trackers(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = trackers.Trackers(config.load(None, ["run.trackers=[tensorboard]"]), "gs://bucket/run")
    t.write({"step": 1, "kind": "train", "loss": 1.0})
    t.close()
    assert "on object storage" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written locally (no ./gs:/ folder)
