"""The Sparsing-Law fits: activation ratio against training tokens (host-side, scipy).

Luo et al. 2024, "Sparsing Law: Towards Large Language Models with Greater Activation
Sparsity", arXiv 2411.02335, Eqs. 4 and 5 and Table 2 (docs/methods.md §5.2). With D the
number of training tokens in billions, the activation ratio (1 - sparsity, e.g. CETT's
`cett_activation_ratio`, or `activation_ratio` of `instrument.sparsity`) follows

    ReLU-like:  A(D) = exp(-c * D**alpha + b) + A0      (falls towards A0)
    SiLU-like:  A(D) = -c / D**alpha + A0               (rises towards A0)

with c, alpha > 0; A0 is the limit activation ratio, the number the paper reads off
(Table 2: about 6-8% for ReLU, 38-41% for SiLU). The paper fits with Levenberg-Marquardt.

Here (ours): the same Levenberg-Marquardt (`scipy.optimize.least_squares(method="lm")`), in
log c and log alpha so that both stay positive, on D / max(D) and the min-max scaled ratio
(parameters mapped back). Multi-start: for fixed (c, alpha) the ReLU law is linear in
exp(b) and A0, and for fixed alpha the SiLU law is linear in c and A0, so a log-spaced grid
of the nonlinear parameters is solved exactly by linear least squares, and the best grid
points by residual are refined; the smallest residual wins. Flags as in
`instrument.dynamics_fit`: `failed`, `not_converged`, `ill_conditioned` (a singular
Jacobian: e.g. no curvature yet, so A0 is not pinned down), `poor_fit` (R^2 < 0.9).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

TOKENS_UNIT = 1e9  # D is in billions of tokens, as in the paper
KINDS = ("relu", "silu")
PARAMS = {"relu": ("c", "alpha", "b", "A0"), "silu": ("c", "alpha", "A0")}
POOR_R2 = 0.9
FLAGS = ("failed", "not_converged", "ill_conditioned", "poor_fit")
GRID_ALPHA = np.logspace(-2, 1, 25)
GRID_C = np.logspace(-3, 3, 25)  # ReLU only (normalised D)
N_REFINE = 8
_COND = 1e12


def relu_law(D: ArrayLike, c: float, alpha: float, b: float, A0: float) -> np.ndarray:
    """Eq. 4: exp(-c * D**alpha + b) + A0."""
    return np.exp(-c * np.asarray(D, np.float64) ** alpha + b) + A0


def silu_law(D: ArrayLike, c: float, alpha: float, A0: float) -> np.ndarray:
    """Eq. 5: -c / D**alpha + A0."""
    return -c / np.asarray(D, np.float64) ** alpha + A0


LAWS = {"relu": relu_law, "silu": silu_law}


@dataclass(frozen=True)
class SparsingLawFit:
    """A fitted Sparsing law. `params` in the paper's units (D in billions of tokens, the
    ratio as given); `A0` the limit activation ratio; `r2` on the data as given; `flags` (of
    FLAGS) say how far to trust it."""

    kind: str
    params: dict[str, float] = field(default_factory=dict)
    A0: float = float("nan")
    r2: float = float("nan")
    flags: tuple[str, ...] = ()
    n_starts: int = 0
    n_converged: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not {"failed", "ill_conditioned", "poor_fit"} & set(self.flags)

    def predict(self, tokens: ArrayLike) -> np.ndarray:
        """The fitted activation ratio at `tokens` training tokens (not billions)."""
        return LAWS[self.kind](np.asarray(tokens, np.float64) / TOKENS_UNIT, **self.params)


def _basis(kind: str, d: np.ndarray):
    """(nonlinear parameter rows, basis g with the law = w * g + A0 for a linear weight w)."""
    if kind == "relu":
        c, a = (g.ravel() for g in np.meshgrid(GRID_C, GRID_ALPHA, indexing="ij"))
        return np.stack([c, a], 1), np.exp(-c[:, None] * d[None, :] ** a[:, None])
    a = GRID_ALPHA
    return a[:, None], -(d[None, :] ** -a[:, None])


def _grid_starts(kind: str, d: np.ndarray, v: np.ndarray, n_best: int) -> list[np.ndarray]:
    """Starting points (log c, log alpha, [b,] A0) of the best grid points by residual."""
    rows, g = _basis(kind, d)
    with np.errstate(all="ignore"):
        gc = g - g.mean(axis=1, keepdims=True)
        vc = v - v.mean()
        var = np.sum(gc * gc, axis=1)
        w = np.where(var > 0, (gc @ vc) / np.where(var > 0, var, 1.0), np.nan)
        a0 = v.mean() - w * g.mean(axis=1)
        sse = np.sum((v[None, :] - w[:, None] * g - a0[:, None]) ** 2, axis=1)
    sse = np.where(np.isfinite(sse) & (w > 0), sse, np.inf)  # w = exp(b) or c: positive
    out = []
    for i in np.argsort(sse, kind="stable")[:n_best]:
        if not np.isfinite(sse[i]):
            break
        if kind == "relu":
            out.append(np.array([np.log(rows[i, 0]), np.log(rows[i, 1]), np.log(w[i]), a0[i]]))
        else:
            out.append(np.array([np.log(w[i]), np.log(rows[i, 0]), a0[i]]))
    return out


def _law_internal(kind: str, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    if kind == "relu":
        return relu_law(d, np.exp(q[0]), np.exp(q[1]), q[2], q[3])
    return silu_law(d, np.exp(q[0]), np.exp(q[1]), q[2])


def _jac_internal(kind: str, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    c, a = np.exp(q[0]), np.exp(q[1])
    p = d**a
    if kind == "relu":
        e = np.exp(-c * p + q[2])
        return np.stack([-c * p * e, -c * p * np.log(d) * a * e, e, np.ones_like(d)], axis=-1)
    return np.stack([-c / p, c * np.log(d) * a / p, np.ones_like(d)], axis=-1)


def fit_sparsing_law(tokens: ArrayLike, activation_ratio: ArrayLike,
                     kind: Literal["relu", "silu"] = "relu") -> SparsingLawFit:
    """Fit Eq. 4 (`kind="relu"`) or Eq. 5 (`kind="silu"`) of Luo et al. 2024 to the activation
    ratio against training tokens (counts, > 0; converted to billions). Needs one more finite
    point than the law has parameters. Bad input raises ValueError; a fit that does not
    converge is returned with its flags, never raised."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    x = np.asarray(tokens, np.float64).ravel()
    y = np.asarray(activation_ratio, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"tokens and activation_ratio differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    names = PARAMS[kind]
    if x.size < len(names) + 1:
        raise ValueError(f"need at least {len(names) + 1} finite (tokens, ratio) points for the "
                         f"{len(names)} parameters of the {kind} law, got {x.size}")
    if x.min() <= 0:
        raise ValueError(f"tokens must be > 0 (the law is in D**alpha), got {x.min()}")
    y_min, y_range = y.min(), np.ptp(y)
    if y_range == 0 or np.ptp(x) == 0:
        raise ValueError("the activation ratio or the token counts are constant: nothing to fit")
    D = x / TOKENS_UNIT
    d_scale = D.max()
    d, v = D / d_scale, (y - y_min) / y_range

    def sse(q) -> float:
        with np.errstate(all="ignore"):
            s = float(np.sum((_law_internal(kind, d, q) - v) ** 2))
        return s if np.isfinite(s) else np.inf

    starts = _grid_starts(kind, d, v, N_REFINE)
    found, errors, n_converged = [], [], 0
    for q0 in starts:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                r = least_squares(lambda q: _law_internal(kind, d, q) - v, q0,
                                  jac=lambda q: _jac_internal(kind, d, q), method="lm", max_nfev=2000)
        except ValueError as e:
            errors.append(str(e).splitlines()[0][:200])
            continue
        n_converged += r.status > 0
        if r.status > 0 and np.isfinite(sse(r.x)):
            found.append((sse(r.x), r.x))
    flags: set[str] = set()
    if found:
        q = min(found, key=lambda f: f[0])[1]
    elif starts:
        q, flags = starts[0], {"not_converged"}
    else:
        return SparsingLawFit(kind, {n: float("nan") for n in names}, flags=("failed",),
                              error=errors[0] if errors else "no grid point gave a positive, finite fit")
    with np.errstate(all="ignore"):
        sv = np.linalg.svd(_jac_internal(kind, d, q), compute_uv=False)
    if not (np.all(np.isfinite(sv)) and sv[-1] > 0 and sv[0] / sv[-1] < _COND):
        flags.add("ill_conditioned")
    c_n, alpha = float(np.exp(q[0])), float(np.exp(q[1]))
    if kind == "relu":  # exp(-c_n (D/s)^a + b_n) * range + min
        params = {"c": float(c_n / d_scale**alpha), "alpha": alpha, "b": float(q[2] + np.log(y_range)),
                  "A0": float(q[3] * y_range + y_min)}
    else:  # -(c_n (D/s)^-a) * range + (A0_n * range + min)
        params = {"c": float(c_n * y_range * d_scale**alpha), "alpha": alpha, "A0": float(q[2] * y_range + y_min)}
    with np.errstate(all="ignore"):
        resid = y - LAWS[kind](D, **params)
    r2 = 1.0 - float(np.sum(resid**2)) / float(np.sum((y - y.mean()) ** 2))
    if not r2 >= POOR_R2:
        flags.add("poor_fit")
    return SparsingLawFit(kind, params, params["A0"], r2, tuple(f for f in FLAGS if f in flags),
                          len(starts), int(n_converged), "" if found else "; ".join(dict.fromkeys(errors))[:200])
