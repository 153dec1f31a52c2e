"""Training: the one step builder (engine.py), the one loop (loop.py), the optimizer recipe,
the jitted step, mesh and shardings, checkpoints, the run's metrics, the AOT check.

`seismo.train.train(cfg, run_dir)` trains one run and `seismo.train.train_group(cfgs,
run_dirs)` a vmapped group; the submodules load on first use, so `import seismo.train` stays
free of heavy imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seismo.train.engine import Engine, build, check_config
    from seismo.train.loop import EXIT_CODES, RunResult, train, train_group
    from seismo.train.step import TrainState

_LAZY = {"train": "loop", "train_group": "loop", "RunResult": "loop", "EXIT_CODES": "loop",
         "Engine": "engine", "build": "engine", "check_config": "engine", "TrainState": "step"}
__all__ = ["EXIT_CODES", "Engine", "RunResult", "TrainState", "build", "check_config", "train", "train_group"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"seismo.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'seismo.train' has no attribute {name!r}")
