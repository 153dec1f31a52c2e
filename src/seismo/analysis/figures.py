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

Drawn as a paper would: series are named from their config values ("qk-layernorm off, LR 0.1",
`series_label`), never from directory names; one colour per group (the first factor that
varies) and one line style per second factor; the single-batch train loss is drawn faint under
its exponential moving average (`ema`, a time constant in steps, bias-corrected); every axis
and colour bar names its quantity and unit (`metric_label`); the 1e4 line is the paper's
threshold, and only runs whose loss became non-finite are called diverged. A panel that a
single model size makes degenerate (LR sensitivity vs size, gradient RMS vs size) is left out
and the figure carries a sentence instead (`figure_notes`, which `seismo report` prints).
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


# What each recorded quantity is, in words, with its unit (docs/metrics.md), for axes and colour bars.
METRIC_LABELS = {
    "loss": "train loss (nats/token)",
    "ce": "train cross-entropy (nats/token)",
    "eval_loss": "eval loss (nats/token)",
    "attn_logit_max": "max attention logit |q·k|/√d_h (logit units)",
    "attn_logz_mean": "mean attention log Z (nats)",
    "attn_logz_max": "max attention log Z (nats)",
    "attn_entropy": "attention entropy (nats)",
    "attn_sink_mass": "attention on the first token (fraction of the row)",
    "attn_row_mass": "attention row mass Σ_j A_ij (fraction)",
    "resid_rms": "residual-stream RMS (activation units)",
    "resid_max": "residual-stream max |h| (activation units)",
    "mlp_rms": "MLP activation RMS (activation units)",
    "mlp_zero_frac": "MLP activations exactly 0 (fraction)",
    "logz_mean": "mean log Z, logsumexp of the output logits (nats)",
    "logz_max": "max log Z (nats)",
    "logit_mean": "mean output logit over the vocabulary (nats)",
    "ratio": "top-1 / median |activation| (ratio)",
    "ratio_seq_mean": "top-1 / median |activation|, sequence mean (ratio)",
    "grad_rms_mlp0": "grad RMS, block 0 first MLP kernel (nats/token per weight unit)",
    "n_params": "non-embedding parameters (count)",
    "optimizer.lr": "peak learning rate (AdamW step size)",
    "step": "training step",
}

# How a config key reads in a legend ("qk-layernorm off", "LR 0.1", "z-loss 1e-4").
KEY_NAMES = {
    "model": "model", "model.qk_norm": "qk-layernorm", "model.d_model": "width", "model.n_layers": "depth",
    "model.n_heads": "heads", "model.activation": "activation", "model.attention": "attention",
    "model.norm_placement": "norm placement", "model.layerscale": "LayerScale", "model.attn_bias": "attention bias",
    "optimizer.lr": "LR", "optimizer.weight_decay": "weight decay", "optimizer.warmup_steps": "warmup",
    "optimizer.eps": "AdamW ε", "loss.z_loss": "z-loss", "run.seed": "seed",
}


def metric_label(metric: str) -> str:
    """The axis text of a recorded quantity: what it is and its unit ('attn_entropy' ->
    'attention entropy (nats)'); a name not in METRIC_LABELS is returned as given."""
    return METRIC_LABELS.get(metric, metric)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def value_label(key: str, value: Any) -> str:
    """One config value as a reader would say it: ('model.qk_norm', False) -> 'qk-layernorm off',
    ('optimizer.lr', 0.1) -> 'LR 0.1', ('model.d_model', 64) -> 'width 64'."""
    name = KEY_NAMES.get(key, key.split(".")[-1].replace("_", " "))
    flag = _as_bool(value)
    if flag is not None:
        return f"{name} {'on' if flag else 'off'}"
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            pass
    return f"{name} {format_value(value)}"


def series_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    """A legend entry from config values: 'qk-layernorm off, LR 0.1'."""
    return ", ".join(value_label(k, v) for k, v in zip(keys, values))


