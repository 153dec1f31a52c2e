"""Offline analysis of a run's checkpoints: `seismo analyze RUN_DIR` and `probe` for notebooks.

    analyze_run("runs/tiny")                     # every checkpoint -> runs/tiny/analysis/*.csv
    analyze_run("runs/tiny", probes=["massive"]) # one table only
    fit_massive_dynamics_table("runs/tiny")      # Eq. 9 per layer -> analysis/massive_fit.csv
    tables = probe(model, params, tokens_BxT)    # the same tables for any params and batch

Every saved checkpoint is evaluated on the run's fixed evaluation set (the first N sequences
of `data.eval_set()`, N = `eval_sequences`, default 16) by ONE compiled function: the params are
its argument, and all statistics are computed on the taps inside it (tables.py), so full
activations never leave the device. Only the CETT-PPL search loops on the host, around a
second compiled function (the eval loss under neuron thresholds), after one pass that brings
each layer's neuron-output norms to the host and sorts them (sparsity.cett_curve).

Tables (RUN_DIR/analysis/<group>.csv, tidy: one row per step, layer, head and metric; layer
or head empty where it does not apply; columns in `tables.columns(group)`), chosen by `probes`:
    massive     massive activations of the residual stream (Sun et al. 2024, arXiv 2402.17762)
    sparsity    MLP zero and dead fractions, CETT-PPL-1% (Luo et al. 2024, arXiv 2411.02335)
    outliers    kurtosis and infinity norms (Bondarenko et al. 2023, arXiv 2306.12929)
    attention   entropy, sinks, max logit per head (Zhai et al. 2023; Gu et al. 2024)
    weights     condition number, effective rank of 2-D weights (Ludwig 2025, arXiv 2506.16289)
    rank        rank-collapse residual of the residual stream (Dong et al. 2021, arXiv 2103.03404)
    activation  learnable activation parameters
Definitions, units and sources: docs/analysis.md.

Re-running is incremental: analysis/done.json records which (group, step) pairs are written
and the settings they were computed with; only missing pairs are computed, their rows
appended. Rows of steps that done.json does not list (an interrupted run) are dropped first.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd

from seismo import config as config_lib
from seismo import data as data_lib
from seismo import models, rundir
from seismo.config import ConfigError
from seismo.instrument import tables
from seismo.instrument.dynamics_fit import fit_massive_dynamics
from seismo.instrument.stats import SINK_EPS
from seismo.instrument.tables import GROUPS, check_groups, columns
from seismo.rundir import ANALYSIS_DIR, CHECKPOINTS_DIR, CONFIG_FILE
from seismo.train.checkpoint import Checkpointer
from seismo.train.checkpoint import flat_checksums as checkpoint_checksums
from seismo.train.ownership import RunLock

DEFAULT_EVAL_SEQUENCES = 16
DONE_FILE = "done.json"
FIT_FILE = "massive_fit.csv"
FIT_COLUMNS = ("layer", "metric", "n_points", "A", "lam", "gamma", "t0", "K", "r2", "t_peak", "flags", "error")
_FORMAT = 1

__all__ = ["DEFAULT_EVAL_SEQUENCES", "GROUPS", "analyze_run", "fit_massive_dynamics_table", "probe",
           "read_table"]


# --------------------------------------------------------------------------- one batch, any params


def _as_batch(tokens: Any, targets: Any = None, loss_mask: Any = None) -> dict[str, jax.Array]:
    """{'inputs', 'targets', 'loss_mask'} from a batch dict or a token array. Without targets the
    next token is the target and the last position is masked out of the loss."""
    if isinstance(tokens, Mapping):
        targets = tokens.get("targets", targets)
        loss_mask = tokens.get("loss_mask", loss_mask)
        tokens = tokens["inputs"]
    inputs = jnp.asarray(tokens, jnp.int32)
    if inputs.ndim != 2:
        raise ValueError(f"tokens must be int [B, T], got shape {tuple(inputs.shape)}")
    if targets is None:
        targets = jnp.concatenate([inputs[:, 1:], jnp.zeros_like(inputs[:, :1])], axis=1)
        if loss_mask is None:
            loss_mask = jnp.ones(inputs.shape, jnp.float32).at[:, -1].set(0.0)
    if loss_mask is None:
        loss_mask = jnp.ones(inputs.shape, jnp.float32)
    return {"inputs": inputs, "targets": jnp.asarray(targets, jnp.int32),
            "loss_mask": jnp.asarray(loss_mask, jnp.float32)}


def _compute(model: Any, params: Any, batch: Mapping[str, jax.Array], groups: tuple[str, ...],
             top_k: int, sink_eps: float, cett_p: float | None) -> dict[str, pd.DataFrame]:
    out = tables.stats_fn(model, groups, top_k, sink_eps)(params, batch["inputs"])
    acts = out.pop("_acts", None)
    cett = None
    if "sparsity" in groups and cett_p:
        cett = tables.cett_stats(model, params, batch, acts, p=cett_p)
    return tables.frames(jax.device_get(out), groups, model, cett)


def probe(model: Any, params: Any, tokens: Any, probes: Iterable[str] | str | None = None, *,
          targets: Any = None, loss_mask: Any = None, top_k: int = 5, sink_eps: float = SINK_EPS,
          cett_p: float | None = 0.01) -> dict[str, pd.DataFrame]:
    """The per-checkpoint statistics of `params` on `tokens`, without a run directory.

    `tokens`: int [B, T] or a batch dict {'inputs', 'targets'[, 'loss_mask']}; without targets
    the CETT loss predicts each next token (the last position is masked). `probes`: group
    names (`GROUPS`; default all). Returns {group: DataFrame} with the columns of the analysis
    tables except 'step'. `cett_p=None` skips the CETT-PPL search (the only host loop).
    Shapes and groups compile once and are cached, so calling it over many params is cheap.
    """
    groups = check_groups(probes)
    return _compute(model, params, _as_batch(tokens, targets, loss_mask), groups, top_k, sink_eps, cett_p)


# --------------------------------------------------------------------------- the run directory


def read_table(run_dir: str | os.PathLike, name: str) -> pd.DataFrame:
    """RUN_DIR/analysis/<name>.csv with its column types (nullable integers for layer, head, ...)."""
    path = rundir.path(run_dir) / ANALYSIS_DIR / f"{name}.csv"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.csv")) if path.parent.exists() else []
        raise FileNotFoundError(f"{path} does not exist (tables there: {', '.join(have) or 'none'}); "
                                f"run `seismo analyze {run_dir}` first")
    return _read_csv(path)


def _read_csv(path: Path) -> pd.DataFrame:
    dtypes = {c: ("Int64" if c in tables.INT_COLUMNS else object) for c in tables.INT_COLUMNS | tables.STR_COLUMNS}
    return pd.read_csv(_csv_source(path), dtype={**dtypes, "value": "float64"})


def _csv_source(path: Path) -> Any:
    """What pandas reads a table from: the path itself, or the text of an object on a store
    (read through the run directory's own filesystem, so it sees what was just written)."""
    return io.StringIO(path.read_text()) if rundir.is_remote(path) else path


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    if rundir.is_remote(path):
        rundir.write_atomic(path, df.to_csv(index=False))
    else:
        df.to_csv(path, index=False)


@dataclasses.dataclass
class _Done:
    """analysis/done.json: the settings the tables were computed with and, per group, the steps done."""

    path: Path
    settings: dict[str, Any]
    steps: dict[str, list[int]]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # step -> why it could not be read

    @classmethod
    def load(cls, path: Path) -> _Done:
        if not path.exists():
            return cls(path, {}, {})
        raw = json.loads(path.read_text())
        return cls(path, dict(raw.get("settings", {})), {k: list(v) for k, v in raw.get("steps", {}).items()},
                   dict(raw.get("skipped", {})))

    def save(self) -> None:
        rundir.write_atomic(self.path, json.dumps({"format": _FORMAT, "settings": self.settings,
                                                   "steps": self.steps, "skipped": self.skipped}, indent=1))

    def has(self, group: str, step: int) -> bool:
        return step in self.steps.get(group, ())

    def mark(self, step: int, groups: Iterable[str]) -> None:
        for g in groups:
            self.steps[g] = sorted({*self.steps.get(g, []), step})


def _settings(done: _Done, eval_sequences: int | None, top_k: int, sink_eps: float,
              cett_p: float | None) -> dict[str, Any]:
    want = {"eval_sequences": eval_sequences or done.settings.get("eval_sequences", DEFAULT_EVAL_SEQUENCES),
            "top_k": top_k, "sink_eps": sink_eps, "cett_p": cett_p}
    if done.steps and any(done.steps.values()):
        clash = {k: (done.settings.get(k), v) for k, v in want.items() if done.settings.get(k) != v}
        if clash:
            what = ", ".join(f"{k}={old} (now {new})" for k, (old, new) in clash.items())
            raise ConfigError(f"{done.path.parent} was computed with {what}; analyse with the same settings, "
                              f"or delete {done.path.parent} to start over")
    return want


def _drop_unfinished_rows(folder: Path, done: _Done) -> None:
    """Remove rows of steps that done.json does not list (a run interrupted after appending)."""
    for group in GROUPS.ordered():
        path = folder / f"{group}.csv"
        if not path.exists():
            continue
        df = _read_csv(path)
        keep = df["step"].isin(done.steps.get(group, []))
        if not keep.all():
            _write_csv(path, df[keep])


FLUSH_SECONDS = 10.0  # tables computed for this long are appended at once (and at the end)


def _append(path: Path, parts: list[tuple[int, pd.DataFrame]], group: str) -> None:
    """The rows of several checkpoints, [(step, frame)], appended to one table in one write:
    the per-write cost of pandas and of the file is paid once, not once per checkpoint."""
    frames = [f.assign(step=step) for step, f in parts if len(f)] or [parts[0][1].assign(step=parts[0][0])]
    df = pd.concat(frames, ignore_index=True)
    df = tables.typed(df[list(columns(group))])
    if rundir.is_remote(path):  # an object store has no appends: rundir reads and rewrites it
        rundir.append_text(path, df.to_csv(header=not path.exists(), index=False))
    else:
        df.to_csv(path, mode="a", header=not path.exists(), index=False)


def _abstract_params(model: Any, seq_len: int) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, seq_len), jnp.int32))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def _restore_params(ckpt: Checkpointer, step: int, abstract: Any) -> Any:
    """Only the params of the saved TrainState (Orbax partial restore), onto one device,
    checked against the checksums saved with them (ValueError when they differ)."""
    item = {"params": abstract}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                          partial_restore=True), record=ocp.args.JsonRestore())
    out = ckpt.manager.restore(step, args=args)
    params = out["state"]["params"]
    saved = (out["record"] or {}).get("checksums")
    if saved is not None:  # keyed as in the saved TrainState: .params[...]
        got = checkpoint_checksums(params, prefix=(jax.tree_util.GetAttrKey("params"),))
        bad = [k for k, v in got.items() if saved.get(k) != v]
        if bad:
            raise ValueError(f"{len(bad)} parameter array(s) do not match their saved checksums, e.g. {bad[:2]}")
    return params


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ckpt", disable=not enabled, dynamic_ncols=True)


