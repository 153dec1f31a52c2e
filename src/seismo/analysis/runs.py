"""Run and sweep directories as tidy pandas tables, for notebooks and `seismo report`.

A run directory (the unit of record, seismo.rundir) holds `config.yaml`, `metrics.jsonl` (train,
eval, probe, divergence, preemption and warning rows), `status.json`, `checkpoints/` and
`analysis/*.csv`. A sweep directory holds `sweep.yaml` (the self-contained spec) and one run
directory per point under `runs/<point name>/`. `collect_results` turns a sweep into one row
per run with the quantities of Wortsman et al. 2023 (arXiv 2309.14322): final loss, loss at
init, divergence, layer-0 max attention logit, log Z, first-MLP gradient RMS, parameter count.

Reading never fails on a run that is still going or was killed: a half-written last line of
metrics.jsonl is skipped (and counted in `Run.skipped_lines`).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from seismo import rundir
from seismo.analysis.sensitivity import sensitivity_table
from seismo.rundir import (
    ANALYSIS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUNS_DIR,
    SPEC_FILE,
    STATUS_FILE,
    row_kind,
)
from seismo.train.metrics import parse_row

PathLike = str | os.PathLike[str]
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.csv"
GRAD_RMS_WINDOW = 500  # steps: Wortsman averages gradient RMS over the final 500 steps (§3.4)
SEED_KEY = "run.seed"


def read_metrics(path: PathLike) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics.jsonl file and the number of unreadable lines skipped (a killed
    writer leaves a half-written last line). Rows logged again after a resume replace the
    earlier ones of the same kind and step."""
    path = rundir.path(path)
    if not path.exists():
        return [], 0
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    skipped = 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        row = parse_row(line)
        if row is None:
            skipped += 1
            continue
        kind = row_kind(row)
        rows.pop((kind, row["step"]), None)  # keep file order of the newest copy
        rows[(kind, row["step"])] = row
    return list(rows.values()), skipped


def _frame(rows: list[dict[str, Any]], drop: Sequence[str] = ()) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({"step": pd.Series([], dtype=np.int64)})
    df = pd.DataFrame.from_records(rows)
    df = df.drop(columns=[c for c in drop if c in df.columns])
    return df.sort_values("step", kind="stable").reset_index(drop=True)


