"""Figures and `seismo report` on fake runs and sweeps: every PNG is written and non-empty."""

import math
import re

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

pytestmark = pytest.mark.xdist_group("figures")  # the module fixture built once

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


# --------------------------------------------------------------------------- drawn as a paper would


@pytest.fixture(scope="module")
def one_size_dir(tmp_path_factory):
    """The demo's shape: one model size, qk_norm x 3 LRs; no run diverges, and the no-qk-LN LR 0.3
    run's logit passes 1e4 while the run finishes (as the demo's do)."""
    from .conftest import write_run

    tmp = tmp_path_factory.mktemp("one_size")
    base = {"run": {"steps": 200, "probe_every": 20, "eval_every": 50, "log_every": 10},
            "optimizer": {"warmup_steps": 10}, "model": {"n_heads": 2}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "one_size", "base": "base.yaml",
        "grid": {"model.qk_norm": [False, True], "optimizer.lr": [1e-3, 1e-2, 3e-1]},
        "report": {"pair": ["qk_norm=false,lr=0.3", "qk_norm=true,lr=0.3"]}}))
    spec = load_sweep_spec(tmp / "sweep.yaml")
    out = tmp / "out"
    write_spec(spec, out)
    for p in expand(spec):
        qk, lr = p.values["model.qk_norm"], p.values["optimizer.lr"]
        growth = 0.005 if qk else (0.06 if lr > 0.1 else 0.01)  # 2 e^{0.06 * 160} > 1e4
        write_run(run_dir(out, p), p.config, final=2.5 + 0.1 * math.log10(lr / 1e-2) ** 2, growth=growth,
                  grad=1e-4 / lr ** 0.5)
    return out


def _legend_texts(fig):
    legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend()]]
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def test_ema_is_the_normalised_exponential_kernel():
    """The recurrence equals the direct sum s_i = sum_j w_ij x_j / sum_j w_ij, w_ij = exp(-(t_i - t_j)/tau),
    over uneven steps and with a NaN skipped; a constant stays constant."""
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.integers(1, 30, size=40)).astype(float)
    x = rng.normal(3.0, 1.0, size=40)
    x[7] = np.nan
    tau = 37.0
    w = np.exp(-(t[:, None] - t[None, :]) / tau) * (t[None, :] <= t[:, None]) * np.isfinite(x)[None, :]
    direct = (w * np.nan_to_num(x)[None, :]).sum(1) / w.sum(1)
    np.testing.assert_allclose(figures.ema(x, t, tau), direct, rtol=1e-12)
    np.testing.assert_allclose(figures.ema(np.full(5, 2.5), [0, 1, 5, 6, 50]), 2.5)
    # by hand: rows 1 apart, tau = 1/ln 2 (decay 1/2): [1, (0.5*1 + 3)/1.5, (0.25 + 1.5 + 5)/1.75]
    np.testing.assert_allclose(figures.ema([1.0, 3.0, 5.0], tau=1 / math.log(2)), [1.0, 3.5 / 1.5, 6.75 / 1.75])


def test_labels_come_from_config_values(sweep_dir):
    assert figures.value_label("model.qk_norm", False) == "qk-layernorm off"
    assert figures.value_label("model.qk_norm", "True") == "qk-layernorm on"
    assert figures.series_label(["model.qk_norm", "optimizer.lr"], [False, 0.1]) == "qk-layernorm off, LR 0.1"
    assert figures.value_label("loss.z_loss", 1e-4) == "z-loss 1e-4"
    sweep = load_sweep(sweep_dir)
    pair = {n: sweep.runs[n] for n in ("d_model=32__qk_norm=false__lr=0.1", "d_model=64__qk_norm=true__lr=0.1")}
    assert list(figures.run_labels(pair).values()) == ["width 32, qk-layernorm off", "width 64, qk-layernorm on"]
    assert figures.common_label(pair) == "z-loss 0, weight decay 1e-4, LR 0.1"
    texts = [t for f in (figures.pair_traces(pair), figures.logz_traces(pair),
                         figures.lr_vs_loss(sweep.results, grid_keys=sweep.grid_keys),
                         figures.grad_rms(sweep.results, grid_keys=sweep.grid_keys)) for t in _legend_texts(f)]
    assert texts and not [t for t in texts if re.search(r"\w=\S", t) or "__" in t], texts
    # qk-layernorm's few scale parameters do not make a second tick: one per model size
    sens = figures.sensitivity_vs_params(sweep.summary, sweep.results, grid_keys=sweep.grid_keys)
    ticks = sens.axes[0].xaxis.get_major_locator()()
    assert len(ticks) == 2 and [figures.format_params(t) for t in ticks] == ["24.8k", "98.7k"]


def test_one_colour_per_group_one_style_per_second_factor(sweep_dir, one_size_dir):
    """Two sizes: colour = width, line style = qk-layernorm. One size: colour = qk-layernorm."""
    sweep = load_sweep(sweep_dir)
    fig = figures.lr_vs_loss(sweep.results, grid_keys=sweep.grid_keys)
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")}
    assert len(lines) == 4
    by = {(("32" in k.split(";")[0]), "off" in k): (ln.get_color(), ln.get_linestyle()) for k, ln in lines.items()}
    assert by[(True, True)][0] == by[(True, False)][0] != by[(False, True)][0] == by[(False, False)][0]
    assert by[(True, True)][1] == by[(False, True)][1] != by[(True, False)][1] == by[(False, False)][1]
    one = load_sweep(one_size_dir)
    fig = figures.lr_vs_loss(one.results, grid_keys=one.grid_keys)
    named = [ln for ln in fig.axes[0].lines if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in named] == ["qk-layernorm off", "qk-layernorm on"]
    assert named[0].get_color() != named[1].get_color()


