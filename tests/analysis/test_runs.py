"""Loading run and sweep directories (fake ones in the exact run-directory format)."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from seismo.analysis import collect_results, load_run, load_sweep
from seismo.sweep import expand, load_sweep_spec, run_dir, write_spec

from .conftest import GRAD_KEY, logit_at


def test_load_finished_run(tmp_path, make_run):
    run = load_run(make_run(tmp_path / "r", growth=0.02))
    assert run.status == "finished" and not run.diverged and run.divergence is None
    assert run.config["run"]["steps"] == 100 and run.get("optimizer.lr") == 1e-3
    assert list(run.metrics["step"]) == list(range(10, 101, 10))
    assert list(run.evals["step"]) == [0, 50, 100]
    assert run.loss_at_init == 5.5 and run.final_eval_loss == pytest.approx(2.05)
    table = run.per_layer("attn_logit_max")
    assert table.shape == (10, 2) and list(table.columns) == [0, 1]
    assert table.loc[30, 0] == pytest.approx(logit_at(30, 0.02)) and table.loc[30, 1] == pytest.approx(logit_at(30, 0.02, 1))
    assert run.per_layer("logz_mean").shape == (10, 1)
    assert isinstance(run.probes["attn_logit_max"].iloc[0], list), "per-layer values stay lists in .probes"
    with pytest.raises(KeyError, match="no probe metric 'attn_logits'.*attn_logit_max"):
        run.per_layer("attn_logits")


def test_killed_run_with_partial_last_line(tmp_path, make_run):
    path = make_run(tmp_path / "r", stop_at=37, status_file=False, partial_line=True)
    run = load_run(path)
    assert run.skipped_lines == 1
    assert run.status == "unfinished" and run.last_step == 30
    assert run.metrics["step"].max() == 30 and len(run.per_layer("attn_logit_max")) == 3
    # a resumed run wrote step 30 again: the newer row replaces the older one
    with (path / "metrics.jsonl").open("a") as f:
        f.write('\n{"step": 30, "loss": 1.0}\n')
    again = load_run(path)
    assert (again.metrics["step"] == 30).sum() == 1 and again.metrics.set_index("step").loc[30, "loss"] == 1.0


def test_diverged_and_preempted_runs(tmp_path, make_run):
    run = load_run(make_run(tmp_path / "d", diverge_at=42, growth=0.2))
    assert run.diverged and run.status == "diverged" and run.diverged_step == 42
    assert math.isnan(run.final_eval_loss) and run.loss_at_init == 5.5
    assert run.divergence["loss"] is None
    path = make_run(tmp_path / "p", stop_at=50)
    with (path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "preempted": true}\n')
    (path / "status.json").write_text('{"status": "preempted", "step": 50}')
    assert load_run(path).status == "unfinished"


def test_analysis_tables(tmp_path, make_run):
    path = make_run(tmp_path / "r")
    run = load_run(path)
    with pytest.raises(FileNotFoundError, match="seismo analyze"):
        run.analysis("massive")
    (path / "analysis").mkdir()
    pd.DataFrame({"step": [1, 1, 2, 2], "layer": [0, 1, 0, 1], "ratio": [1.0, 2.0, 3.0, 4.0]}).to_csv(
        path / "analysis" / "massive.csv", index=False)
    assert run.analysis_tables() == ["massive"] and run.analysis("massive")["ratio"].sum() == 10.0
    with pytest.raises(FileNotFoundError, match="a run directory"):
        load_run(tmp_path)


def make_sweep(tmp_path, make_run):
    """2 qk_norm x 3 LR: (qk off, lr 0.1) diverges at step 45, (qk on, lr 0.1) is unfinished,
    (qk on, lr 0.01) never started; final losses fall with qk_norm and vary with the LR."""
    base = {"run": {"steps": 100, "probe_every": 10, "eval_every": 50, "log_every": 10},
            "optimizer": {"warmup_steps": 10}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "fake", "base": "base.yaml", "grid": {"model.qk_norm": [False, True], "optimizer.lr": [1e-3, 1e-2, 1e-1]},
        "report": {"logit_step": 42}}))
    spec = load_sweep_spec(tmp_path / "sweep.yaml")
    out = tmp_path / "out"
    write_spec(spec, out)
    final = {(False, 1e-3): 3.0, (False, 1e-2): 2.5, (True, 1e-3): 2.9}
    for p in expand(spec):
        key = (p.values["model.qk_norm"], p.values["optimizer.lr"])
        if key == (True, 1e-2):
            continue
        make_run(run_dir(out, p), p.config, final=final.get(key, 2.0), growth=0.05 if not key[0] else 0.005,
                 diverge_at=45 if key == (False, 1e-1) else None, stop_at=60 if key == (True, 1e-1) else None)
    return spec, out


def test_collect_results_and_summary(tmp_path, make_run):
    spec, out = make_sweep(tmp_path, make_run)
    res = collect_results(out, spec)
    assert (out / "results.csv").exists() and (out / "summary.csv").exists()
    assert list(res.columns[:3]) == ["model.qk_norm", "optimizer.lr", "run"]
    assert len(res) == 6
    by = res.set_index(["model.qk_norm", "optimizer.lr"])
    assert list(res["status"]) == ["finished", "finished", "diverged", "finished", "missing", "unfinished"]
    div = by.loc[(False, 1e-1)]
    assert div["diverged"] and div["diverged_step"] == 45 and math.isnan(div["final_eval_loss"])
    assert by.loc[(False, 1e-3), "final_eval_loss"] == pytest.approx(3.05)
    assert by.loc[(False, 1e-3), "loss_at_init"] == 5.5
    # logit_step 42: nearest probe row is step 40 (the diverged run's last probe is 40 too)
    assert by.loc[(False, 1e-3), "attn_logit_step"] == 40
    assert by.loc[(False, 1e-3), "attn_logit_max_l0"] == pytest.approx(logit_at(40, 0.05))
    assert by.loc[(False, 1e-3), "logz_mean"] == pytest.approx(-0.1)
    # grad RMS of blocks/mlp/up/kernel, layer 0, mean over all probe rows (100 steps < 500): 1e-3 * (1 + mean(step)/100)
    assert by.loc[(False, 1e-3), "grad_rms_mlp0"] == pytest.approx(1e-3 * (1 + 0.55))
    assert by.loc[(False, 1e-3), "n_params"] > 0 and by.loc[(True, 1e-3), "n_params"] > by.loc[(False, 1e-3), "n_params"]
    summary = pd.read_csv(out / "summary.csv").set_index("model.qk_norm")
    # qk off: clamped [3.05, 2.55, 5.5] -> mean([0.5, 0, 2.95]); qk on: only the finished lr=1e-3 counts
    assert summary.loc[False, "lr_sensitivity"] == pytest.approx((0.5 + 2.95) / 3)
    assert summary.loc[False, "n_diverged"] == 1 and summary.loc[True, "n_unfinished"] == 1
    assert summary.loc[True, "lr_sensitivity"] == 0.0 and summary.loc[True, "n_runs"] == 1
    last = collect_results(out, spec, logit_step="last", write=False).set_index(["model.qk_norm", "optimizer.lr"])
    assert last.loc[(False, 1e-3), "attn_logit_step"] == 100


def test_load_sweep_with_and_without_spec(tmp_path, make_run):
    _, out = make_sweep(tmp_path, make_run)
    sweep = load_sweep(out)
    assert sweep.spec.name == "fake" and sweep.grid_keys == ["model.qk_norm", "optimizer.lr"]
    assert len(sweep.runs) == 5 and len(sweep.summary) == 2
    assert not (out / "results.csv").exists(), "load_sweep reads; it does not write"
    (out / "sweep.yaml").unlink()
    inferred = load_sweep(out)
    assert inferred.spec is None and inferred.grid_keys == ["model.qk_norm", "optimizer.lr"]
    assert sorted(inferred.results["run"]) == sorted(sweep.results.query("status != 'missing'")["run"])
    assert np.isclose(inferred.summary.set_index("model.qk_norm").loc[False, "lr_sensitivity"], (0.5 + 2.95) / 3)
    assert GRAD_KEY.startswith("grad_rms/")


def test_per_layer_non_finite_values_are_nan(tmp_path, make_run):
    path = make_run(tmp_path / "r")
    with (path / "metrics.jsonl").open("a") as f:  # the writer turns NaN/inf into null
        f.write('{"step": 101, "probe": true, "attn_logit_max": [null, 3.0], "logz_mean": null}\n')
    table = load_run(path).per_layer("attn_logit_max")
    assert math.isnan(table.loc[101, 0]) and table.loc[101, 1] == 3.0
