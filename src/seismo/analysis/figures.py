"""Figures of the small-scale proxies of Wortsman et al. 2023 (arXiv 2309.14322), for sweeps and runs.

Sweep figures take the results table of `collect_results` (one row per run) or its summary:
  lr_vs_loss            final loss vs LR, one colour per size, one line style per intervention (Fig. 1 left)
  sensitivity_vs_params LR sensitivity vs non-embedding parameters (Fig. 1 right)
  grad_rms              first-MLP gradient RMS vs size and vs LR, with AdamW's ε (Fig. 11)
  logit_extrapolation   layer-0 max logit vs size, the fit and its extrapolation (Fig. 9)
Run figures take `Run` objects (their metrics/probes tables) or a [step x layer] table:
  pair_traces           loss and layer-0 max attention logit vs step for a few runs (Fig. 2)
  logz_traces           loss and mean log Z vs step (output-logit divergence, Fig. 4)
  layer_traces          one line per layer of a probe metric
  layer_heatmap         step x layer heatmap of a probe metric or an analysis table
Every function returns a matplotlib Figure (built without pyplot, so no global state) and
saves it when given `path`. Colours are the Okabe-Ito palette (colour-blind safe); a diverged
run is an x drawn at its loss at init, the value LR sensitivity counts it as.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from seismo import rundir
from seismo.analysis.extrapolate import DIVERGENCE_LOGIT, fitted_curve
from seismo.analysis.sensitivity import clamp_losses
from seismo.config.sweepfile import format_value

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P")
SEED_KEY = "run.seed"


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:  # a local path or a URL on a store (seismo.rundir)
        rundir.save_figure(fig, path, dpi=130)
    return fig


def _figure(ncols: int = 1, width: float = 5.6, height: float = 4.0) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def format_params(n: float) -> str:
    """1.2e7 -> '12M'."""
    if not np.isfinite(n):
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def grid_columns(results: pd.DataFrame) -> list[str]:
    """The grid-key columns of a results table (they come before 'run')."""
    cols = list(results.columns)
    return cols[:cols.index("run")] if "run" in cols else [c for c in cols if "." in c]


def split_keys(results: pd.DataFrame, lr_key: str = "optimizer.lr",
               grid_keys: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(size keys, intervention keys) among the grid keys, the LR and the seed left out. A
    size key changes the non-embedding parameter count by more than 10% (model presets,
    width, depth); the rest (qk_norm, z_loss, warmup, ...) are interventions."""
    keys = [k for k in (grid_keys if grid_keys is not None else grid_columns(results)) if k not in (lr_key, SEED_KEY)]
    sizes = []
    n = results["n_params"] if "n_params" in results else pd.Series(np.nan, index=results.index)
    for k in keys:
        means = n.groupby(results[k].astype(str)).mean().dropna()
        if len(means) > 1 and means.max() > 1.1 * means.min():
            sizes.append(k)
        elif not len(means) and (k == "model" or k in ("model.d_model", "model.n_layers", "model.n_heads")):
            sizes.append(k)
    return sizes, [k for k in keys if k not in sizes]


def _label(keys: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in zip(keys, values))


