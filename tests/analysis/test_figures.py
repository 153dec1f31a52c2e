"""Figures and `seismo report` on fake runs and sweeps: every PNG is written and non-empty."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from seismo.analysis import (
    collect_results,
    extrapolate_logits,
    figures,
    load_run,
    load_sweep,
    report,
)
from seismo.sweep import expand, load_sweep_spec, run_dir, write_spec

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, f"{path} is not a drawn PNG ({len(data)} bytes)"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """2 widths x qk_norm x 4 LRs; without qk_norm the logits grow with LR and width and the
    largest LRs diverge, as in Wortsman Fig. 1-2."""
    from .conftest import write_run

    tmp = tmp_path_factory.mktemp("sweep")
    base = {"run": {"steps": 200, "probe_every": 20, "eval_every": 50, "log_every": 10},
            "optimizer": {"warmup_steps": 10}, "model": {"n_heads": 2}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "fake_qk", "description": "A fake qk-layernorm sweep for the figure tests.", "base": "base.yaml",
        "grid": {"model.d_model": [32, 64], "model.qk_norm": [False, True], "optimizer.lr": [1e-3, 1e-2, 1e-1, 3e-1]},
        "report": {"pair": ["d_model=32,qk_norm=false,lr=0.1", "d_model=64,qk_norm=false,lr=0.1"],
                   "logit_step": 100}}))
    spec = load_sweep_spec(tmp / "sweep.yaml")
    out = tmp / "out"
    write_spec(spec, out)
    for p in expand(spec):
        d, qk, lr = p.values["model.d_model"], p.values["model.qk_norm"], p.values["optimizer.lr"]
        best = 2.4 if d == 64 else 2.7
        final = best + 0.15 * math.log10(lr / 1e-2) ** 2 + (0.0 if qk else 0.05)
        growth = (0.002 if qk else 0.012) * (1 + math.log10(lr / 1e-3)) * (d / 32) ** 0.5
        diverge = None if qk or lr < 1e-1 or (lr == 1e-1 and d == 32) else 120
        write_run(run_dir(out, p), p.config, final=final, growth=growth, diverge_at=diverge,
                  grad=1e-4 / (lr * 100) ** 0.5 / (d / 32))
    return out


def test_figure_functions_build_without_drawing(sweep_dir, make_run, tmp_path):
    """Every figure function returns a Figure (drawing to PNG is checked by the report tests)."""
    sweep = load_sweep(sweep_dir)
    res, keys = sweep.results, sweep.grid_keys
    assert figures.split_keys(res, grid_keys=keys) == (["model.d_model"], ["model.qk_norm"])
    fits = extrapolate_logits(res, 100, [1e6], group_by=["model.qk_norm"])
    pair = {n: sweep.runs[n] for n in list(sweep.runs)[:2]}
    built = [figures.lr_vs_loss(res, grid_keys=keys), figures.sensitivity_vs_params(sweep.summary, res, grid_keys=keys),
             figures.grad_rms(res, grid_keys=keys), figures.logit_extrapolation(res, fits),
             figures.pair_traces(pair), figures.logz_traces(pair)]
    run = load_run(make_run(tmp_path / "r", growth=0.03))
    built += [figures.layer_traces(run.per_layer("attn_logit_max"), "max attention logit"),
              figures.layer_heatmap(run.per_layer("resid_rms"), "resid_rms")]
    long = pd.DataFrame({"step": np.repeat([0, 10, 100], 2), "layer": [0, 1] * 3,
                         "ratio_seq_mean": [3.0, 5.0, 30.0, 800.0, 40.0, 2000.0]})
    table, value = figures.long_to_step_layer(long)
    assert value == "ratio_seq_mean" and table.shape == (3, 2)
    built.append(figures.layer_heatmap(table, value, log=True, log_steps=True))
    assert all(f.axes and any(ax.lines or ax.collections for ax in f.axes) for f in built)


def test_sweep_report(sweep_dir):
    path = report(sweep_dir)
    text = path.read_text()
    assert path.name == "report.md" and "# Sweep report: fake_qk" in text and "## LR sensitivity" in text
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "summary.csv").exists()
    for name in ("lr_vs_loss", "lr_sensitivity", "pair_traces", "logz", "logit_extrapolation", "grad_rms"):
        assert f"figures/{name}.png" in text, f"{name} missing from the report"
        assert_png(sweep_dir / "figures" / f"{name}.png")
    assert "not drawn" not in text
    res = collect_results(sweep_dir, write=False)
    assert res["diverged"].sum() == 3


def test_run_report_with_analysis_table(tmp_path, make_run):
    path = make_run(tmp_path / "r", diverge_at=150, growth=0.05)
    (path / "analysis").mkdir()
    pd.DataFrame({"step": [0, 0, 50, 50], "layer": [0, 1, 0, 1], "ratio": [2.0, 3.0, 50.0, 400.0]}).to_csv(
        path / "analysis" / "massive_activations.csv", index=False)
    text = report(path).read_text()
    assert "# Run report: r" in text and "diverged" in text
    for name in ("loss_logz", "attn_logit_max_layers", "attn_logit_max_heatmap", "resid_rms_heatmap",
                 "massive_ratio_heatmap"):
        assert f"figures/{name}.png" in text
        assert_png(path / "figures" / f"{name}.png")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        report(tmp_path)
