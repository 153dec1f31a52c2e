"""`seismo report DIR`: figures/*.png and report.md for a run directory or a sweep directory.

A sweep report follows Wortsman et al. 2023 (arXiv 2309.14322): the LR-vs-loss curves and LR
sensitivity vs size (Fig. 1), loss and layer-0 max attention logit for a pair of runs (Fig. 2),
log Z (Fig. 4), the max-logit extrapolation (Fig. 9) and gradient RMS (Fig. 11), with the
summary table. A run report shows its loss, log Z and per-layer probe metrics over steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seismo import rundir
from seismo.analysis import figures
from seismo.analysis.extrapolate import extrapolate_logits
from seismo.analysis.runs import Run, _collect, _spec_of, load_run, summarize
from seismo.config.sweepfile import format_value
from seismo.rundir import FIGURES_DIR

REPORT_FILE = "report.md"
HEATMAP_METRICS = ("attn_logit_max", "resid_rms", "attn_entropy", "attn_sink_mass", "mlp_zero_frac")


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A pandas table as GitHub markdown (numbers to 4 significant digits, NaN as '–')."""
    cols = [c for c in (columns or df.columns) if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


class _Doc:
    """report.md being written, and the figures it embeds."""

    def __init__(self, folder: Path):
        self.folder, self.lines = folder, []
        (folder / FIGURES_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, name: str, caption: str, make: Any) -> None:
        """Draw with `make(path)`; a figure that cannot be drawn is named, not fatal."""
        path = self.folder / FIGURES_DIR / f"{name}.png"
        try:
            fig = make(path)
        except (KeyError, ValueError, IndexError) as e:
            self.add(f"*{name}: not drawn ({e}).*", "")
            return
        self.add(f"![{caption}]({FIGURES_DIR}/{name}.png)", "", f"*{caption}*", "")
        for note in figures.figure_notes(fig) if fig is not None else []:
            self.add(note, "")

    def write(self) -> Path:
        path = self.folder / REPORT_FILE
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        return path


def report(path: str | os.PathLike[str]) -> Path:
    """Write figures/*.png and report.md into a run or sweep directory; returns report.md."""
    from seismo.config.sweepfile import RUNS_DIR, SPEC_FILE

    path = rundir.path(path)  # a local folder or a gs:// URL
    if (path / SPEC_FILE).exists() or (path / RUNS_DIR).is_dir():
        return sweep_report(path)
    if (path / rundir.CONFIG_FILE).exists():
        return run_report(path)
    raise FileNotFoundError(f"{path} is neither a run directory (config.yaml) nor a sweep directory "
                            f"({SPEC_FILE} or {RUNS_DIR}/)")


write_report = report


def _pick_pair(results: pd.DataFrame, runs: dict[str, Run], spec: Any) -> dict[str, Run]:
    """The runs of the report.pair selectors; by default the runs with the highest and the
    lowest layer-0 max logit (the calmest and the most violent of the sweep)."""
    from seismo.config.sweepfile import matches

    keys = spec.grid_keys if spec is not None else []
    chosen: list[str] = []
    if spec is not None and spec.report.pair:
        for sel in spec.report.pair:
            chosen += [r["run"] for _, r in results.iterrows()
                       if r["run"] in runs and matches({k: r[k] for k in keys}, sel)][:3]
    else:
        have = results[results["run"].isin(list(runs)) & np.isfinite(results.get("attn_logit_max_l0", np.nan))]
        if len(have):
            ordered = have.sort_values("attn_logit_max_l0")["run"].tolist()
            chosen = list(dict.fromkeys([ordered[-1], ordered[0]]))
        else:
            chosen = list(runs)[:2]
    return {name: runs[name] for name in dict.fromkeys(chosen)}


def sweep_report(sweep_dir: Path) -> Path:
    spec = _spec_of(sweep_dir)
    results, keys, runs = _collect(sweep_dir, spec, None, write=True)
    lr_key = spec.report.lr_key if spec is not None else "optimizer.lr"
    summary = summarize(results, keys, lr_key)
    doc = _Doc(sweep_dir)
    name = spec.name if spec is not None else sweep_dir.name
    counts = results["status"].value_counts().to_dict()
    doc.add(f"# Sweep report: {name}", "")
    if spec is not None and spec.description:
        doc.add(spec.description, "")
    doc.add(f"{len(results)} points over {', '.join(keys) or 'no grid keys'}; "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
            "", "Tables: `results.csv` (one row per run) and `summary.csv` (LR sensitivity per group).", "")
    started = results[results["status"] != "missing"]
    if not len(started):
        doc.add("No run has started yet.")
        return doc.write()
    if len(summary):
        doc.add("## LR sensitivity", "",
                "Mean over the LR grid of min(final loss, loss at init) minus the best loss "
                "(Wortsman et al. 2023, §2.2); a diverged run counts as its loss at init.", "",
                markdown_table(summary), "")
    if lr_key in keys:
        doc.add("## Final loss vs learning rate", "")
        doc.figure("lr_vs_loss", "Final eval loss vs peak LR; x: diverged (at loss at init); hollow: unfinished",
                   lambda p: figures.lr_vs_loss(results, lr_key, keys, path=p))
        if "n_params" in summary and figures.n_sizes(started, lr_key, keys) > 1:
            doc.figure("lr_sensitivity", "LR sensitivity vs non-embedding parameters",
                       lambda p: figures.sensitivity_vs_params(summary, results, lr_key, keys, path=p))
        elif len(summary) > 1:
            doc.add(f"LR sensitivity vs model size is not drawn: this sweep has {figures.one_size_text(started)}; "
                    "the table above gives the LR sensitivity of each group.", "")
    pair = _pick_pair(results, runs, spec)
    if pair:
        doc.add("## Runs over training", "")
        named = "; ".join(figures.run_labels(pair).values())
        doc.figure("pair_traces", "Training loss and layer-0 max attention logit: " + named,
                   lambda p: figures.pair_traces(pair, path=p))
        doc.figure("logz", "Training loss and mean log Z of the output logits: " + named,
                   lambda p: figures.logz_traces(pair, path=p))
    _extrapolation_section(doc, started, keys, lr_key, spec)
    if lr_key in keys and np.isfinite(started.get("grad_rms_mlp0", pd.Series(dtype=float)).astype(float)).any():
        eps = _common(runs, "optimizer.eps")
        doc.add("## Gradient RMS", "")
        doc.figure("grad_rms", "Gradient RMS of block 0's first MLP kernel, mean over the last 500 steps",
                   lambda p: figures.grad_rms(started, lr_key, eps if isinstance(eps, float) else None, keys, path=p))
    cols = [*keys, "status", "final_eval_loss", "loss_at_init", "diverged_step", "attn_logit_max_l0",
            "logz_mean", "grad_rms_mlp0", "n_params"]
    doc.add("## All runs", "", markdown_table(results, cols), "")
    return doc.write()


def _common(runs: dict[str, Run], key: str) -> Any:
    values = {repr(r.get(key)) for r in runs.values()}
    return next(iter(runs.values())).get(key) if len(values) == 1 and runs else None


def _extrapolation_section(doc: _Doc, results: pd.DataFrame, keys: list[str], lr_key: str, spec: Any) -> None:
    if lr_key not in keys or "n_params" not in results:
        return
    have = results[np.isfinite(results["attn_logit_max_l0"].astype(float))]
    if not len(have):  # no probe rows (run.probe_every 0): no max logit to extrapolate
        return
    sizes, interventions = figures.split_keys(results, lr_key, keys)
    per_group = have.groupby(interventions)["n_params"].nunique() if interventions else have["n_params"].nunique()
    if int(np.max(per_group)) < 2:  # an intervention may add a few parameters; that is not a second size
        doc.add("## Seeing instability coming", "",
                "The max-logit extrapolation (Wortsman et al. 2023, Fig. 9) needs at least two model sizes "
                "in the grid (e.g. `model: [proxy_256, proxy_384]`); this sweep has one.", "")
        return
    step = spec.report.logit_step if spec is not None else "last"
    biggest = float(have["n_params"].max())
    fits = extrapolate_logits(have, None, [10 * biggest, 100 * biggest], lr_key=lr_key, group_by=interventions)
    doc.add("## Seeing instability coming", "",
            f"Layer-0 max attention logit at step {step} vs non-embedding parameters, fitted per LR with a "
            "quadratic in log-log space and extrapolated to 10x and 100x the largest model "
            "(Wortsman et al. 2023, Fig. 9; runs above 1e4 diverged there).", "")
    doc.figure("logit_extrapolation", "Max attention logit vs size: fits and extrapolations (stars)",
               lambda p: figures.logit_extrapolation(have, fits, lr_key, path=p))
    cols = [*interventions, lr_key, "n_sizes", "target_params", "predicted_logit", "crosses_threshold"]
    doc.add(markdown_table(fits, cols), "")


def run_report(run_dir: Path) -> Path:
    run = load_run(run_dir)
    doc = _Doc(run_dir)
    doc.add(f"# Run report: {run.name}", "")
    facts = {
        "status": run.status,
        "last step": f"{run.last_step} of {run.total_steps}",
        "loss at init": run.loss_at_init,
        "final eval loss": run.final_eval_loss,
        "diverged at step": run.diverged_step if run.diverged else "–",
        "model": ", ".join(f"{k}={format_value(run.get('model.' + k))}" for k in ("d_model", "n_layers", "n_heads", "attention",
                                                                    "qk_norm", "activation")),
        "optimizer": ", ".join(f"{k}={format_value(run.get('optimizer.' + k))}" for k in ("lr", "warmup_steps",
                                                                           "weight_decay", "eps")),
        "z-loss": run.get("loss.z_loss"),
    }
    doc.add("| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in facts.items()], "")
    if run.skipped_lines:
        doc.add(f"{run.skipped_lines} unreadable line(s) of metrics.jsonl skipped (a killed run).", "")
    for _, w in run.warnings.iterrows():
        doc.add(f"> step {w['step']}: {w['warning']}", "")
    doc.add("## Loss and output logits", "")
    doc.figure("loss_logz", "Training loss and mean log Z", lambda p: figures.logz_traces({run.name: run}, path=p))
    probes = run.probes
    if len(probes.columns) > 1:
        doc.add("## Probe metrics per layer", "")
    if "attn_logit_max" in probes:
        doc.figure("attn_logit_max_layers", "Max attention logit per layer",
                   lambda p: figures.layer_traces(run.per_layer("attn_logit_max"), "attn_logit_max",
                                                  title="Max attention logit per layer", path=p))
    for metric in HEATMAP_METRICS:
        if metric in probes:
            doc.figure(f"{metric}_heatmap", f"{metric}, step x layer",
                       lambda p, m=metric: figures.layer_heatmap(run.per_layer(m), m, path=p))
    massive = [t for t in run.analysis_tables() if "massive" in t]
    if massive:
        doc.add("## Massive activations", "")
        df = run.analysis(massive[0])
        if "metric" in df:  # the tidy format of seismo analyze: one row per (step, layer, metric)
            df = df[(df["metric"] == "ratio_seq_mean") & df["rank"].isna()]
        table, value = figures.long_to_step_layer(df, value="value" if "metric" in run.analysis(massive[0]) else None)
        value = "ratio_seq_mean" if value == "value" else value
        doc.figure("massive_ratio_heatmap", f"Top-1/median activation ratio ({value}) from analysis/{massive[0]}.csv",
                   lambda p: figures.layer_heatmap(table, value, title="Massive activations: top-1/median ratio",
                                                   log=True, log_steps=True, path=p))
    if run.analysis_tables():
        doc.add("Analysis tables: " + ", ".join(f"`analysis/{t}.csv`" for t in run.analysis_tables()), "")
    return doc.write()
