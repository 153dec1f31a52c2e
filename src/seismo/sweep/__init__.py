"""Sweeps: grids of runs from one sweep file (spec.py), run one after another, in parallel
processes, or vmapped (many tiny models in one program; Wortsman et al. 2023, arXiv 2309.14322).

Importing this package is cheap (no JAX): the runners live in their own modules.
"""

from seismo.sweep.spec import (
    EXECUTION_MODES,
    VMAPPABLE_KEYS,
    Point,
    ReportOptions,
    SweepError,
    SweepSpec,
    expand,
    load_sweep_spec,
    matches,
    point_config,
    run_dir,
    vmap_groups,
    write_spec,
)

__all__ = [
    "EXECUTION_MODES",
    "VMAPPABLE_KEYS",
    "Point",
    "ReportOptions",
    "SweepError",
    "SweepSpec",
    "expand",
    "load_sweep_spec",
    "matches",
    "point_config",
    "run_dir",
    "vmap_groups",
    "write_spec",
]