def test_one_size_leaves_out_degenerate_panels(one_size_dir):
    one = load_sweep(one_size_dir)
    assert figures.n_sizes(one.results, grid_keys=one.grid_keys) == 1
    g = figures.grad_rms(one.results, grid_keys=one.grid_keys)
    assert len(g.axes) == 1 and g.axes[0].get_xlabel().startswith("peak learning rate")
    assert any("Gradient RMS vs model size is not drawn" in n for n in figures.figure_notes(g))
    s = figures.sensitivity_vs_params(one.summary, one.results, grid_keys=one.grid_keys)
    assert any("LR sensitivity vs model size is not drawn" in n for n in figures.figure_notes(s))
    assert [t.get_text() for t in s.axes[0].get_xticklabels()] == ["qk-layernorm off", "qk-layernorm on"]
    text = report(one_size_dir).read_text()
    assert "figures/lr_sensitivity.png" not in text and "LR sensitivity vs model size is not drawn" in text
    assert "Gradient RMS vs model size is not drawn" in text and "qk_norm=false__" not in text.split("## All runs")[0]
    assert_png(one_size_dir / "figures" / "grad_rms.png")


def test_threshold_does_not_call_finished_runs_diverged(one_size_dir):
    one = load_sweep(one_size_dir)
    pair = {n: one.runs[n] for n in ("qk_norm=false__lr=0.3", "qk_norm=true__lr=0.3")}
    assert not any(r.diverged for r in pair.values())
    fig = figures.pair_traces(pair)
    texts = _legend_texts(fig)
    crossed = [t for t in texts if t.startswith("qk-layernorm off")]
    assert crossed == ["qk-layernorm off (above 1e4 from step 160; finished)"], texts
    assert not [t for t in texts if "diverged" in t and "threshold" not in t]
    assert "1e4: the paper's divergence threshold" in texts
    # the train loss: raw faint, its EMA over it
    ax = fig.axes[0]
    raw, smooth = ax.lines[0], ax.lines[1]
    assert raw.get_alpha() < 0.5 and (smooth.get_alpha() or 1.0) == 1.0
    m = pair["qk_norm=false__lr=0.3"].metrics
    np.testing.assert_allclose(smooth.get_ydata(), figures.ema(m["loss"], m["step"]))


def test_every_axis_and_colour_bar_has_its_unit(sweep_dir, make_run, tmp_path):
    sweep = load_sweep(sweep_dir)
    res, keys = sweep.results, sweep.grid_keys
    pair = {n: sweep.runs[n] for n in list(sweep.runs)[:2]}
    run = load_run(make_run(tmp_path / "r", growth=0.03))
    figs = [figures.lr_vs_loss(res, grid_keys=keys), figures.sensitivity_vs_params(sweep.summary, res, grid_keys=keys),
            figures.grad_rms(res, grid_keys=keys), figures.pair_traces(pair), figures.logz_traces(pair),
            figures.logit_extrapolation(res, extrapolate_logits(res, 100, [1e6], group_by=["model.qk_norm"])),
            figures.layer_traces(run.per_layer("attn_logit_max"), "attn_logit_max")]
    for fig in figs:
        for ax in fig.axes:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                if label.startswith("training step"):  # a count of optimizer steps
                    continue
                assert "(" in label and ")" in label, f"no unit in {label!r}"
    heat = figures.layer_heatmap(run.per_layer("resid_rms"), "resid_rms")
    assert heat.axes[1].get_ylabel() == "residual-stream RMS (activation units)"
    assert figures.metric_label("attn_entropy") == "attention entropy (nats)"


def test_log_step_heatmap_gives_every_checkpoint_its_cell():
    """Steps 0, 1, 2, 4, ..., 64 on a log axis: step 0 one spacing (log10 2) left of step 1, cells
    of equal width, tick labels that are the steps."""
    steps = [0, 1, 2, 4, 8, 16, 32, 64]
    pos = figures.log_step_positions(steps)
    np.testing.assert_allclose(pos, [-math.log10(2)] + [math.log10(s) for s in steps[1:]])
    table = pd.DataFrame(np.arange(16.0).reshape(8, 2) + 1, index=pd.Index(steps, name="step"))
    fig = figures.layer_heatmap(table, "ratio_seq_mean", log=True, log_steps=True)
    mesh = fig.axes[0].collections[0]
    edges = np.unique(np.round(mesh.get_coordinates()[..., 0], 9))
    np.testing.assert_allclose(np.diff(edges), math.log10(2), rtol=1e-6)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "10"]
    assert "one cell per checkpoint" in fig.axes[0].get_xlabel()


def test_sweep_report_without_probe_rows(tmp_path):
    """A sweep run with run.probe_every 0 has no max logit: the report leaves out the logit
    sections instead of failing."""
    import json

    from .conftest import write_run

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"run": {"steps": 100, "probe_every": 20, "eval_every": 50,
                                                                "log_every": 10}, "optimizer": {"warmup_steps": 10}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "no_probes", "base": "base.yaml",
                                                         "grid": {"loss.z_loss": [0.0, 1e-2], "optimizer.lr": [1e-3]}}))
    spec = load_sweep_spec(tmp_path / "sweep.yaml")
    out = tmp_path / "out"
    write_spec(spec, out)
    for p in expand(spec):
        d = write_run(run_dir(out, p), p.config)
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if not r.get("probe")))
    text = report(out).read_text()
    assert "figures/logz.png" in text and "Seeing instability coming" not in text and "not drawn (" not in text
    assert "The layer-0 max attention logit is not drawn: these runs recorded no probe rows" in text
    assert_png(out / "figures" / "logz.png")