def analyze_run(run_dir: str | os.PathLike, probes: Iterable[str] | str | None = None,
                eval_sequences: int | None = None, *, top_k: int = 5, sink_eps: float = SINK_EPS,
                cett_p: float | None = 0.01, progress: bool = True) -> Path:
    """Analyse every saved checkpoint of `run_dir` and append the tables to RUN_DIR/analysis/.

    probes: table groups to compute, any of massive, sparsity, outliers, attention, weights,
        rank, activation (default: all); an unknown name raises `ConfigError` listing them.
    eval_sequences: N, the first N sequences of the run's fixed evaluation set (default: what
        an earlier analysis of this run used, else 16).
    top_k: top activations per layer in massive.csv; sink_eps: sink-head threshold (Gu et al.
        0.3); cett_p: the p of CETT-PPL-p% (Sparsing Law default 0.01; None skips the search).
    Checkpoints and groups already analysed (analysis/done.json) are skipped; settings that
    differ from the recorded ones raise `ConfigError`. Returns the analysis directory.
    """
    groups = check_groups(probes)
    run_dir = rundir.path(run_dir)  # a local folder or a gs:// URL
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    if not (run_dir / CHECKPOINTS_DIR).is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ folder: nothing to analyse")
    if eval_sequences is not None and eval_sequences < 1:
        raise ConfigError(f"eval_sequences must be >= 1, got {eval_sequences}")
    cfg = config_lib.load(run_dir / CONFIG_FILE)
    with RunLock(run_dir, "seismo analyze"):  # one writer: not while a training writes checkpoints
        return _analyze(run_dir, cfg, groups, eval_sequences, top_k, sink_eps, cett_p, progress)