def _finite(x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


@dataclass
class Run:
    """One run directory. Tables are built on first access and cached."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(repr=False)
    status_file: dict[str, Any] | None = None
    skipped_lines: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def _by_kind(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            out.setdefault(row_kind(r), []).append(r)
        return out

    def _rows(self, kind: str) -> list[dict[str, Any]]:
        return self._by_kind.get(kind, [])

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """Train rows: step, loss, lr, grad_norm, ..., one per run.log_every steps."""
        return _frame(self._rows("train"))

    @functools.cached_property
    def evals(self) -> pd.DataFrame:
        """Eval rows: step, eval_loss (step 0 is the loss at initialisation)."""
        return _frame(self._rows("eval"))

    @functools.cached_property
    def probes(self) -> pd.DataFrame:
        """Probe rows: per-layer metrics as lists (see `per_layer`), scalars as numbers."""
        return _frame(self._rows("probe"), drop=["probe"])

    @functools.cached_property
    def warnings(self) -> pd.DataFrame:
        return _frame(self._rows("warning"))

    @property
    def divergence(self) -> dict[str, Any] | None:
        """The divergence row (step, the non-finite metrics, `last_probe/...`), or None."""
        rows = self._rows("divergence")
        return rows[-1] if rows else None

    @property
    def diverged(self) -> bool:
        return self.divergence is not None or (self.status_file or {}).get("status") == "diverged"

    @property
    def diverged_step(self) -> int | None:
        row = self.divergence
        if row is not None:
            return int(row["step"])
        return int(self.status_file["step"]) if self.diverged and self.status_file else None

    @property
    def total_steps(self) -> int | None:
        return (self.config.get("run") or {}).get("steps")

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)

    @property
    def status(self) -> str:
        """'diverged', 'finished' (reached run.steps) or 'unfinished' (running, preempted, killed)."""
        if self.diverged:
            return "diverged"
        if (self.status_file or {}).get("status") == "finished":
            return "finished"
        total = self.total_steps
        done = total is not None and self.last_step >= total and not self._rows("preemption")
        return "finished" if done and not self.status_file else "unfinished"

    @property
    def loss_at_init(self) -> float:
        ev = self.evals
        at0 = ev.loc[ev["step"] == 0, "eval_loss"] if "eval_loss" in ev else []
        return _finite(at0.iloc[0]) if len(at0) else math.nan

    @property
    def final_eval_loss(self) -> float:
        """The last eval loss; NaN for a diverged run (it counts as the loss at init)."""
        ev = self.evals
        if self.diverged or "eval_loss" not in ev or not len(ev):
            return math.nan
        return _finite(ev["eval_loss"].iloc[-1])

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. run.get('optimizer.lr')."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def per_layer(self, metric: str) -> pd.DataFrame:
        """A probe metric as a [step x layer] table (a scalar metric gives one column, 0)."""
        df = self.probes
        if metric not in df:
            known = sorted(c for c in df.columns if c != "step")
            raise KeyError(f"{self.path}: no probe metric {metric!r}. Probe metrics: {', '.join(known) or 'none'}"
                           + ("" if known else " (was run.probe_every 0?)"))
        sub = df[["step", metric]].dropna()
        values = [np.atleast_1d(np.asarray(v, dtype=np.float64) if v is not None else np.nan)
                  for v in sub[metric]]
        width = max((len(v) for v in values), default=0)
        mat = np.full((len(values), width), np.nan)
        for i, v in enumerate(values):
            mat[i, :len(v)] = [np.nan if x is None else x for x in v]
        out = pd.DataFrame(mat, index=pd.Index(sub["step"].astype(int), name="step"),
                           columns=pd.Index(range(width), name="layer"))
        return out

    def analysis_tables(self) -> list[str]:
        folder = self.path / ANALYSIS_DIR
        return sorted(p.stem for p in folder.glob("*.csv")) if folder.exists() else []

    def analysis(self, name: str) -> pd.DataFrame:
        """The table analysis/<name>.csv written by `seismo analyze`."""
        path = self.path / ANALYSIS_DIR / f"{name}.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist. Tables here: {', '.join(self.analysis_tables()) or 'none'}"
                                    f" (run `seismo analyze {self.path}` to write them)")
        return pd.read_csv(io.StringIO(path.read_text()) if rundir.is_remote(path) else path)


def load_run(path: PathLike) -> Run:
    """Read a run directory written by `seismo train` (or one that is still being written):
    a local folder or a gs:// URL (seismo.rundir)."""
    path = rundir.path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.yaml")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    rows, skipped = read_metrics(path / METRICS_FILE)
    try:
        status = json.loads((path / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        status = None
    return Run(path=path, config=config, rows=rows, status_file=status, skipped_lines=skipped)


# --------------------------------------------------------------------------- per-run quantities


def attn_logit_at(run: Run, step: int | str = "last", layer: int = 0) -> tuple[float, float]:
    """(max attention logit of `layer`, the step it was read at): the probe row nearest to
    `step` ('last': the last probe row). A diverged run falls back to its divergence row's
    last probe. NaN when the run has no probes."""
    df = run.probes
    if "attn_logit_max" in df and len(df):
        table = run.per_layer("attn_logit_max")
        if layer < table.shape[1] and len(table):
            steps = table.index.to_numpy()
            i = len(steps) - 1 if step == "last" else int(np.argmin(np.abs(steps - int(step))))
            return _finite(table.iloc[i, layer]), float(steps[i])
    last = (run.divergence or {}).get("last_probe/attn_logit_max")
    if last is not None:
        return _finite(np.atleast_1d(last)[layer]), float(run.divergence["step"])
    return math.nan, math.nan


# seismo.models names the MLP's input kernel 'up' (its gate, for GLUs, is 'gate'); scanned
# blocks stack it under 'blocks' (a list per layer), unscanned ones under 'block_0'.
_FIRST_MLP = re.compile(r"^grad_rms/(blocks|block_0)/mlp/up/kernel$")


def first_mlp_grad_key(columns: Sequence[str]) -> str | None:
    """The probe column of the gradient RMS of block 0's first MLP kernel (Wortsman Fig. 11)."""
    return next((str(c) for c in columns if _FIRST_MLP.match(str(c))), None)


def first_mlp_grad_rms(run: Run, window: int = GRAD_RMS_WINDOW) -> float:
    """Gradient RMS of block 0's first MLP kernel, averaged over the probe rows of the last
    `window` steps (at least the last row)."""
    df = run.probes
    key = first_mlp_grad_key(list(df.columns))
    if key is None:
        return math.nan
    values = run.per_layer(key)[0]
    if not len(values):
        return math.nan
    recent = values[values.index >= values.index.max() - window]
    return float(np.nanmean(recent.to_numpy())) if np.isfinite(recent.to_numpy()).any() else math.nan


def final_probe(run: Run, metric: str) -> float:
    df = run.probes
    if metric not in df or not len(df):
        return math.nan
    return _finite(df[metric].dropna().iloc[-1]) if df[metric].notna().any() else math.nan


@functools.lru_cache(maxsize=256)
def _param_counts(model_yaml: str) -> tuple[float, float]:
    try:
        from seismo import config as config_lib
        from seismo.models import param_count
    except ImportError:
        return math.nan, math.nan
    try:
        cfg = config_lib.from_dict({"model": yaml.safe_load(model_yaml)}, origin="config.yaml")
        return float(param_count(cfg.model, non_embedding=True)), float(param_count(cfg.model))
    except Exception:  # an old or foreign config: the count is a convenience, not a requirement
        return math.nan, math.nan


def param_counts(config: Mapping[str, Any]) -> tuple[float, float]:
    """(non-embedding, total) parameter counts of a run's model; Wortsman et al. report the
    non-embedding count (Kaplan convention). NaN when seismo.models cannot count them."""
    return _param_counts(yaml.safe_dump(dict(config.get("model") or {}), sort_keys=True))


def run_summary(run: Run, logit_step: int | str = "last") -> dict[str, Any]:
    """The per-run columns of results.csv."""
    logit, logit_at = attn_logit_at(run, logit_step)
    n_params, n_total = param_counts(run.config)
    return {
        "run": run.name,
        "status": run.status,
        "final_eval_loss": run.final_eval_loss,
        "loss_at_init": run.loss_at_init,
        "diverged": run.diverged,
        "diverged_step": run.diverged_step if run.diverged_step is not None else math.nan,
        "last_step": run.last_step,
        "attn_logit_max_l0": logit,
        "attn_logit_step": logit_at,
        "logz_mean": final_probe(run, "logz_mean"),
        "grad_rms_mlp0": first_mlp_grad_rms(run),
        "n_params": n_params,
        "n_params_total": n_total,
        "run_dir": str(run.path),
    }


# --------------------------------------------------------------------------- sweeps


@dataclass
class Sweep:
    """A sweep directory: its spec (when sweep.yaml is there), its runs, results and summary."""

    path: Path
    spec: Any  # seismo.sweep.SweepSpec or None
    grid_keys: list[str]
    runs: dict[str, Run] = field(repr=False)
    results: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)

    def run(self, name: str) -> Run:
        return self.runs[name]


def _spec_of(sweep_dir: Path) -> Any:
    from seismo.config.sweepfile import load_sweep_spec

    path = sweep_dir / SPEC_FILE
    if not path.exists():
        return None
    if rundir.is_remote(path):  # read from the store into a local copy that the sweep-file reader opens
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / SPEC_FILE
            local.write_text(path.read_text())
            return load_sweep_spec(local, validate=False)
    return load_sweep_spec(path, validate=False)


def _infer_grid(runs: Mapping[str, Run]) -> dict[str, dict[str, Any]]:
    """Without sweep.yaml: the dotted config keys whose values differ between runs."""
    flat: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        flat[name] = {f"{s}.{k}": v for s, sec in run.config.items() if isinstance(sec, Mapping)
                      for k, v in sec.items()}
    keys = sorted({k for d in flat.values() for k in d})
    varying = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in flat.values()}) > 1]
    return {name: {k: d.get(k) for k in varying} for name, d in flat.items()}


