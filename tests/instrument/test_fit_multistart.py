"""Eq. 9 multi-start (seismo.instrument.dynamics_fit) on real runs and on planted curves, and the
Sparsing-Law fits (seismo.instrument.sparsing_law) on planted curves.

tests/instrument/data/massive_ratio_tiny.json: ratio_seq_mean (64 evaluation sequences) per layer
of four tiny runs, 41 checkpoints over 800 steps, step 0 and 40 log-spaced from 1 to 800
(scripts/make_instrument_test_data.py massive; data/README.md). massive_ratio_tiny_high_lr.json:
the same model and schedule with qk-layernorm at LR 1e-2 to 0.3, where the ratio grows well past
its value at initialisation (docs/methods.md §4.2)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import curve_fit

from seismo.instrument import dynamics_fit as dyn
from seismo.instrument import sparsing_law as sl

DATA = Path(__file__).parent / "data"


def layers(file="massive_ratio_tiny.json"):
    runs = json.loads((DATA / file).read_text())["runs"]
    return {f"{run}/{layer}": np.array(pts, float) for run, ls in runs.items() for layer, pts in ls.items()}


def paper_start_r2(t, y):
    """The single start of the paper (and of seismo before the multi-start), by scipy directly."""
    u, v = t / t.max(), (y - y.min()) / np.ptp(y)
    p0 = [np.ptp(v), 1 / np.std(u), 1 / np.ptp(u), 1.0, v.min() + np.ptp(v) / 2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(dyn.massive_dynamics, u, v, p0=p0, method="trf", maxfev=5000,
                             bounds=([-np.inf, 0, 1e-12, 1e-12, -np.inf], [np.inf] * 5))
    except RuntimeError:
        return -np.inf
    r = v - dyn.massive_dynamics(u, *p)
    return 1 - np.sum(r**2) / np.sum((v - v.mean()) ** 2)


def test_multistart_on_real_tiny_runs_is_never_worse_and_reports_r2_honestly():
    series = layers()
    assert len(series) == 8 and all(len(a) == 41 for a in series.values())
    multi, single = {}, {}
    for name, a in series.items():
        t, y = a[:, 0], a[:, 1]
        fit = dyn.fit_massive_dynamics(t, y)
        resid = y - dyn.massive_dynamics(t, **fit.params)
        assert fit.r2 == pytest.approx(1 - np.sum(resid**2) / np.sum((y - y.mean()) ** 2), abs=1e-9), name
        assert ("poor_fit" in fit.flags) == (fit.r2 < dyn.POOR_R2), name
        multi[name], single[name] = fit.r2, paper_start_r2(t, y)
        assert multi[name] >= single[name] - 1e-6, name
    # measured on these layers (lr=1e-2/0, /1, 1e-3/0, /1, 3e-2/0, /1, 3e-3/0, /1): the multi-start
    # 0.961, 0.979, 0.662, 0.937, 0.900, 0.939, 0.757, 0.946, so 0.93 on 5 of 8 and not the issue's
    # 7 of 8 (docs/methods.md §4.2: one Eq. 9 curve has one extremum, the low-LR layers have two);
    # the paper's start alone 0 of 8 (best 0.908; one raises maxfev)
    assert sum(r >= 0.93 for r in multi.values()) >= 5 and sum(r >= 0.93 for r in single.values()) == 0
    assert sum(r >= 0.89 for r in multi.values()) >= 6 and min(multi.values()) > 0.6


@pytest.mark.slow  # 8 fits, about 35 s of a 2-core CPU shared with other jobs
def test_multistart_meets_the_goal_where_the_ratio_grows_past_its_initial_value():
    # qk-layernorm, LR 1e-2 ... 0.3: the runs of the demo's grid that train stably at high LR
    series = layers("massive_ratio_tiny_high_lr.json")
    old = layers()
    assert len(series) == 8 and all(len(a) == 41 for a in series.values())
    assert all(np.array_equal(a[:, 0], old["lr=1e-2/0"][:, 0]) for a in series.values())  # the same 41 steps
    # the premise: every series ends far above its step-0 value (at least 1.4x; the ranges are 5-140),
    # unlike layer 0 of the old data's two low LRs, which settle back near it (docs/methods.md §4.2)
    assert all(a[-1, 1] > 1.4 * a[0, 1] for a in series.values())
    assert sum(a[-1, 1] > 1.4 * a[0, 1] for a in old.values()) <= 6
    r2 = {}
    for name, a in series.items():
        t, y = a[:, 0], a[:, 1]
        fit = dyn.fit_massive_dynamics(t, y)
        resid = y - dyn.massive_dynamics(t, **fit.params)
        assert fit.r2 == pytest.approx(1 - np.sum(resid**2) / np.sum((y - y.mean()) ** 2), abs=1e-9), name
        assert ("poor_fit" in fit.flags) == (fit.r2 < dyn.POOR_R2) and "failed" not in fit.flags, name
        r2[name] = fit.r2
    # measured (lr=0.1/0, /1, 0.3/0, /1, 1e-2/0, /1, 3e-2/0, /1): 0.961, 0.971, 0.983, 0.995, 0.958,
    # 0.977, 0.968, 0.983: 0.93 on 8 of 8. Flagged: lr=0.1 both layers not_converged (the grid's best,
    # no TRF refinement converged within maxfev), lr=0.3/1 ill_conditioned; 5 of 8 are unflagged.
    assert sum(r >= 0.93 for r in r2.values()) >= 7 and min(r2.values()) > 0.9, r2


def test_multistart_escapes_the_local_optimum_of_the_paper_start():
    # a late peak seen only in log-spaced early checkpoints and a few late ones
    t = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 700, 800], float)
    truth = dict(A=-3.0, lam=0.8, gamma=0.02, t0=0.9, K=6.0)
    y = dyn.massive_dynamics(t, **truth)
    fit = dyn.fit_massive_dynamics(t, y)
    assert fit.r2 > 0.9999 and fit.n_starts == 1 + dyn.N_REFINE and fit.n_converged >= 1
    np.testing.assert_allclose(dyn.massive_dynamics(t, **fit.params), y, atol=1e-4 * np.ptp(y))


def test_a_fit_that_does_not_converge_is_recorded_not_raised():
    t = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256], float)
    y = dyn.massive_dynamics(t, 2.0, 0.5, 0.01, 1.0, 5.0)
    fit = dyn.fit_massive_dynamics(t, y, maxfev=1)
    assert "not_converged" in fit.flags and fit.n_converged == 0 and "maxfev=1" in fit.error
    assert np.isfinite(fit.r2) and "no refinement converged" in fit.warning()


def test_flags_ill_conditioned_and_boundary_fits():
    # pure logarithmic growth: lam = 0 sits on its bound
    t = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 800], float)
    fit = dyn.fit_massive_dynamics(t, 3.0 * np.log(0.05 * t + 1.0) + 2.0)
    assert fit.r2 > 0.999 and "at_bound" in fit.flags and fit.lam < 1e-6 and fit.t_peak > 1e6 * t.max()
    # a straight line has no curvature for 5 parameters: the optimum is a degenerate one
    line = dyn.fit_massive_dynamics(t, 1.0 + 0.01 * t)
    assert line.r2 > 0.999 and {"ill_conditioned", "at_bound"} & set(line.flags) and not line.ok
    assert dyn.fit_massive_dynamics(t, 1.0 + 0.01 * t).warning() is not None


@pytest.mark.parametrize("kind,truth", [
    ("relu", dict(c=1.5, alpha=0.4, b=-1.0, A0=0.07)),    # falls towards 7% (the paper's ReLU limits: 6-8%)
    ("silu", dict(c=0.02, alpha=0.5, A0=0.40)),           # rises towards 40% (SiLU: 38-41%)
])
def test_sparsing_law_recovers_planted_parameters(kind, truth, rng):
    tokens = np.geomspace(2e7, 4e10, 30)
    y = sl.LAWS[kind](tokens / 1e9, **truth)
    fit = sl.fit_sparsing_law(tokens, y, kind=kind)
    assert fit.kind == kind and fit.r2 > 0.99999 and fit.flags == () and fit.ok
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-5), name
    assert fit.A0 == fit.params["A0"]
    np.testing.assert_allclose(fit.predict(tokens), y, rtol=1e-6)
    noisy = sl.fit_sparsing_law(tokens, y + rng.normal(0, 0.002, y.shape), kind=kind)
    assert noisy.A0 == pytest.approx(truth["A0"], abs=0.01) and noisy.r2 > 0.95


def test_sparsing_law_closed_form_values_and_bad_input():
    assert sl.relu_law(1.0, c=2.0, alpha=0.5, b=0.0, A0=0.1) == pytest.approx(np.exp(-2.0) + 0.1)
    assert sl.silu_law(4.0, c=0.2, alpha=0.5, A0=0.4) == pytest.approx(0.4 - 0.2 / 2.0)
    with pytest.raises(ValueError, match="kind must be one of relu, silu"):
        sl.fit_sparsing_law([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], kind="gelu")
    with pytest.raises(ValueError, match="tokens must be > 0"):
        sl.fit_sparsing_law([0, 1, 2, 3, 4], [0.5, 0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="at least 5 finite"):
        sl.fit_sparsing_law([1, 2, 3, np.nan], [0.5, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match="constant"):
        sl.fit_sparsing_law([1, 2, 3, 4], [0.3] * 4, kind="silu")


def test_the_fit_table_records_flags_and_honest_r2(tmp_path):
    import pandas as pd

    from seismo.analysis import checkpoints as analyze
    from seismo.instrument import tables

    a = layers()["lr=1e-3/0"]  # the poorest layer: Eq. 9 cannot follow its dip, peak and fall
    rows = [{"step": s, "layer": 0, "metric": "ratio_seq_mean", "value": v} for s, v in a]
    (tmp_path / "analysis").mkdir()
    pd.DataFrame(rows, columns=list(tables.columns("massive"))).to_csv(tmp_path / "analysis" / "massive.csv",
                                                                       index=False)
    fit = pd.read_csv(analyze.fit_massive_dynamics_table(tmp_path))
    direct = dyn.fit_massive_dynamics(a[:, 0], a[:, 1])
    assert tuple(fit.columns) == analyze.FIT_COLUMNS and fit["r2"][0] == pytest.approx(direct.r2, abs=1e-9)
    assert "poor_fit" in fit["flags"][0].split(";") and fit["r2"][0] < 0.93
