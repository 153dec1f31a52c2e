"""Analysis of runs and sweeps: tidy tables (pandas), LR sensitivity, fits and figures.

The quantities and figures are those of Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities" (arXiv 2309.14322): LR sensitivity (§2.2),
layer-0 max attention logit and its extrapolation to larger models (§3.1, Fig. 9), log Z
(§3.2, Fig. 4) and gradient RMS (§3.4, Fig. 11).

    run = seismo.analysis.load_run("runs/tiny")      # .metrics .evals .probes .per_layer(...)
    sweep = seismo.analysis.load_sweep("runs/qk_layernorm")   # .results .summary .runs
    seismo.analysis.report("runs/qk_layernorm")      # figures/*.png and report.md
    seismo.analysis.analyze_run("runs/tiny")         # checkpoint analysis -> analysis/*.csv
    seismo.analysis.read_table("runs/tiny", "massive")
"""

import importlib
from typing import Any

from seismo.analysis.extrapolate import extrapolate_logits
from seismo.analysis.runs import Run, Sweep, collect_results, load_run, load_sweep, summarize
from seismo.analysis.sensitivity import clamp_losses, lr_sensitivity, sensitivity_table
from seismo.instrument.trend import logit_trend_warning

__all__ = [
    "Run",
    "analyze_run",
    "fit_massive_dynamics_table",
    "probe",
    "read_table",
    "Sweep",
    "clamp_losses",
    "collect_results",
    "extrapolate_logits",
    "figures",
    "load_run",
    "load_sweep",
    "logit_trend_warning",
    "lr_sensitivity",
    "report",
    "sensitivity_table",
    "summarize",
    "write_report",
]


_CHECKPOINTS = ("analyze_run", "fit_massive_dynamics_table", "probe", "read_table")


def __getattr__(name: str) -> Any:
    # matplotlib loads only when a figure is wanted.
    if name == "figures":
        return importlib.import_module("seismo.analysis.figures")
    if name in _CHECKPOINTS:  # jax, orbax and the data pipeline load only when wanted
        return getattr(importlib.import_module("seismo.analysis.checkpoints"), name)
    if name in ("report", "write_report"):
        return importlib.import_module("seismo.analysis.reports").report
    raise AttributeError(f"module 'seismo.analysis' has no attribute {name!r}")