def collect_results(sweep_dir: PathLike, spec: Any = None, logit_step: int | str | None = None,
                    write: bool = True) -> pd.DataFrame:
    """One row per run of a sweep: the grid values (one column per grid key), then the
    columns of `run_summary`. Points that have not started get status 'missing'.

    `spec` defaults to the sweep directory's sweep.yaml; without one the grid keys are the
    config keys whose values differ between runs. `logit_step` defaults to the spec's
    report.logit_step ('last'). Writes results.csv and summary.csv (LR sensitivity per group
    of all grid keys but the LR and the seed) into the sweep directory when `write`."""
    return _collect(rundir.path(sweep_dir), spec, logit_step, write)[0]


def _collect(sweep_dir: Path, spec: Any, logit_step: int | str | None,
             write: bool) -> tuple[pd.DataFrame, list[str], dict[str, Run]]:
    from seismo.config.sweepfile import expand

    spec = spec if spec is not None else _spec_of(sweep_dir)
    if logit_step is None:
        logit_step = spec.report.logit_step if spec is not None else "last"
    if spec is not None:
        keys = spec.grid_keys
        grid = {p.name: p.values for p in expand(spec, validate=False)}
        runs = {name: load_run(sweep_dir / RUNS_DIR / name) for name in grid
                if (sweep_dir / RUNS_DIR / name / CONFIG_FILE).exists()}
    else:
        found = sorted((sweep_dir / RUNS_DIR).iterdir()) if (sweep_dir / RUNS_DIR).is_dir() else []
        runs = {p.name: load_run(p) for p in found if (p / CONFIG_FILE).exists()}
        grid = _infer_grid(runs)
        keys = sorted({k for g in grid.values() for k in g})
    rows = []
    for name, values in grid.items():
        summary = (run_summary(runs[name], logit_step) if name in runs
                   else {"run": name, "status": "missing", "run_dir": str(sweep_dir / RUNS_DIR / name)})
        rows.append({**values, **summary})
    results = pd.DataFrame(rows)
    if write:
        rundir.write_atomic(sweep_dir / RESULTS_FILE, results.to_csv(index=False))
        lr_key = spec.report.lr_key if spec is not None else "optimizer.lr"
        rundir.write_atomic(sweep_dir / SUMMARY_FILE, summarize(results, keys, lr_key).to_csv(index=False))
    return results, list(keys), runs


