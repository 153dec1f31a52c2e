"""`seismo sweep` end to end on a tiny grid: resume skips finished runs, vmapped points equal
separately trained runs, and `seismo report` draws the sweep's figures."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from seismo.analysis import load_run, report
from seismo.config.sweepfile import expand, load_sweep_spec, run_dir
from seismo.sweep.runner import run_sweep
from seismo.train.loop import train

pytestmark = pytest.mark.xdist_group("sweep_runner")

BASE = """
model: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 16}
data: {batch_size: 4, seq_len: 16, eval_sequences: 4}
optimizer: {lr: 1e-3, warmup_steps: 1}
run: {steps: 6, log_every: 1, eval_every: 3, probe_every: 2, checkpoint_every: 3, checkpoint_log_until: 0,
      progress: "off", checkpoint_async: false}
"""


def sweep_file(tmp_path, grid: dict, execution: str) -> str:
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", "execution": execution, "grid": grid}))
    return str(path)


def losses(d):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if r.get("kind") == "train"])


@pytest.fixture(scope="module")
def vmapped_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vsweep")
    path = sweep_file(tmp, {"optimizer.lr": [1e-3, 1e-2], "model.qk_norm": [False, True]}, "vmap")
    out = run_sweep(path, out=tmp / "out")
    return path, out


def test_vmapped_points_equal_separate_runs(vmapped_sweep, tmp_path):
    path, out = vmapped_sweep
    points = expand(load_sweep_spec(path))
    assert len(points) == 4
    for p in points[:2]:  # two LRs of one group, each trained alone
        alone = tmp_path / p.name
        train(p.config, alone)
        np.testing.assert_allclose(losses(run_dir(out, p)), losses(alone), rtol=2e-5, atol=2e-6)
        a, b = load_run(run_dir(out, p)), load_run(alone)
        np.testing.assert_allclose(a.final_eval_loss, b.final_eval_loss, rtol=2e-5)
        np.testing.assert_allclose(np.stack(a.probes["attn_logit_max"]), np.stack(b.probes["attn_logit_max"]), rtol=1e-4)


def test_results_and_summary_tables(vmapped_sweep):
    _, out = vmapped_sweep
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"finished"}
    assert {"optimizer.lr", "model.qk_norm", "final_eval_loss", "loss_at_init", "diverged",
            "attn_logit_max_l0"} <= set(results.columns)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 and "lr_sensitivity" in summary.columns  # one group per qk_norm value


def test_report_draws_sweep_figures(vmapped_sweep):
    _, out = vmapped_sweep
    md = report(out)
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs and all((out / "figures" / p).stat().st_size > 5000 for p in pngs)
    text = md.read_text()
    assert all(p in text for p in pngs) and "lr_sensitivity" in text.replace(" ", "_").lower()


def test_resumed_sequential_sweep_skips_finished_runs(tmp_path, capsys):
    path = sweep_file(tmp_path, {"optimizer.lr": [1e-3, 3e-3]}, "sequential")
    out = run_sweep(path, out=tmp_path / "out")
    points = expand(load_sweep_spec(path))
    stamps = {p.name: (run_dir(out, p) / "metrics.jsonl").stat().st_mtime_ns for p in points}
    # forget that the second run finished: it must resume (and only it)
    status = run_dir(out, points[1]) / "status.json"
    status.write_text(json.dumps({"status": "running", "step": 3}))
    capsys.readouterr()
    run_sweep(path, out=tmp_path / "out")
    log = capsys.readouterr().out
    assert "1 already done, 1 to run" in log
    # per-point status and where the sweep stands
    assert f"    {points[0].name}: skipped (finished already)" in log, log
    assert f"[1/1] {points[1].name}: started" in log and f"    {points[1].name}: finished at step" in log, log
    assert "    sweep: 1/1 points done in " in log, log
    assert (run_dir(out, points[0]) / "metrics.jsonl").stat().st_mtime_ns == stamps[points[0].name]
    assert json.loads(status.read_text())["status"] == "finished"


def test_bad_sweep_fails_before_training(tmp_path):
    from seismo.sweep import SweepError

    path = sweep_file(tmp_path, {"optimizer.lrr": [1e-3]}, "sequential")
    with pytest.raises(SweepError, match="optimizer.lr"):
        run_sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _train_rows(d):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return {k: [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows if r["kind"] == k] for k in ("train", "eval")}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_mid_group_then_resume_gives_the_uninterrupted_losses(tmp_path):
    """A vmapped group goes through the one training loop: SIGTERM saves every point at the
    same step and exits 0, and the resumed sweep is bit-identical to one never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "stop", "base": "base.yaml", "execution": "vmap", "grid": {"optimizer.lr": [1e-3, 1e-2]},
        "set": ["run.steps=300", "run.log_every=5", "run.eval_every=100", "run.checkpoint_every=100",
                "run.probe_every=10"]}))
    ref = run_sweep(path, out=tmp_path / "ref")
    points = expand(load_sweep_spec(path))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "seismo.cli", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    first = run_dir(out, points[0]) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if first.exists() and any(json.loads(x).get("step", 0) >= 20 for x in first.read_text().splitlines()[-3:]
                                  if x.endswith("}")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted" in stdout and not (out / "results.csv").exists(), stdout
    stopped = [json.loads((run_dir(out, p) / "status.json").read_text()) for p in points]
    assert {s["status"] for s in stopped} == {"preempted"} and len({s["step"] for s in stopped}) == 1, stopped
    assert 20 <= stopped[0]["step"] < 300, "the signal must land mid-group"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for p in points:
        got, want = _train_rows(run_dir(out, p)), _train_rows(run_dir(ref, p))
        assert got == want, f"{p.name}: the resumed point differs from the uninterrupted one"
        assert json.loads((run_dir(out, p) / "status.json").read_text())["status"] == "finished"
    assert pd.read_csv(out / "results.csv")["loss_at_init"].tolist() == \
        pd.read_csv(ref / "results.csv")["loss_at_init"].tolist()
