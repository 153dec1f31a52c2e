"""`seismo sweep` end to end on a tiny grid: resume skips finished runs, vmapped points equal
separately trained runs, and `seismo report` draws the sweep's figures."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from seismo.analysis import load_run, report
from seismo.sweep.runner import run_sweep
from seismo.sweep.spec import expand, load_sweep_spec, run_dir
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
    return np.array([r["loss"] for r in rows if "loss" in r and not r.get("probe")])


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
    assert (run_dir(out, points[0]) / "metrics.jsonl").stat().st_mtime_ns == stamps[points[0].name]
    assert json.loads(status.read_text())["status"] == "finished"


def test_bad_sweep_fails_before_training(tmp_path):
    from seismo.sweep import SweepError

    path = sweep_file(tmp_path, {"optimizer.lrr": [1e-3]}, "sequential")
    with pytest.raises(SweepError, match="optimizer.lr"):
        run_sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