def _analyze(run_dir: Path, cfg: Any, groups: tuple[str, ...], eval_sequences: int | None, top_k: int,
             sink_eps: float, cett_p: float | None, progress: bool) -> Path:
    folder = run_dir / ANALYSIS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    done = _Done.load(folder / DONE_FILE)
    done.settings = _settings(done, eval_sequences, top_k, sink_eps, cett_p)
    _drop_unfinished_rows(folder, done)

    ckpt = Checkpointer(run_dir / CHECKPOINTS_DIR, async_save=False)
    todo = [(s, tuple(g for g in groups if not done.has(g, s))) for s in ckpt.steps()]
    todo = [(s, gs) for s, gs in todo if gs]
    if not todo:
        ckpt.close()
        done.save()
        return folder
    model = models.build(cfg.model)
    n = done.settings["eval_sequences"]
    ev = data_lib.build(dataclasses.replace(cfg.data, eval_sequences=n), cfg.run.seed).eval_set()
    batch = _as_batch(ev)
    abstract = _abstract_params(model, cfg.data.seq_len)
    computed: dict[str, list[tuple[int, pd.DataFrame]]] = {}  # tables not yet written
    marks: list[tuple[int, tuple[str, ...]]] = []  # and the (step, groups) they complete

    def flush() -> None:  # write them, then record them as done (a kill between redoes them)
        for group, parts in computed.items():
            _append(folder / f"{group}.csv", parts, group)
        for step, pending in marks:
            done.mark(step, pending)
        if computed or marks:
            done.save()
        computed.clear()
        marks.clear()

    last_flush = time.perf_counter()
    # The next checkpoint is read (Orbax: files, deserialisation, checksums) on a thread while
    # this one is analysed; one read at a time, in order, each one's error raised here.
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seismo-restore")
    read = lambda i: reader.submit(_restore_params, ckpt, todo[i][0], abstract) if i < len(todo) else None
    try:
        with _progress(len(todo), f"analyze {run_dir.name}", progress) as bar:
            ahead = read(0)
            for i, (step, pending) in enumerate(todo):
                bar.set_postfix(step=step)
                this, ahead = ahead, read(i + 1)
                try:
                    params = this.result()
                except Exception as e:  # noqa: BLE001 - a bad checkpoint is skipped, named, and the rest analysed
                    reason = f"{type(e).__name__}: {str(e)[:300]}"
                    warnings.warn(f"{run_dir}: checkpoint {step} skipped, it cannot be read ({reason})", stacklevel=2)
                    done.skipped[str(step)] = reason
                    done.save()
                    bar.update(1)
                    continue
                done.skipped.pop(str(step), None)
                with _one_blas_thread():
                    tables_now = _compute(model, params, batch, pending, top_k, sink_eps, cett_p)
                for group, df in tables_now.items():
                    computed.setdefault(group, []).append((step, df))
                marks.append((step, pending))
                if time.perf_counter() - last_flush > FLUSH_SECONDS:
                    flush()
                    last_flush = time.perf_counter()
                bar.update(1)
        flush()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)  # no read left running when the files close
        ckpt.close()
    return folder


