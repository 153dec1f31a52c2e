"""Training: the optimizer recipe, the jitted step, the loop, mesh and shardings, checkpoints.

`seismo.train.train(cfg, run_dir)` trains one run; the submodules load on first use, so
`import seismo.train` stays free of heavy imports.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"train": "loop", "Trainer": "loop", "RunResult": "loop", "EXIT_CODES": "loop", "TrainState": "step"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"seismo.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'seismo.train' has no attribute {name!r}")