def figure_notes(fig: Figure) -> list[str]:
    """Sentences a figure carries in place of what it left out (a panel one size makes degenerate)."""
    return list(getattr(fig, "_seismo_notes", []))


def _note(fig: Figure, text: str) -> None:
    fig._seismo_notes = [*figure_notes(fig), text]  # type: ignore[attr-defined]


def ema(values: Sequence[float], steps: Sequence[float] | None = None, tau: float | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average with a time constant `tau` in steps (rows may be
    unevenly spaced): s_i = sum_{j<=i} w_ij x_j / sum_{j<=i} w_ij, w_ij = exp(-(t_i - t_j) / tau).
    Non-finite values are skipped (they neither count nor reset). Default tau: a thirtieth of the
    span of `steps`, at least 2 logging intervals. Without `steps`, rows are 1 apart."""
    x = np.asarray(values, dtype=float)
    t = np.arange(len(x), dtype=float) if steps is None else np.asarray(steps, dtype=float)
    if len(x) == 0:
        return x.copy()
    if tau is None:
        dt = np.median(np.diff(t)) if len(t) > 1 else 1.0
        tau = max((t[-1] - t[0]) / 30.0, 2.0 * float(dt), 1e-12)
    out = np.full(len(x), np.nan)
    num = den = 0.0
    for i in range(len(x)):
        if i:
            decay = math.exp(-(t[i] - t[i - 1]) / tau)
            num, den = num * decay, den * decay
        if np.isfinite(x[i]):
            num, den = num + x[i], den + 1.0
        out[i] = num / den if den > 0 else np.nan
    return out


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
    return series_label(keys, values)


def n_sizes(results: pd.DataFrame, lr_key: str = "optimizer.lr", grid_keys: Sequence[str] | None = None) -> int:
    """How many model sizes a results table holds: the groups of its size keys (`split_keys`);
    an intervention that adds a few parameters (qk-layernorm's scales) is not a second size."""
    sizes, _ = split_keys(results, lr_key, grid_keys)
    return len(_groups(results, sizes)) if sizes else 1


def one_size_text(results: pd.DataFrame) -> str:
    n = results["n_params"].astype(float) if "n_params" in results else pd.Series(dtype=float)
    n = n[np.isfinite(n)]
    return f"one model size (N = {format_params(float(n.median()))} non-embedding parameters)" if len(n) \
        else "one model size"


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
        label = f"{format_params(n)} params" if np.isfinite(n) else ""
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


def _factors(df: pd.DataFrame, sizes: Sequence[str], interventions: Sequence[str]) -> tuple[list[str], list[str]]:
    """(colour keys, line-style keys): colour the first factor that varies (the size when there
    are several sizes, else the first intervention), line styles for the others."""
    varying = [k for k in interventions if df[k].astype(str).nunique() > 1]
    if sizes and len(_groups(df, sizes)) > 1:
        return list(sizes), varying
    return varying[:1], varying[1:]


def lr_vs_loss(results: pd.DataFrame, lr_key: str = "optimizer.lr", grid_keys: Sequence[str] | None = None,
               path: str | os.PathLike[str] | None = None) -> Figure:
    """Final eval loss vs peak LR (log x), one colour per size (per intervention when there is
    one size), one line style per further factor; an x marks a diverged run at its loss at init
    (Wortsman Fig. 1)."""
    df = _started(results)
    sizes, interventions = split_keys(df, lr_key, grid_keys)
    colour_keys, style_keys = _factors(df, sizes, interventions)
    fig, (ax,) = _figure(width=6.4, height=4.4)
    size_labels = dict(_size_order(df, sizes)) if colour_keys == list(sizes) and sizes else {}
    colour_groups = [k for k, _ in _size_order(df, sizes)] if size_labels else [k for k, _ in _groups(df, colour_keys)]
    styles = {k: LINESTYLES[i % len(LINESTYLES)] for i, (k, _) in enumerate(_groups(df, style_keys))}
    for ci, ckey in enumerate(colour_groups):
        colour = OKABE_ITO[ci % len(OKABE_ITO)]
        sub = _select(df, colour_keys, ckey)
        for skey, g in _groups(sub, style_keys):
            loss = clamp_losses(g["final_eval_loss"].where(~g["diverged"].astype(bool)), g["loss_at_init"])
            g = g.assign(_loss=loss, _div=g["diverged"].astype(bool))
            per_lr = g.groupby(lr_key).agg(loss=("_loss", "mean"), div=("_div", "any"),
                                           unfinished=("status", lambda s: bool((s == "unfinished").any())))
            per_lr = per_lr.sort_index()
            parts = [size_labels.get(ckey) or series_label(colour_keys, ckey), series_label(style_keys, skey)]
            label = "; ".join(p for p in parts if p) or "all runs"
            ax.plot(per_lr.index, per_lr["loss"], ls=styles[skey], color=colour, lw=1.6, label=label)
            ok = per_lr[~per_lr["div"] & ~per_lr["unfinished"]]
            ax.plot(ok.index, ok["loss"], ls="none", marker="o", ms=4.5, color=colour)
            un = per_lr[~per_lr["div"] & per_lr["unfinished"]]  # hollow: not finished yet
            ax.plot(un.index, un["loss"], ls="none", marker="o", ms=5, mfc="white", color=colour)
            dv = per_lr[per_lr["div"]]
            ax.plot(dv.index, dv["loss"], ls="none", marker="x", ms=8, mew=2, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(metric_label("eval_loss").replace("eval loss", "final eval loss"))
    title = "Final loss vs learning rate"
    if df["diverged"].astype(bool).any():
        title += " (x: diverged, plotted at the loss at init)"
    if not sizes and "n_params" in df:
        title += f"\n{one_size_text(df)}"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if len(colour_groups) > 1 or style_keys:
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
        # counts within 10% of each other are one size (qk-layernorm adds a few scales): one tick
        clusters: list[list[float]] = []
        for v in n:
            if clusters and v < 1.1 * clusters[-1][0]:
                clusters[-1].append(v)
            else:
                clusters.append([v])
        n = np.array([float(np.sqrt(c[0] * c[-1])) for c in clusters])
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
    (Wortsman Fig. 1 right). `results` (optional) tells size keys from interventions. With one
    model size a line against size would be a single point, so the figure shows the LR
    sensitivity per intervention instead, and says so (`figure_notes`)."""
    keys = [c for c in summary.columns if c not in ("lr_sensitivity", "best_lr", "best_loss", "n_lrs", "n_runs",
                                                    "n_diverged", "n_unfinished", "n_params")]
    if results is not None:
        sizes, interventions = split_keys(results, lr_key, grid_keys)
        interventions = [k for k in interventions if k in keys]
        one_size = n_sizes(results, lr_key, grid_keys) == 1
    else:
        sizes = [k for k in keys if k in ("model", "model.d_model", "model.n_layers")]
        interventions = [k for k in keys if k not in sizes]
        n = summary["n_params"].astype(float) if "n_params" in summary else pd.Series(dtype=float)
        one_size = not sizes or not len(n.dropna()) or n.max() < 1.1 * n.min()
    fig, (ax,) = _figure(width=5.6, height=4.2)
    groups = _groups(summary, interventions)
    if one_size:
        labels = [series_label(interventions, k) or "all runs" for k, _ in groups]
        values = [float(g["lr_sensitivity"].mean()) for _, g in groups]
        ax.bar(range(len(groups)), values, color=[OKABE_ITO[i % len(OKABE_ITO)] for i in range(len(groups))])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_xlabel("intervention")
        ax.set_title(f"LR sensitivity per intervention\n{one_size_text(summary)}", fontsize=10)
        _note(fig, f"LR sensitivity vs model size is not drawn: this sweep has {one_size_text(summary)}, "
                   "so the figure shows the LR sensitivity per intervention instead.")
    else:
        for i, (ikey, g) in enumerate(groups):
            g = g.sort_values("n_params")
            ax.plot(g["n_params"], g["lr_sensitivity"], marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % 4],
                    color=OKABE_ITO[i % len(OKABE_ITO)], label=series_label(interventions, ikey) or "all runs")
        _params_axis(ax, summary["n_params"])
        ax.set_xlabel("non-embedding parameters (count, log scale)")
        ax.set_title("LR sensitivity vs model size")
        ax.legend(fontsize=8, frameon=False)
    ax.set_ylabel("LR sensitivity (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def grad_rms(results: pd.DataFrame, lr_key: str = "optimizer.lr", eps: float | None = 1e-8,
             grid_keys: Sequence[str] | None = None, path: str | os.PathLike[str] | None = None) -> Figure:
    """Gradient RMS of block 0's first MLP kernel (mean over the last 500 steps) vs size (one
    line per LR) and vs LR (one colour per size, or per intervention with one size), log-log,
    with AdamW's ε (Wortsman Fig. 11). Further factors get line styles. With one model size
    the panel against size is left out (a note says so: `figure_notes`)."""
    df = _started(results)
    df = df[np.isfinite(df["grad_rms_mlp0"].astype(float))]
    sizes, interventions = split_keys(df, lr_key, grid_keys)
    one_size = n_sizes(df, lr_key, grid_keys) == 1
    if one_size:
        fig, (ax_lr,) = _figure(ncols=1, width=6.0, height=4.2)
        ax_n = None
        _note(fig, f"Gradient RMS vs model size is not drawn: this sweep has {one_size_text(df)}.")
    else:
        fig, (ax_n, ax_lr) = _figure(ncols=2, width=5.0, height=4.0)
    lrs = sorted(df[lr_key].unique())
    lr_colours = sequential_colours(len(lrs))
    colour_keys, style_keys = _factors(df, sizes, interventions)
    if ax_n is None:  # one size: colour the first intervention, styles for the rest
        colour_groups = [(k, series_label(colour_keys, k) or "all runs") for k, _ in _groups(df, colour_keys)]
    else:
        colour_keys, style_keys = list(sizes), [k for k in interventions if df[k].astype(str).nunique() > 1]
        colour_groups = _size_order(df, sizes)
    styles = []
    for j, (skey, g) in enumerate(_groups(df, style_keys)):
        ls = LINESTYLES[j % len(LINESTYLES)]
        styles.append((series_label(style_keys, skey), ls))
        if ax_n is not None:
            for lr, colour in zip(lrs, lr_colours):
                per_n = g[g[lr_key] == lr].groupby("n_params")["grad_rms_mlp0"].mean()
                ax_n.plot(per_n.index, per_n, marker="o", ms=3.5, ls=ls, color=colour)
        for i, (ckey, _) in enumerate(colour_groups):
            per_lr = _select(g, colour_keys, ckey).groupby(lr_key)["grad_rms_mlp0"].mean()
            ax_lr.plot(per_lr.index, per_lr, marker="o", ms=3.5, ls=ls, color=OKABE_ITO[i % len(OKABE_ITO)])
    panels = [(ax_lr, "peak learning rate (log scale)")]
    if ax_n is not None:
        panels.insert(0, (ax_n, "non-embedding parameters (count, log scale)"))
    for ax, xlabel in panels:
        if eps:
            ax.axhline(eps, color="grey", ls=":", lw=1.2, label=f"AdamW ε = {eps:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label("grad_rms_mlp0"), fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    if ax_n is not None:
        _params_axis(ax_n, df["n_params"])
        _legend(ax_n, [(f"LR {format_value(float(lr))}", c) for lr, c in zip(lrs, lr_colours)],
                styles if style_keys else ())
        ax_n.set_title("Gradient RMS vs model size")
    _legend(ax_lr, [(lbl, OKABE_ITO[i % len(OKABE_ITO)]) for i, (_, lbl) in enumerate(colour_groups)],
            styles if style_keys else ())
    ax_lr.set_title("Gradient RMS vs learning rate" + (f"\n{one_size_text(df)}" if ax_n is None else ""),
                    fontsize=10)
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
    ax.axhline(threshold, color="black", ls=":", lw=1.2,
               label=f"{format_value(float(threshold))}: the paper's divergence threshold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters (count, log scale)\ngrey line: the largest trained model")
    ax.set_ylabel("layer-0 " + metric_label("attn_logit_max"))
    ax.set_title("Max attention logit vs size: fit and extrapolation (stars)")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, [(f"LR {format_value(float(lr))}", c) for lr, c in colours.items()],
            [(_label(group_keys, k), ls) for k, ls in styles.items()] if group_keys else (), outside=True)
    return _save(fig, path)


# --------------------------------------------------------------------------- runs over steps


# Config sections that describe how a run was run, not what was trained: never a series label.
_NOT_FACTORS = ("run.", "mesh.")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: repr(node) if isinstance(node, (list, dict)) else node}


def _differing_keys(runs: Sequence[Any]) -> list[str]:
    """The config keys whose values differ among `runs`, the model's before the others' and the
    LR last (so the LR gets line styles when something else gets colours)."""
    flats = [_flat(getattr(r, "config", None) or {}) for r in runs]
    keys = sorted({k for f in flats for k in f if not k.startswith(_NOT_FACTORS) or k == SEED_KEY})
    diff = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    rank = {"model": 0, "loss": 1, "optimizer": 2, "data": 3}
    return sorted(diff, key=lambda k: (k == "optimizer.lr", rank.get(k.split(".")[0], 4), k))


def run_labels(runs: Mapping[str, Any]) -> dict[str, str]:
    """Legend labels for runs from the config values that tell them apart ('qk-layernorm off,
    LR 0.1'); one run is named by its qk-layernorm and LR. A run without a config keeps its name."""
    values = list(runs.values())
    keys = _differing_keys(values) if len(values) > 1 else [
        k for k in ("model.qk_norm", "loss.z_loss", "optimizer.lr") if values and
        _flat(getattr(values[0], "config", None) or {}).get(k) is not None]
    out = {}
    for name, run in runs.items():
        flat = _flat(getattr(run, "config", None) or {})
        out[name] = series_label(keys, [flat.get(k) for k in keys]) if keys and flat else name
    return out


def common_label(runs: Mapping[str, Any]) -> str:
    """What a few runs share of the settings a reader looks for first ('weight decay 1e-4, LR 0.1'),
    for a title: the legend names only what differs."""
    values = list(runs.values())
    if len(values) < 2:
        return ""
    flats = [_flat(getattr(r, "config", None) or {}) for r in values]
    keys = [k for k in ("model.qk_norm", "loss.z_loss", "optimizer.weight_decay", "optimizer.lr")
            if k in flats[0] and len({repr(f.get(k)) for f in flats}) == 1]
    return series_label(keys, [flats[0][k] for k in keys])


def _run_styles(runs: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """(colour, line style) per run: one colour per value of the first differing config key,
    one line style per combination of the others."""
    values = list(runs.values())
    keys = _differing_keys(values) if len(values) > 1 else []
    flats = {n: _flat(getattr(r, "config", None) or {}) for n, r in runs.items()}
    colour_of: dict[str, str] = {}
    style_of: dict[str, Any] = {}
    out = {}
    for i, name in enumerate(runs):
        if not keys:
            out[name] = (OKABE_ITO[i % len(OKABE_ITO)], "-")
            continue
        ck = repr(flats[name].get(keys[0]))
        sk = repr([flats[name].get(k) for k in keys[1:]])
        colour = colour_of.setdefault(ck, OKABE_ITO[len(colour_of) % len(OKABE_ITO)])
        out[name] = (colour, style_of.setdefault(sk, LINESTYLES[len(style_of) % len(LINESTYLES)]))
    return out


def _status_text(run: Any, logit: pd.Series | None = None, threshold: float = DIVERGENCE_LOGIT) -> str:
    """'diverged at step 120' only for a run whose loss became non-finite; a finished run whose
    logit crossed the threshold says when, and that it finished."""
    if getattr(run, "diverged", False):
        step = getattr(run, "diverged_step", None)
        return "diverged" + (f" at step {step}" if step is not None else "")
    if logit is not None and len(logit) and (logit >= threshold).any():
        first = int(logit.index[np.argmax(logit.to_numpy() >= threshold)])
        status = getattr(run, "status", "")
        return f"above {format_value(float(threshold))} from step {first}" + (f"; {status}" if status else "")
    return ""


def _series_handles(runs: Mapping[str, Any], labels: Mapping[str, str],
                    styles: Mapping[str, tuple[str, Any]]) -> list[Line2D]:
    return [Line2D([], [], color=styles[n][0], ls=styles[n][1], lw=1.6, label=labels[n]) for n in runs]


def _shared_legend(fig: Figure, handles: Sequence[Any]) -> None:
    """One legend for the panels of a figure, below them (the panels draw the same series)."""
    fig.legend(handles=list(handles), loc="outside lower center", ncol=2 if len(handles) > 2 else len(handles),
               fontsize=8, frameon=False)


def _loss_lines(ax: Any, m: pd.DataFrame, colour: Any, ls: Any, label: str, smooth_steps: float | None) -> None:
    """The single-batch train loss faint, its EMA over it (the line the legend names)."""
    ax.plot(m["step"], m["loss"], color=colour, lw=0.7, alpha=0.3)
    ax.plot(m["step"], ema(m["loss"], m["step"], smooth_steps), color=colour, ls=ls, lw=1.6, label=label)


def pair_traces(runs: Mapping[str, Any], threshold: float = DIVERGENCE_LOGIT,
                path: str | os.PathLike[str] | None = None, smooth_steps: float | None = None) -> Figure:
    """Loss (left) and layer-0 max attention logit (right, log y) vs step for a few runs,
    e.g. a small and a large model with and without qk-layernorm (Wortsman Fig. 2). The train
    loss is drawn faint with its EMA (`ema`, time constant `smooth_steps`) over it; series are
    named from their config values; the threshold line is the paper's, and only a run whose
    loss became non-finite is called diverged. Runs without probe rows (run.probe_every 0)
    get the loss panel alone and a note (`figure_notes`)."""
    has_logit = any("attn_logit_max" in r.probes for r in runs.values())
    fig, axes = _figure(ncols=2 if has_logit else 1, width=5.4, height=4.2)
    ax_loss, ax_logit = axes[0], (axes[1] if has_logit else None)
    labels, styles = run_labels(runs), _run_styles(runs)
    shown: dict[str, str] = {}
    for name, run in runs.items():
        colour, ls = styles[name]
        m = run.metrics
        logit = run.per_layer("attn_logit_max")[0] if "attn_logit_max" in run.probes else None
        status = _status_text(run, logit, threshold)
        label = shown[name] = labels[name] + (f" ({status})" if status else "")
        if "loss" in m:
            _loss_lines(ax_loss, m, colour, ls, label, smooth_steps)
        if run.diverged and run.diverged_step is not None:
            ax_loss.axvline(run.diverged_step, color=colour, ls=":", lw=1)
        if logit is not None and ax_logit is not None:
            ax_logit.plot(logit.index, logit, color=colour, ls=ls, lw=1.4, marker=".", ms=3, label=label)
            if run.diverged and len(logit):
                ax_logit.plot(logit.index[-1:], logit.iloc[-1:], "x", ms=9, mew=2, color=colour)
    ax_loss.set_title("Training loss (faint: single batch; line: EMA)", fontsize=10)
    ax_loss.set_ylabel(metric_label("loss"))
    extra = []
    if ax_logit is not None:
        extra.append(ax_logit.axhline(threshold, color="black", ls=":", lw=1.2,
                                      label=f"{format_value(float(threshold))}: the paper's divergence threshold"))
        ax_logit.set_title("Layer-0 max attention logit", fontsize=10)
        ax_logit.set_ylabel("layer-0 " + metric_label("attn_logit_max"))
        ax_logit.set_yscale("log")
    else:
        _note(fig, "The layer-0 max attention logit is not drawn: these runs recorded no probe rows "
                   "(run.probe_every 0).")
    for ax in axes:
        ax.set_xlabel(metric_label("step"))
        ax.grid(True, alpha=0.3)
    _shared_legend(fig, [*_series_handles(runs, shown, styles), *extra])
    if common_label(runs):
        fig.suptitle(f"All runs: {common_label(runs)}", fontsize=9)
    return _save(fig, path)


def logz_traces(runs: Mapping[str, Any], path: str | os.PathLike[str] | None = None,
                smooth_steps: float | None = None) -> Figure:
    """Training loss, mean log Z of the output logits and (when recorded) the mean output logit
    vs step: output-logit divergence is the logits drifting very negative, log Z away from 0,
    late in a run without weight decay; z-loss pulls log Z to 0 (Wortsman et al. 2023, §3.2,
    Fig. 4). Train loss faint with its EMA over it; eval losses as squares."""
    has_mean = any("logit_mean" in r.metrics for r in runs.values())
    fig, axes = _figure(ncols=3 if has_mean else 2, width=4.6 if has_mean else 5.4, height=4.2)
    ax_loss, ax_z = axes[0], axes[1]
    labels, styles = run_labels(runs), _run_styles(runs)
    shown: dict[str, str] = {}
    for name, run in runs.items():
        colour, ls = styles[name]
        label = shown[name] = labels[name] + (f" ({_status_text(run)})" if getattr(run, "diverged", False) else "")
        m = run.metrics
        src = m if "logz_mean" in m else run.probes
        if "loss" in m:
            _loss_lines(ax_loss, m, colour, ls, label, smooth_steps)
        ev = run.evals
        if "eval_loss" in ev:
            ax_loss.plot(ev["step"], ev["eval_loss"], "s", ms=4, color=colour, mfc="white")
        if "logz_mean" in src:
            ax_z.plot(src["step"], src["logz_mean"], color=colour, ls=ls, lw=1.4, label=label)
        if has_mean and "logit_mean" in m:
            axes[2].plot(m["step"], m["logit_mean"], color=colour, ls=ls, lw=1.4, label=label)
    ax_z.axhline(0.0, color="grey", ls=":", lw=1)
    ax_loss.set_title("Loss (faint: train batch; line: EMA;\nsquares: eval)", fontsize=10)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_z.set_title("Output logits: mean log Z (0: Z = 1)", fontsize=10)
    ax_z.set_ylabel(metric_label("logz_mean"))
    if has_mean:
        axes[2].set_title("Output logits: mean logit", fontsize=10)
        axes[2].set_ylabel(metric_label("logit_mean"))
    for ax in axes:
        ax.set_xlabel(metric_label("step"))
        ax.grid(True, alpha=0.3)
    _shared_legend(fig, _series_handles(runs, shown, styles))
    if common_label(runs):
        fig.suptitle(f"All runs: {common_label(runs)}", fontsize=9)
    return _save(fig, path)


def _spans_decades(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return bool(len(v) and v.min() > 0 and v.max() / v.min() > 100)


def layer_traces(table: pd.DataFrame, metric: str, title: str | None = None,
                 path: str | os.PathLike[str] | None = None) -> Figure:
    """One line per layer of a [step x layer] table (`Run.per_layer(metric)`); log y when
    the values span more than two decades. `metric` is a recorded name (labelled with its
    unit, `metric_label`) or the axis text itself."""
    fig, (ax,) = _figure(width=6.0, height=4.0)
    n = table.shape[1]
    for layer, colour in zip(table.columns, sequential_colours(n)):
        ax.plot(table.index, table[layer], color=colour, lw=1.3, label=f"layer {layer}")
    log = _spans_decades(table.to_numpy(dtype=float))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(metric_label("step"))
    ax.set_ylabel(metric_label(metric) + (", log scale" if log else ""), fontsize=9)
    ax.set_title(title or f"{metric} per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False, ncol=2 if n > 6 else 1)
    return _save(fig, path)


def _cell_edges(x: np.ndarray) -> np.ndarray:
    """Cell edges halfway between centres, the outer ones mirrored."""
    if len(x) > 1:
        mids = (x[1:] + x[:-1]) / 2
        return np.concatenate([[x[0] - (mids[0] - x[0])], mids, [x[-1] + (x[-1] - mids[-1])]])
    return np.array([x[0] - 0.5, x[0] + 0.5]) if len(x) else np.array([0.0, 1.0])


def log_step_positions(steps: Sequence[float]) -> np.ndarray:
    """x positions for log-spaced checkpoint steps: log10(step), and step 0 one spacing of its
    neighbours to the left of the first positive step, so every checkpoint gets a cell of its
    own width on a true log axis (a symlog axis gives 0..1 a whole decade and squeezes 1..10)."""
    s = np.asarray(steps, dtype=float)
    pos = np.log10(np.where(s > 0, s, np.nan))
    positive = pos[np.isfinite(pos)]
    if len(positive) and not np.all(np.isfinite(pos)):
        gap = positive[1] - positive[0] if len(positive) > 1 else 1.0
        pos = np.where(np.isfinite(pos), pos, positive[0] - max(gap, np.log10(2.0)))
    return pos


def layer_heatmap(table: pd.DataFrame, metric: str, title: str | None = None, log: bool | None = None,
                  log_steps: bool = False, path: str | os.PathLike[str] | None = None) -> Figure:
    """A [step x layer] table as a heatmap (steps on x, layers on y; steps may be uneven).
    Log colours when the values are positive and span more than two decades (or `log`);
    `log_steps` for log-spaced checkpoint steps (a log axis with step 0 at its left edge:
    `log_step_positions`). The colour bar names the quantity and its unit (`metric_label`)."""
    values = table.to_numpy(dtype=float)
    log = _spans_decades(values) if log is None else log
    fig, (ax,) = _figure(width=6.4, height=3.2 + 0.12 * table.shape[1])
    steps = table.index.to_numpy(dtype=float)
    x = _cell_edges(log_step_positions(steps) if log_steps else steps)
    y = np.arange(table.shape[1] + 1) - 0.5
    finite = values[np.isfinite(values)]
    norm = mcolors.LogNorm(vmin=max(finite[finite > 0].min(), 1e-30), vmax=finite.max()) if log and len(finite) else None
    mesh = ax.pcolormesh(x, y, values.T, cmap="viridis", norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax).set_label(metric_label(metric) + (", log colour scale" if log else ""), fontsize=8)
    if log_steps and len(steps):
        from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

        positive = steps[steps > 0]
        lo, hi = (positive.min(), positive.max()) if len(positive) else (1.0, 1.0)
        decades = [10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
        ticks = [(math.log10(d), f"{d:g}") for d in decades if lo <= d <= hi]
        if (steps == 0).any():
            ticks.insert(0, (float(log_step_positions(steps)[steps == 0][0]), "0"))
        ax.xaxis.set_major_locator(FixedLocator([p for p, _ in ticks]))
        ax.xaxis.set_major_formatter(FixedFormatter([t for _, t in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(metric_label("step") + " (log scale; one cell per checkpoint)")
    else:
        ax.set_xlabel(metric_label("step"))
    ax.set_yticks(range(table.shape[1]))
    ax.set_yticklabels([str(c) for c in table.columns])
    ax.set_ylabel("layer")
    ax.set_title(title or f"{metric_label(metric).split(' (')[0]}: step x layer", fontsize=10)
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
