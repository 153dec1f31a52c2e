"""Seeing instability coming: extrapolate the layer-0 max attention logit (Wortsman et al. 2023,
arXiv 2309.14322, §3.1 and Fig. 9).

In the paper's sweep every run whose layer-0 max attention logit exceeded 1e4 diverged. At
each LR they fit a quadratic of max logit against the number of parameters at step 2e3 and
predicted, correctly, that a 4.8B model at LR 1e-2 without qk-layernorm would diverge.

Fit choice (ours): a quadratic in log-log space, log10(logit) = c0 + c1·x + c2·x² with
x = log10(N). Why not a quadratic in N itself: the sizes span orders of magnitude, so in
linear N the largest model alone sets the curvature and a downward parabola can predict a
negative logit; logits also grow multiplicatively (the paper's Fig. 9 has log axes). In log
space the fit is scale-free, its predictions stay positive, and with two sizes it reduces to
a power law. `space="linear"` gives the literal quadratic in N for comparison.

`logit_trend_warning` is the in-run rule on a whole probe history (the trainer runs the same
rule row by row, `seismo.instrument.trend.LogitTrend`): it warns when the recent exponential
trend of the logit crosses the threshold before the run ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from seismo.instrument.trend import DIVERGENCE_LOGIT


def _fit(n: np.ndarray, logit: np.ndarray, space: str) -> np.ndarray:
    x = np.log10(n) if space == "loglog" else n
    y = np.log10(logit) if space == "loglog" else logit
    degree = min(2, len(np.unique(x)) - 1)
    return np.polyfit(x, y, degree)


def _predict(coefs: np.ndarray, n: np.ndarray | float, space: str) -> np.ndarray:
    x = np.log10(n) if space == "loglog" else np.asarray(n, dtype=float)
    y = np.polyval(coefs, x)
    return 10.0 ** y if space == "loglog" else y


def extrapolate_logits(
    results: pd.DataFrame,
    step: int | None,
    target_params: float | Sequence[float],
    threshold: float = DIVERGENCE_LOGIT,
    *,
    lr_key: str = "optimizer.lr",
    group_by: Sequence[str] = (),
    params_key: str = "n_params",
    logit_key: str = "attn_logit_max_l0",
    step_key: str = "attn_logit_step",
    space: Literal["loglog", "linear"] = "loglog",
) -> pd.DataFrame:
    """Per LR (and per `group_by` group, e.g. model.qk_norm): fit max logit vs parameter count
    and extrapolate it to each of `target_params`.

    `results` is a results table (`collect_results`: one row per run, the logit read at
    `report.logit_step`). With `step` given, only runs whose logit was read at that step are
    fitted (a run that diverged earlier has none); `step=None` takes every row.

    Columns: the group keys, the LR, `n_sizes` (distinct parameter counts fitted), `degree`
    (2, or less with fewer sizes), `coefs` (highest power first, as numpy.polyfit), `rmse`
    (of the fit, in log10 units for loglog), `max_fitted_params`, `target_params`,
    `predicted_logit`, `crosses_threshold`, `threshold`. Groups with fewer than two sizes
    give a NaN prediction."""
    need = [lr_key, params_key, logit_key, *group_by]
    missing = [c for c in need if c not in results.columns]
    if missing:
        raise KeyError(f"extrapolate_logits: the results have no column(s) {missing}; columns: {list(results.columns)}")
    df = results.copy()
    if step is not None and step_key in df:
        df = df[np.isclose(df[step_key].astype(float), float(step))]
    df = df[np.isfinite(df[params_key].astype(float)) & np.isfinite(df[logit_key].astype(float))]
    if space == "loglog":
        df = df[(df[params_key] > 0) & (df[logit_key] > 0)]
    targets = np.atleast_1d(np.asarray(target_params, dtype=float))
    keys = [*group_by, lr_key]
    rows = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        per_size = g.groupby(params_key)[logit_key].mean()  # seeds: one value per size
        n, y = per_size.index.to_numpy(float), per_size.to_numpy(float)
        base = dict(zip(keys, key), n_sizes=len(n), max_fitted_params=float(n.max()) if len(n) else math.nan)
        if len(n) < 2:
            for t in targets:
                rows.append({**base, "degree": -1, "coefs": [], "rmse": math.nan, "target_params": t,
                             "predicted_logit": math.nan, "crosses_threshold": False, "threshold": threshold})
            continue
        coefs = _fit(n, y, space)
        fitted = np.log10(_predict(coefs, n, space)) if space == "loglog" else _predict(coefs, n, space)
        resid = fitted - (np.log10(y) if space == "loglog" else y)
        for t in targets:
            pred = float(_predict(coefs, t, space))
            rows.append({**base, "degree": len(coefs) - 1, "coefs": [float(c) for c in coefs],
                         "rmse": float(np.sqrt(np.mean(resid**2))), "target_params": float(t),
                         "predicted_logit": pred, "crosses_threshold": bool(pred > threshold),
                         "threshold": threshold})
    cols = [*keys, "n_sizes", "degree", "coefs", "rmse", "max_fitted_params", "target_params",
            "predicted_logit", "crosses_threshold", "threshold"]
    return pd.DataFrame(rows, columns=cols)


def fitted_curve(coefs: Sequence[float], n_grid: np.ndarray, space: str = "loglog") -> np.ndarray:
    """The fitted logit on a grid of parameter counts (for plotting)."""
    return _predict(np.asarray(coefs, dtype=float), n_grid, space)
