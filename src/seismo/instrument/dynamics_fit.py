"""The five-parameter fit of massive-activation dynamics over training (host-side, scipy).

Gallego-Feliciano et al. 2025, "Hidden Dynamics of Massive Activations in Transformer
Training", arXiv 2508.03616, Eq. 9 (docs/methods.md §4.2; pitfall 0.1.1: not a log-normal):

    f(t) = A * exp(-lam * x_t) * log(x_t) + K,    x_t = gamma * t + t0

fitted to the per-layer top-1/median ratio r_l(t) over checkpoints (`ratio_seq_mean` of
`massive_activations`). As in the paper: `scipy.optimize.curve_fit` with the Trust Region
Reflective method, an analytic Jacobian, lam >= 0, on normalised data (parameters mapped
back afterwards), from A = range(y), K = min(y) + A/2, lam = 1/std(x), gamma = 1/range(x),
t0 = 1 (all on the normalised data). We also bound gamma > 0 and t0 > 0 so that x_t > 0 and
log(x_t) exists at every t >= 0. Setting df/dt = 0 gives lam * x * log(x) = 1, so the peak
is at x* = exp(W(1/lam)) (Lambert W), t_peak = (x* - t0) / gamma.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import curve_fit
from scipy.special import lambertw


def massive_dynamics(t: ArrayLike, A: float, lam: float, gamma: float, t0: float, K: float):
    """Eq. 9: A * exp(-lam * x) * log(x) + K with x = gamma * t + t0."""
    x = gamma * np.asarray(t, np.float64) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


def _jacobian(t, A, lam, gamma, t0, K):
    x = gamma * t + t0
    e = np.exp(-lam * x)
    log_x = np.log(x)
    d_dx = A * e * (1.0 / x - lam * log_x)
    return np.stack([e * log_x, -A * x * e * log_x, d_dx * t, d_dx, np.ones_like(t)], axis=-1)


def peak_time(A: float, lam: float, gamma: float, t0: float) -> float:
    """Step of the maximum of Eq. 9 (a minimum when A < 0): (exp(W(1/lam)) - t0) / gamma.

    inf when lam = 0 (pure log growth). A peak is seen in training only when it is > 0.
    `A` only decides peak versus trough; it is taken so the call mirrors the fit's output.
    """
    del A
    if lam <= 0:
        return float("inf")
    x_star = float(np.exp(lambertw(1.0 / lam).real))
    return float((x_star - t0) / gamma)


@dataclass(frozen=True)
class DynamicsFit:
    """Eq. 9 parameters in the original units (steps, ratio), the fit's R^2 and its peak."""

    A: float
    lam: float
    gamma: float
    t0: float
    K: float
    r2: float
    t_peak: float

    @property
    def params(self) -> dict[str, float]:
        """{A, lam, gamma, t0, K}: `massive_dynamics(t, **fit.params)` evaluates the fit."""
        d = asdict(self)
        return {k: d[k] for k in ("A", "lam", "gamma", "t0", "K")}


def fit_massive_dynamics(steps: ArrayLike, ratios: ArrayLike, maxfev: int = 20_000) -> DynamicsFit:
    """Fit Eq. 9 to one layer's ratio over training; steps >= 0, at least 6 finite points.

    Time is divided by max(steps) and the ratio min-max normalised before the fit; A and K
    are scaled back by the ratio's range (K also shifted by its minimum), gamma by max(steps);
    lam and t0 are unchanged by the normalisation. R^2 is on the original scale.
    """
    t = np.asarray(steps, np.float64).ravel()
    y = np.asarray(ratios, np.float64).ravel()
    if t.shape != y.shape:
        raise ValueError(f"steps and ratios differ in length: {t.size} vs {y.size}")
    keep = np.isfinite(t) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if t.size < 6:
        raise ValueError(
            f"need at least 6 finite (step, ratio) points for 5 parameters, got {t.size}"
        )
    if t.min() < 0:
        raise ValueError(f"steps must be >= 0, got {t.min()}")
    t_scale = t.max() if t.max() > 0 else 1.0
    y_min, y_range = y.min(), np.ptp(y)
    if y_range == 0:
        raise ValueError("the ratio is constant over the given steps: nothing to fit")
    u, v = t / t_scale, (y - y_min) / y_range

    a0 = np.ptp(v)
    p0 = [a0, 1.0 / np.std(u), 1.0 / np.ptp(u), 1.0, v.min() + a0 / 2]
    tiny = 1e-12
    bounds = ([-np.inf, 0.0, tiny, tiny, -np.inf], [np.inf, np.inf, np.inf, np.inf, np.inf])
    popt, _ = curve_fit(
        massive_dynamics, u, v, p0=p0, bounds=bounds, method="trf", jac=_jacobian, maxfev=maxfev
    )
    a_n, lam, gamma_n, t0, k_n = (float(q) for q in popt)
    A, gamma, K = float(a_n * y_range), float(gamma_n / t_scale), float(k_n * y_range + y_min)
    resid = y - massive_dynamics(t, A, lam, gamma, t0, K)
    r2 = 1.0 - float(np.sum(resid**2)) / float(np.sum((y - y.mean()) ** 2))
    return DynamicsFit(A, lam, gamma, t0, K, r2, peak_time(A, lam, gamma, t0))
