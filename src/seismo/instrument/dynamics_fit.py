"""The five-parameter fit of massive-activation dynamics over training (host-side, scipy).

Gallego-Feliciano et al. 2025, "Hidden Dynamics of Massive Activations in Transformer
Training", arXiv 2508.03616, Eq. 9 (docs/methods.md §4.2; pitfall 0.1.1: not a log-normal):

    f(t) = A * exp(-lam * x_t) * log(x_t) + K,    x_t = gamma * t + t0

fitted to the per-layer top-1/median ratio r_l(t) over checkpoints (`ratio_seq_mean` of
`massive_activations`). As in the paper: `scipy.optimize.curve_fit` with the Trust Region
Reflective method, an analytic Jacobian, lam >= 0, on normalised data (parameters mapped
back afterwards), and the paper's start A = range(y), K = min(y) + A/2, lam = 1/std(x),
gamma = 1/range(x), t0 = 1 (all on the normalised data). We also bound gamma > 0 and t0 > 0
so that x_t > 0 and log(x_t) exists at every t >= 0. Setting df/dt = 0 gives
lam * x * log(x) = 1, so the peak is at x* = exp(W(1/lam)) (Lambert W),
t_peak = (x* - t0) / gamma.

Multi-start (ours; docs/methods.md §4.2): one start stops in a local optimum on short runs.
f is linear in A and K, so for each point of a log-spaced grid over (lam, gamma, t0) A and K
are solved by linear least squares (variable projection); the best few grid points by
residual and the paper's start are each refined by the TRF fit above, and the fit with the
smallest residual wins (among fits within 1% of it, a well-conditioned one before an
ill-conditioned one). The result carries flags: `ill_conditioned` (a huge amplitude, the
A-lam-t0 trade-off of an exponential tail, or a singular Jacobian), `at_bound` (lam = 0, or
gamma or t0 at their lower bound), `poor_fit` (R^2 below 0.93, the lowest of the paper's
Table 1), `not_converged` (no refinement converged: the best grid point is returned) and
`failed` (nothing finite). R^2 is that of the returned parameters on the original scale,
whatever it is; a fit that fails is returned with NaN parameters and the reason, not raised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares
from scipy.special import lambertw

POOR_R2 = 0.93  # the lowest per-model mean R^2 of the paper's Table 1 (Pythia-14M, .931)
FLAGS = ("failed", "not_converged", "ill_conditioned", "at_bound", "poor_fit")

# the multi-start grid, on t / max(t) and the min-max scaled ratio (x = gamma * u + t0)
GRID_LAM = np.concatenate([[0.0], np.logspace(-3, 1.5, 10)])
GRID_GAMMA = np.logspace(-1, 4, 11)
GRID_T0 = np.logspace(-2, 1.5, 8)
N_REFINE = 12  # the best grid points by residual that are refined by the TRF fit
FIRST_NFEV = 300  # each start's first budget of function evaluations
N_CONTINUE = 3  # the starts (best residual first) whose refinement continues up to maxfev
_TINY = 1e-12  # lower bound of gamma and t0 (normalised)
_HUGE_A = 1e6  # bound on |A| in units of the ratio's range; a tenth of it flags the exponential tail trade-off
_COND = 1e12  # Jacobian condition number above this: ill-conditioned


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
    if not lam > 0:
        return float("inf") if lam == 0 else float("nan")
    x_star = float(np.exp(lambertw(1.0 / lam).real))
    return float((x_star - t0) / gamma)


@dataclass(frozen=True)
class DynamicsFit:
    """Eq. 9 parameters in the original units (steps, ratio), the fit's R^2 and its peak;
    `flags` (of FLAGS) say how far to trust it, `n_starts` / `n_converged` how many
    refinements were tried and converged, `error` why a fit failed."""

    A: float
    lam: float
    gamma: float
    t0: float
    K: float
    r2: float
    t_peak: float
    flags: tuple[str, ...] = ()
    n_starts: int = 1
    n_converged: int = 1
    error: str = ""

    @property
    def params(self) -> dict[str, float]:
        """{A, lam, gamma, t0, K}: `massive_dynamics(t, **fit.params)` evaluates the fit."""
        return {"A": self.A, "lam": self.lam, "gamma": self.gamma, "t0": self.t0, "K": self.K}

    @property
    def ok(self) -> bool:
        """True when the fit has parameters worth reading: not failed, not ill-conditioned,
        R^2 >= POOR_R2."""
        return not {"failed", "ill_conditioned", "poor_fit"} & set(self.flags)

    def warning(self) -> str | None:
        """One sentence on what is wrong with the fit, or None when nothing is flagged."""
        notes = {
            "failed": f"the fit failed ({self.error})",
            "not_converged": "no refinement converged (the best grid point is shown)",
            "ill_conditioned": "the parameters are ill-conditioned (trade off against each other)",
            "at_bound": "a parameter sits on its bound (lam = 0 is pure log growth)",
            "poor_fit": f"R^2 = {self.r2:.3f} is below {POOR_R2}",
        }
        said = [notes[f] for f in FLAGS if f in self.flags]
        return "; ".join(said) if said else None


def _grid_starts(u: np.ndarray, v: np.ndarray, n_best: int) -> list[tuple[float, ...]]:
    """(A, lam, gamma, t0, K) of the `n_best` grid points with the smallest residual, A and K
    solved exactly for each (lam, gamma, t0)."""
    lam, gamma, t0 = (g.ravel() for g in np.meshgrid(GRID_LAM, GRID_GAMMA, GRID_T0, indexing="ij"))
    x = gamma[:, None] * u[None, :] + t0[:, None]
    with np.errstate(all="ignore"):
        g = np.exp(-lam[:, None] * x) * np.log(x)
        gc = g - g.mean(axis=1, keepdims=True)
        vc = v - v.mean()
        var = np.sum(gc * gc, axis=1)
        cov = gc @ vc
        a = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
        k = v.mean() - a * g.mean(axis=1)
        sse = np.sum(vc * vc) - a * cov
    sse = np.where(np.isfinite(sse) & np.isfinite(a), sse, np.inf)
    order = np.argsort(sse, kind="stable")[:n_best]
    return [(a[i], lam[i], gamma[i], t0[i], k[i]) for i in order if np.isfinite(sse[i])]


def _flags(u: np.ndarray, p: np.ndarray) -> set[str]:
    a_n, lam, gamma_n, t0, _ = p
    out = set()
    with np.errstate(all="ignore"):
        sv = np.linalg.svd(_jacobian(u, *p), compute_uv=False)
    cond = sv[0] / sv[-1] if sv[-1] > 0 else np.inf
    if abs(a_n) >= _HUGE_A / 10 or not np.isfinite(cond) or cond > _COND:
        out.add("ill_conditioned")
    if lam <= 1e-9 or gamma_n <= 10 * _TINY or t0 <= 10 * _TINY:
        out.add("at_bound")
    return out


def fit_massive_dynamics(steps: ArrayLike, ratios: ArrayLike, maxfev: int = 5_000,
                         n_refine: int = N_REFINE) -> DynamicsFit:
    """Fit Eq. 9 to one layer's ratio over training; steps >= 0, at least 6 finite points.

    Time is divided by max(steps) and the ratio min-max normalised before the fit; A and K
    are scaled back by the ratio's range (K also shifted by its minimum), gamma by max(steps);
    lam and t0 are unchanged by the normalisation. R^2 is on the original scale. The paper's
    start and the `n_refine` best points of the grid (module docstring) are each refined
    (at most `maxfev` evaluations each) and the smallest residual wins. Bad input (lengths,
    too few points, a constant ratio) raises ValueError; a fit that does not converge is
    returned, flagged, never raised.
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
    paper = (a0, 1.0 / np.std(u), 1.0 / np.ptp(u) if np.ptp(u) > 0 else 1.0, 1.0, v.min() + a0 / 2)
    grid = _grid_starts(u, v, n_refine)
    bounds = ([-_HUGE_A, 0.0, _TINY, _TINY, -np.inf], [_HUGE_A, np.inf, np.inf, np.inf, np.inf])

    def sse(p) -> float:
        with np.errstate(all="ignore"):
            r = v - massive_dynamics(u, *p)
        s = float(np.sum(r * r))
        return s if np.isfinite(s) else np.inf

    def refine(p0: np.ndarray, budget: int):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return least_squares(lambda p: massive_dynamics(u, *p) - v, p0, jac=lambda p: _jacobian(u, *p),
                                 bounds=bounds, method="trf", max_nfev=budget)

    # every start gets a short budget; the best few by residual then get the whole of maxfev
    lower = np.array([-_HUGE_A / 2, 0.0, 2 * _TINY, 2 * _TINY, -np.inf])
    upper = np.array([_HUGE_A / 2, np.inf, np.inf, np.inf, np.inf])
    trials, errors = [], []
    for p0 in [paper, *grid]:
        try:
            trials.append(refine(np.clip(np.asarray(p0, np.float64), lower, upper), min(FIRST_NFEV, maxfev)))
        except ValueError as e:  # a start where the residual is not finite
            errors.append(str(e).splitlines()[0][:200])
    trials.sort(key=lambda r: sse(r.x))
    for i, r in enumerate(trials[:N_CONTINUE]):
        if r.status == 0 and maxfev > FIRST_NFEV:
            trials[i] = refine(r.x, maxfev - r.nfev)
    found = [(sse(r.x), r.x, _flags(u, r.x)) for r in trials if r.status > 0 and np.isfinite(sse(r.x))]
    if not found and trials:
        errors.append(f"no start converged within maxfev={maxfev} function evaluations")
    n_starts, n_converged = 1 + len(grid), len(found)
    flags: set[str] = set()
    if not found:  # nothing refined: fall back to the grid's best (exact A, K), if any
        if grid and np.isfinite(sse(grid[0])):
            best = np.asarray(grid[0], np.float64)
            flags = {"not_converged"} | _flags(u, best)
        else:
            nan = float("nan")
            return DynamicsFit(nan, nan, nan, nan, nan, nan, nan, ("failed",), n_starts, 0,
                               errors[0] if errors else "no start gave a finite residual")
    else:
        found.sort(key=lambda f: f[0])
        near = [f for f in found if f[0] <= found[0][0] * 1.01 + 1e-15]
        s_best, best, flags = next((f for f in near if "ill_conditioned" not in f[2]), near[0])
    a_n, lam, gamma_n, t0, k_n = (float(q) for q in best)
    A, gamma, K = float(a_n * y_range), float(gamma_n / t_scale), float(k_n * y_range + y_min)
    with np.errstate(all="ignore"):
        resid = y - massive_dynamics(t, A, lam, gamma, t0, K)
    r2 = 1.0 - float(np.sum(resid**2)) / float(np.sum((y - y.mean()) ** 2))
    if not r2 >= POOR_R2:
        flags.add("poor_fit")
    ordered = tuple(f for f in FLAGS if f in flags)
    return DynamicsFit(A, lam, gamma, t0, K, r2, peak_time(A, lam, gamma, t0), ordered,
                       n_starts, n_converged, "; ".join(dict.fromkeys(errors))[:200] if not found else "")
