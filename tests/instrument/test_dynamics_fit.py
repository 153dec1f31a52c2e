"""seismo.instrument.dynamics_fit: the Hidden Dynamics Eq. 9 fit on planted curves."""

from __future__ import annotations

import numpy as np
import pytest

from seismo.instrument import dynamics_fit as dyn

# Pythia-like checkpoint steps: log-spaced 1..512, then every 1000 up to 143k (docs/methods.md §4.1).
STEPS = np.concatenate([[0], 2.0 ** np.arange(10), np.arange(1000, 143_001, 1000)])


def test_peak_time_golden_value():
    got = dyn.peak_time(2.0, 0.5, 1e-4, 1.0)
    assert got == pytest.approx(13457.5, abs=0.05), (
        "docs/methods.md §9.6: (exp(W(2)) - 1) / 1e-4 = 13457.5; the Lambert-W peak formula changed"
    )


def test_peak_time_is_the_argmax_of_the_curve():
    t = np.linspace(0, 60_000, 600_001)
    f = dyn.massive_dynamics(t, 2.0, 0.5, 1e-4, 1.0, 3.0)
    assert t[np.argmax(f)] == pytest.approx(dyn.peak_time(2.0, 0.5, 1e-4, 1.0), abs=0.2)
    assert dyn.peak_time(2.0, 0.0, 1e-4, 1.0) == np.inf


@pytest.mark.parametrize(
    "params",
    [
        dict(A=2.0, lam=0.5, gamma=1e-4, t0=1.0, K=5.0),  # early peak at step 13457
        dict(A=30.0, lam=0.05, gamma=5e-5, t0=1.5, K=10.0),  # peak after training: log-like rise
        dict(A=50.0, lam=1.0, gamma=2e-4, t0=0.5, K=20.0),
    ],
)
def test_fit_recovers_planted_parameters(params):
    y = dyn.massive_dynamics(STEPS, **params)
    fit = dyn.fit_massive_dynamics(STEPS, y)
    assert fit.r2 > 0.9999
    for name, value in params.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-4), name
    assert fit.t_peak == pytest.approx(
        dyn.peak_time(**{k: params[k] for k in ("A", "lam", "gamma", "t0")}), rel=1e-4
    )


def test_fit_with_noise_keeps_r2_and_peak(rng):
    params = dict(A=2.0, lam=0.5, gamma=1e-4, t0=1.0, K=5.0)
    y = dyn.massive_dynamics(STEPS, **params)
    noisy = y + rng.normal(0.0, 0.01 * np.ptp(y), y.shape)
    fit = dyn.fit_massive_dynamics(STEPS, noisy)
    assert fit.r2 > 0.99
    assert fit.t_peak == pytest.approx(13457.5, rel=0.05)
    np.testing.assert_allclose(dyn.massive_dynamics(STEPS, **fit.params), y, atol=0.03 * np.ptp(y))


def test_fit_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 6 finite"):
        dyn.fit_massive_dynamics([0, 1, 2], [1.0, 2.0, np.nan])
    with pytest.raises(ValueError, match="constant"):
        dyn.fit_massive_dynamics(np.arange(10), np.ones(10))
    with pytest.raises(ValueError, match="differ in length"):
        dyn.fit_massive_dynamics(np.arange(10), np.ones(9))
