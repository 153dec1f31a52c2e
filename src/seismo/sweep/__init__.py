"""Sweeps: grids of runs from one sweep file, run one after another, in parallel processes, or
vmapped (many tiny models in one program; Wortsman et al. 2023, arXiv 2309.14322).

The sweep file format lives with the configs (seismo.config.sweepfile, re-exported here);
the runner (seismo.sweep.runner) trains the points through seismo.train. Importing this
package is cheap (no JAX).
"""

from seismo.config.sweepfile import (
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