def _one_blas_thread() -> Any:
    """On a CPU backend, OpenBLAS (scipy's, which serves XLA:CPU's LAPACK calls: the weight
    SVDs) limited to one thread while a checkpoint is analysed. Its threads otherwise spin
    against XLA's own on the same cores: on 2 cores the `weights` group's SVDs took 13-940 ms
    of CPU per call instead of 10-11 ms (benchmarks/RESULTS.md). Elsewhere: no limit."""
    import contextlib

    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------- Eq. 9 across checkpoints


def fit_massive_dynamics_table(run_dir: str | os.PathLike, metric: str = "ratio_seq_mean",
                               min_points: int = 6) -> Path:
    """Fit Eq. 9 of Gallego-Feliciano et al. 2025 (arXiv 2508.03616) per layer to `metric` of
    analysis/massive.csv over checkpoints; write analysis/massive_fit.csv (one row per layer:
    FIT_COLUMNS, parameters in steps and ratio units) and return its path. Layers with fewer
    than `min_points` checkpoints (finite values) are skipped; 'flags' lists the fit's flags
    (DynamicsFit.flags, ';'-joined: ill_conditioned, at_bound, poor_fit, ...); a failed fit keeps
    its row with empty parameters and the reason in 'error'."""
    df = read_table(run_dir, "massive")
    sub = df[(df["metric"] == metric) & df["head"].isna() & df["rank"].isna()]
    if sub.empty:
        raise KeyError(f"analysis/massive.csv has no {metric!r} rows; metrics there: "
                       f"{', '.join(sorted(df['metric'].unique()))}")
    rows = []
    for layer, g in sub.groupby("layer"):
        g = g[np.isfinite(g["value"].to_numpy(float))].sort_values("step")
        if len(g) < min_points:
            continue
        row: dict[str, Any] = {"layer": int(layer), "metric": metric, "n_points": len(g), "error": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_massive_dynamics(g["step"].to_numpy(float), g["value"].to_numpy(float))
            row.update(A=fit.A, lam=fit.lam, gamma=fit.gamma, t0=fit.t0, K=fit.K, r2=fit.r2, t_peak=fit.t_peak,
                       flags=";".join(fit.flags), error=fit.error)
        except ValueError as e:  # a constant ratio
            row["error"] = str(e).splitlines()[0][:200]
        rows.append(row)
    path = rundir.path(run_dir) / ANALYSIS_DIR / FIT_FILE
    _write_csv(path, pd.DataFrame(rows, columns=list(FIT_COLUMNS)))
    return path
