"""seismo: training-dynamics studies of transformer language models in JAX.

The notebook API, importable from `seismo` (heavy modules load on first use):

    cfg = seismo.config.load("configs/tiny.yaml", ["optimizer.lr=3e-3"])
    result = seismo.train.train(cfg, "runs/tiny")      # a run directory; resumes if it exists
    run = seismo.load_run("runs/tiny")                 # metrics, evals, probes, analysis tables
    sweep = seismo.load_sweep("runs/qk_layernorm")     # results, summary (LR sensitivity)
    seismo.analyze("runs/tiny")                        # checkpoint analysis -> analysis/*.csv
    seismo.report("runs/qk_layernorm")                 # figures/*.png + report.md
    model = seismo.models.build(cfg.model)             # init/apply -> (logits, taps)
    seismo.instrument.massive_activations(h_BxTxD)     # statistics as plain functions
    seismo.analysis.lr_sensitivity(final_losses, loss_at_init)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from seismo import analysis, config, data, instrument, models, registry, sweep, train
    from seismo.analysis import load_run, load_sweep, report
    from seismo.analysis.checkpoints import analyze_run as analyze
    from seismo.sweep.runner import run_sweep

__version__ = "0.1.0"

_SUBMODULES = ("config", "registry", "models", "data", "train", "instrument", "analysis", "sweep")
_FUNCTIONS = {
    "load_run": ("seismo.analysis", "load_run"),
    "load_sweep": ("seismo.analysis", "load_sweep"),
    "report": ("seismo.analysis", "report"),
    "analyze": ("seismo.analysis.checkpoints", "analyze_run"),
    "run_sweep": ("seismo.sweep.runner", "run_sweep"),
}
__all__ = ["__version__", "analysis", "analyze", "config", "data", "instrument", "load_run", "load_sweep",
           "models", "registry", "report", "run_sweep", "sweep", "train"]


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"seismo.{name}")
    raise AttributeError(f"module 'seismo' has no attribute {name!r}")