def summarize(results: pd.DataFrame, grid_keys: Sequence[str], lr_key: str = "optimizer.lr") -> pd.DataFrame:
    """LR sensitivity per group (every grid key except the LR and the seed), with the mean
    parameter count of the group. Empty when the grid does not sweep the LR."""
    if lr_key not in results or "final_eval_loss" not in results:
        return pd.DataFrame()
    group = [k for k in grid_keys if k not in (lr_key, SEED_KEY)]
    started = results[results["status"] != "missing"] if "status" in results else results
    table = sensitivity_table(started, group_by=group, lr_key=lr_key)
    if "n_params" in started and group:
        counts = started.groupby(group, sort=False, dropna=False)["n_params"].mean().reset_index()
        table = table.merge(counts, on=group, how="left")
    elif "n_params" in started:
        table["n_params"] = started["n_params"].mean()
    return table


def load_sweep(path: PathLike, logit_step: int | str | None = None) -> Sweep:
    """Read a sweep directory (written by `seismo sweep`): spec, runs, results, summary.
    Nothing is written; `collect_results` writes results.csv and summary.csv."""

    path = rundir.path(path)
    if not (path / RUNS_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a sweep directory: it has no {RUNS_DIR}/ folder")
    spec = _spec_of(path)
    results, keys, runs = _collect(path, spec, logit_step, write=False)
    lr_key = spec.report.lr_key if spec is not None else "optimizer.lr"
    return Sweep(path=path, spec=spec, grid_keys=list(keys), runs=runs, results=results,
                 summary=summarize(results, keys, lr_key))