def sequential_colours(n: int) -> list[Any]:
    """n ordered colours (LRs, layers) from viridis, stopping before its pale yellow end."""
    return [cm.viridis(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _legend(ax: Any, colours: Sequence[tuple[str, Any]], styles: Sequence[tuple[str, Any]] = (),
            outside: bool = False, **kwargs: Any) -> None:
    """A legend of colour entries (what the colour means) and line-style entries (grey)."""
    handles = [Line2D([], [], color=c, marker="o", ms=4, lw=1.5, label=lbl) for lbl, c in colours]
    handles += [Line2D([], [], color="0.35", ls=ls, lw=1.5, label=lbl) for lbl, ls in styles]
    handles += [h for h in ax.get_legend_handles_labels()[0]]  # reference lines (threshold, ε)
    where = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if outside else {}
    ax.legend(handles=handles, fontsize=7, frameon=False, **where, **kwargs)


def _groups(df: pd.DataFrame, keys: Sequence[str]) -> list[tuple[tuple, pd.DataFrame]]:
    if not keys:
        return [((), df)]
    return [(k if isinstance(k, tuple) else (k,), g) for k, g in df.groupby(list(keys), sort=True, dropna=False)]


def _size_order(results: pd.DataFrame, size_keys: Sequence[str]) -> list[tuple[tuple, str]]:
    """Size groups ordered by parameter count, each with a legend label."""
    out = []
    for key, g in _groups(results, size_keys):
        n = float(g["n_params"].mean()) if "n_params" in g else math.nan
        label = f"N={format_params(n)}" if np.isfinite(n) else ""
        if size_keys:
            label = f"{_label(size_keys, key)} ({label})" if label else _label(size_keys, key)
        out.append((key, label or "all runs", n))
    out.sort(key=lambda t: (not np.isfinite(t[2]), t[2]))
    return [(k, lbl) for k, lbl, _ in out]


def _select(df: pd.DataFrame, keys: Sequence[str], values: Sequence[Any]) -> pd.DataFrame:
    """Rows whose `keys` columns equal `values` (compared as text, so True == 'True')."""
    if not keys:
        return df
    return df[np.all([df[k].astype(str) == str(v) for k, v in zip(keys, values)], axis=0)]


def _started(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["status"] != "missing"] if "status" in results else results


def lr_vs_loss(results: pd.DataFrame, lr_key: str = "optimizer.lr", grid_keys: Sequence[str] | None = None,
               path: str | os.PathLike[str] | None = None) -> Figure:
    """Final eval loss vs peak LR (log x), one colour per size, one line style per
    intervention; an x marks a diverged run at its loss at init (Wortsman Fig. 1)."""
    df = _started(results)
    sizes, interventions = split_keys(df, lr_key, grid_keys)
    fig, (ax,) = _figure(width=6.4, height=4.4)
    order = _size_order(df, sizes)
    styles = {k: LINESTYLES[i % len(LINESTYLES)] for i, (k, _) in enumerate(_groups(df, interventions))}
    for ci, (size, size_label) in enumerate(order):
        colour = OKABE_ITO[ci % len(OKABE_ITO)]
        sub = _select(df, sizes, size)
        for ikey, g in _groups(sub, interventions):
            loss = clamp_losses(g["final_eval_loss"].where(~g["diverged"].astype(bool)), g["loss_at_init"])
            g = g.assign(_loss=loss, _div=g["diverged"].astype(bool))
            per_lr = g.groupby(lr_key).agg(loss=("_loss", "mean"), div=("_div", "any"),
                                           unfinished=("status", lambda s: bool((s == "unfinished").any())))
            per_lr = per_lr.sort_index()
            label = size_label + (f"; {_label(interventions, ikey)}" if interventions else "")
            ax.plot(per_lr.index, per_lr["loss"], ls=styles[ikey], color=colour, lw=1.6, label=label)
            ok = per_lr[~per_lr["div"] & ~per_lr["unfinished"]]
            ax.plot(ok.index, ok["loss"], ls="none", marker="o", ms=4.5, color=colour)
            un = per_lr[~per_lr["div"] & per_lr["unfinished"]]  # hollow: not finished yet
            ax.plot(un.index, un["loss"], ls="none", marker="o", ms=5, mfc="white", color=colour)
            dv = per_lr[per_lr["div"]]
            ax.plot(dv.index, dv["loss"], ls="none", marker="x", ms=8, mew=2, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title("Final loss vs learning rate (x: diverged, plotted at loss at init)")
    ax.grid(True, which="major", alpha=0.3)
    if len(order) > 1 or interventions:
        ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def _params_axis(ax: Any, n_params: Sequence[float]) -> None:
    """Log x for parameter counts; when they span less than a decade (one size, or an
    intervention that adds a few parameters) label the counts themselves, not log ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ax.set_xscale("log")
    n = np.unique(np.asarray(n_params, dtype=float))
    n = n[np.isfinite(n) & (n > 0)]
    if len(n) and n.max() / n.min() < 10:
        if n.max() / n.min() < 1.1:  # one size: a single tick, or the labels would overlap
            n = np.array([np.sqrt(n.min() * n.max())])
        ax.xaxis.set_major_locator(FixedLocator(n if len(n) <= 4 else n[[0, -1]]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_params(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = n.min() / 1.5, n.max() * 1.5
        ax.set_xlim(lo, hi)


def sensitivity_vs_params(summary: pd.DataFrame, results: pd.DataFrame | None = None,
                          lr_key: str = "optimizer.lr", grid_keys: Sequence[str] | None = None,
                          path: str | os.PathLike[str] | None = None) -> Figure:
    """LR sensitivity vs non-embedding parameter count (log x), one line per intervention
    (Wortsman Fig. 1 right). `results` (optional) tells size keys from interventions."""
    keys = [c for c in summary.columns if c not in ("lr_sensitivity", "best_lr", "best_loss", "n_lrs", "n_runs",
                                                    "n_diverged", "n_unfinished", "n_params")]
    if results is not None:
        _, interventions = split_keys(results, lr_key, grid_keys)
        interventions = [k for k in interventions if k in keys]
    else:
        interventions = [k for k in keys if k not in ("model", "model.d_model", "model.n_layers")]
    fig, (ax,) = _figure(width=5.6, height=4.2)
    for i, (ikey, g) in enumerate(_groups(summary, interventions)):
        g = g.sort_values("n_params")
        ax.plot(g["n_params"], g["lr_sensitivity"], marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % 4],
                color=OKABE_ITO[i % len(OKABE_ITO)], label=_label(interventions, ikey) or "all runs")
    _params_axis(ax, summary["n_params"])
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("LR sensitivity (nats/token)")
    ax.set_title("LR sensitivity vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def grad_rms(results: pd.DataFrame, lr_key: str = "optimizer.lr", eps: float | None = 1e-8,
             grid_keys: Sequence[str] | None = None, path: str | os.PathLike[str] | None = None) -> Figure:
    """Gradient RMS of block 0's first MLP kernel (mean over the last 500 steps) vs size (one
    line per LR) and vs LR (one line per size), log-log, with AdamW's ε (Wortsman Fig. 11).
    Interventions get line styles."""
    df = _started(results)
    df = df[np.isfinite(df["grad_rms_mlp0"].astype(float))]
    sizes, interventions = split_keys(df, lr_key, grid_keys)
    fig, (ax_n, ax_lr) = _figure(ncols=2, width=5.0, height=4.0)
    lrs = sorted(df[lr_key].unique())
    lr_colours = sequential_colours(len(lrs))
    order = _size_order(df, sizes)
    styles = []
    for j, (ikey, g) in enumerate(_groups(df, interventions)):
        ls = LINESTYLES[j % len(LINESTYLES)]
        styles.append((_label(interventions, ikey), ls))
        for lr, colour in zip(lrs, lr_colours):
            per_n = g[g[lr_key] == lr].groupby("n_params")["grad_rms_mlp0"].mean()
            ax_n.plot(per_n.index, per_n, marker="o", ms=3.5, ls=ls, color=colour)
        for i, (size, _) in enumerate(order):
            per_lr = _select(g, sizes, size).groupby(lr_key)["grad_rms_mlp0"].mean()
            ax_lr.plot(per_lr.index, per_lr, marker="o", ms=3.5, ls=ls, color=OKABE_ITO[i % len(OKABE_ITO)])
    for ax, xlabel in ((ax_n, "non-embedding parameters"), (ax_lr, "peak learning rate")):
        if eps:
            ax.axhline(eps, color="grey", ls=":", lw=1.2, label=f"AdamW ε = {eps:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("grad RMS, block 0 first MLP kernel")
        ax.grid(True, which="major", alpha=0.3)
    _params_axis(ax_n, df["n_params"])
    _legend(ax_n, [(f"LR={lr:g}", c) for lr, c in zip(lrs, lr_colours)], styles if interventions else ())
    _legend(ax_lr, [(lbl, OKABE_ITO[i % len(OKABE_ITO)]) for i, (_, lbl) in enumerate(order)],
            styles if interventions else ())
    ax_n.set_title("Gradient RMS vs model size")
    ax_lr.set_title("Gradient RMS vs learning rate")
    return _save(fig, path)


def logit_extrapolation(results: pd.DataFrame, fits: pd.DataFrame, lr_key: str = "optimizer.lr",
                        threshold: float = DIVERGENCE_LOGIT, space: str = "loglog",
                        path: str | os.PathLike[str] | None = None) -> Figure:
    """Layer-0 max attention logit vs parameters per LR (points), the fitted quadratic and its
    extrapolation to the target sizes (stars), and the divergence threshold (Wortsman Fig. 9).
    `fits` is the table of `extrapolate_logits`; its group keys get line styles."""
    group_keys = [c for c in fits.columns[:list(fits.columns).index("n_sizes")] if c != lr_key]
    fig, (ax,) = _figure(width=7.2, height=4.4)
    lrs = sorted(fits[lr_key].unique())
    colours = dict(zip(lrs, sequential_colours(len(lrs))))
    styles: dict[tuple, Any] = {}
    for key, g in fits.groupby([*group_keys, lr_key], sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        colour, ls = colours[key[-1]], styles.setdefault(key[:-1], LINESTYLES[len(styles) % len(LINESTYLES)])
        pts = _select(results[results[lr_key] == key[-1]], group_keys, key[:-1])
        ax.plot(pts["n_params"], pts["attn_logit_max_l0"], "o", ms=4.5, color=colour)
        row = g.iloc[0]
        if row["degree"] < 0:
            continue
        lo, top = float(pts["n_params"].min()), float(row["max_fitted_params"])
        hi = max(float(g["target_params"].max()), top)
        inside, beyond = np.geomspace(lo, top, 50), np.geomspace(top, hi, 50)
        ax.plot(inside, fitted_curve(row["coefs"], inside, space), ls=ls, color=colour, lw=1.5)
        ax.plot(beyond, fitted_curve(row["coefs"], beyond, space), ls=ls, color=colour, lw=1.0, alpha=0.6)
        ax.plot(g["target_params"], g["predicted_logit"], "*", ms=12, color=colour, mec="black", mew=0.5)
    if len(results):
        ax.axvline(float(results["n_params"].max()), color="0.6", lw=0.8)  # right of it: extrapolated
    ax.axhline(threshold, color="black", ls=":", lw=1.2, label=f"divergence threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters (grey line: largest trained model)")
    ax.set_ylabel("layer-0 max attention logit")
    ax.set_title("Max attention logit vs size: fit and extrapolation (stars)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, [(f"LR={lr:g}", c) for lr, c in colours.items()],
            [(_label(group_keys, k), ls) for k, ls in styles.items()] if group_keys else (), outside=True)
    return _save(fig, path)


# --------------------------------------------------------------------------- runs over steps


def _run_label(name: str, run: Any) -> str:
    return name + (" (diverged)" if getattr(run, "diverged", False) else "")


def pair_traces(runs: Mapping[str, Any], threshold: float = DIVERGENCE_LOGIT,
                path: str | os.PathLike[str] | None = None) -> Figure:
    """Loss (left) and layer-0 max attention logit (right, log y) vs step for a few runs,
    e.g. a small and a large model with and without qk-layernorm (Wortsman Fig. 2)."""
    fig, (ax_loss, ax_logit) = _figure(ncols=2, width=5.2, height=4.0)
    for i, (name, run) in enumerate(runs.items()):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        label = _run_label(name, run)
        m = run.metrics
        if "loss" in m:
            ax_loss.plot(m["step"], m["loss"], color=colour, lw=1.2, label=label)
        if run.diverged and run.diverged_step is not None:
            ax_loss.axvline(run.diverged_step, color=colour, ls=":", lw=1)
        if "attn_logit_max" in run.probes:
            logit = run.per_layer("attn_logit_max")[0]
            ax_logit.plot(logit.index, logit, color=colour, lw=1.4, marker=".", ms=3, label=label)
            if run.diverged and len(logit):
                ax_logit.plot(logit.index[-1:], logit.iloc[-1:], "x", ms=9, mew=2, color=colour)
    ax_logit.axhline(threshold, color="black", ls=":", lw=1.2, label=f"{threshold:g} (runs above diverged)")
    ax_loss.set_title("Training loss")
    ax_loss.set_ylabel("train loss (nats/token)")
    ax_logit.set_title("Layer-0 max attention logit")
    ax_logit.set_ylabel("max |q·k|/√d_h, layer 0")
    ax_logit.set_yscale("log")
    for ax in (ax_loss, ax_logit):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def logz_traces(runs: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> Figure:
    """Training loss and mean log Z of the output logits vs step (log Z drifting away from 0
    is output-logit divergence; z-loss holds it at 0: Wortsman Fig. 4)."""
    fig, (ax_loss, ax_z) = _figure(ncols=2, width=5.2, height=4.0)
    for i, (name, run) in enumerate(runs.items()):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        m = run.metrics
        src = m if "logz_mean" in m else run.probes
        if "loss" in m:
            ax_loss.plot(m["step"], m["loss"], color=colour, lw=1.2, label=_run_label(name, run))
        ev = run.evals
        if "eval_loss" in ev:
            ax_loss.plot(ev["step"], ev["eval_loss"], "s", ms=4, color=colour, mfc="white")
        if "logz_mean" in src:
            ax_z.plot(src["step"], src["logz_mean"], color=colour, lw=1.2, label=_run_label(name, run))
    ax_z.axhline(0.0, color="grey", ls=":", lw=1)
    ax_loss.set_title("Loss (line: train; squares: eval)")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_z.set_title("Output logits: mean log Z")
    ax_z.set_ylabel("mean log Z = logsumexp(logits) (nats)")
    for ax in (ax_loss, ax_z):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def _spans_decades(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return bool(len(v) and v.min() > 0 and v.max() / v.min() > 100)


def layer_traces(table: pd.DataFrame, metric: str, title: str | None = None,
                 path: str | os.PathLike[str] | None = None) -> Figure:
    """One line per layer of a [step x layer] table (`Run.per_layer(metric)`); log y when
    the values span more than two decades."""
    fig, (ax,) = _figure(width=6.0, height=4.0)
    n = table.shape[1]
    for layer, colour in zip(table.columns, sequential_colours(n)):
        ax.plot(table.index, table[layer], color=colour, lw=1.3, label=f"layer {layer}")
    if _spans_decades(table.to_numpy(dtype=float)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False, ncol=2 if n > 6 else 1)
    return _save(fig, path)


def layer_heatmap(table: pd.DataFrame, metric: str, title: str | None = None, log: bool | None = None,
                  log_steps: bool = False, path: str | os.PathLike[str] | None = None) -> Figure:
    """A [step x layer] table as a heatmap (steps on x, layers on y; steps may be uneven).
    Log colours when the values are positive and span more than two decades (or `log`);
    `log_steps` for log-spaced checkpoint steps (symlog x, so step 0 stays)."""
    values = table.to_numpy(dtype=float)
    log = _spans_decades(values) if log is None else log
    fig, (ax,) = _figure(width=6.4, height=3.2 + 0.12 * table.shape[1])
    steps = table.index.to_numpy(dtype=float)
    if len(steps) > 1:
        mids = (steps[1:] + steps[:-1]) / 2
        x = np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])
    else:
        x = np.array([steps[0] - 0.5, steps[0] + 0.5]) if len(steps) else np.array([0.0, 1.0])
    y = np.arange(table.shape[1] + 1) - 0.5
    finite = values[np.isfinite(values)]
    norm = mcolors.LogNorm(vmin=max(finite[finite > 0].min(), 1e-30), vmax=finite.max()) if log and len(finite) else None
    mesh = ax.pcolormesh(x, y, values.T, cmap="viridis", norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax, label=metric + (" (log scale)" if log else ""))
    if log_steps:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yticks(range(table.shape[1]))
    ax.set_yticklabels([str(c) for c in table.columns])
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{metric}: step x layer")
    return _save(fig, path)


def long_to_step_layer(df: pd.DataFrame, value: str | None = None) -> tuple[pd.DataFrame, str]:
    """A long analysis table (step, layer, value columns) as a [step x layer] table. Without
    `value` the massive-activation ratio is taken (ratio_seq_mean, then ratio, then any
    column with 'ratio' in its name). A 'site'-like column is narrowed to 'resid'."""
    for col in ("site", "tap", "where", "kind"):
        if col in df and df[col].nunique() > 1:
            keep = "resid" if (df[col] == "resid").any() else df[col].iloc[0]
            df = df[df[col] == keep]
    if value is None:
        candidates = ["ratio_seq_mean", "ratio", *[c for c in df.columns if "ratio" in c]]
        value = next((c for c in candidates if c in df), None)
        if value is None:
            raise KeyError(f"no ratio column in the table; columns: {list(df.columns)}")
    return df.pivot_table(index="step", columns="layer", values=value, aggfunc="mean").sort_index(), value
