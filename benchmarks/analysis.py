"""Checkpoint-analysis cost: `seismo analyze` time per checkpoint against one evaluation
forward pass over the same sequences (issue 4's benchmark; issue 10 item 7).

    .venv/bin/python benchmarks/analysis.py [--eval-sequences 16] [--checkpoints 9]
        [--variants all,all-no-cett,sparsity,sparsity-no-cett,massive,...] [--repeats 3]

Trains the tiny config (configs/tiny.yaml) just long enough to save `--checkpoints`
checkpoints, then, per variant (all groups or one group, with or without the CETT-PPL search),
times `analyze_run` on all of them and on the first two only: the difference divided by the
extra checkpoints is the marginal cost per checkpoint. Each variant first analyses a copy with
one checkpoint, untimed, so that compilation falls in neither timing. Wall and process CPU
time are both reported, and a jitted forward pass on the evaluation set (median of 20) timed
just before each pair, so that the ratio, the cost of a checkpoint's analysis in
eval-forward equivalents, compares timings taken under the same load. Each variant runs
`--repeats` times; the tables give the median over repeats. "all" minus "all-no-cett" is
the CETT-PPL search's share.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from seismo import config, data, models
from seismo.analysis.checkpoints import analyze_run
from seismo.instrument.tables import GROUPS
from seismo.train.checkpoint import Checkpointer
from seismo.train.loop import train


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - t, time.process_time() - c


def variants() -> dict[str, tuple[list[str] | None, float | None]]:
    """name -> (probes, cett_p)."""
    out: dict[str, tuple[list[str] | None, float | None]] = {"all": (None, 0.01), "all-no-cett": (None, None)}
    for group in GROUPS:
        out[group] = ([group], 0.01)
    out["sparsity-no-cett"] = (["sparsity"], None)
    return out


GOAL = 30.0  # issue 10 item 7: at most 30 eval-forward equivalents per checkpoint ("all", CETT search included)


def measure(eval_sequences: int = 16, checkpoints: int = 9, chosen: list[str] | None = None,
            repeats: int = 3) -> dict[str, np.ndarray]:
    """Print the table and return {variant: rows [repeats, 8]}: all-checkpoints and first-two
    wall (s), marginal wall and CPU per checkpoint (s), forward wall and CPU (s), and the
    marginal cost in forward passes, wall and CPU."""
    chosen = list(variants()) if chosen is None else chosen
    steps = 2 ** (checkpoints - 2)
    cfg = config.load("configs/tiny.yaml", [f"run.steps={steps}", f"run.checkpoint_log_until={steps}",
                                            f"run.checkpoint_every={steps}", "run.probe_every=0",
                                            "run.progress=off", "run.checkpoint_async=false"])
    root = Path(tempfile.mkdtemp())
    try:
        return _measure(cfg, root, eval_sequences, chosen, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(cfg, root: Path, eval_sequences: int, chosen: list[str], repeats: int) -> dict[str, np.ndarray]:
    train(cfg, root / "run")
    ckpt_steps = Checkpointer(root / "run" / "checkpoints").steps()
    n = len(ckpt_steps)

    # one evaluation forward pass (jitted, compiled first) on the same N sequences
    model = models.build(cfg.model)
    ev = data.build(cfg.data, cfg.run.seed).eval_set()
    tokens = jnp.asarray(ev["inputs"][:eval_sequences])
    params = model.init(jax.random.PRNGKey(0), tokens)
    fwd = jax.jit(lambda p, t: model.apply(p, t)[0])
    jax.block_until_ready(fwd(params, tokens))

    def forward_s() -> tuple[float, float]:
        runs = [timed(lambda: jax.block_until_ready(fwd(params, tokens))) for _ in range(20)]
        return float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs]))

    def copy(name: str, keep: int) -> Path:
        d = root / f"copy_{name}_{keep}"
        shutil.copytree(root / "run", d)
        for s in ckpt_steps[keep:]:
            shutil.rmtree(d / "checkpoints" / str(s))
        return d

    print(f"tiny model, {eval_sequences} eval sequences x {cfg.data.seq_len} tokens, {n} checkpoints {ckpt_steps}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| analysis | all checkpoints (s) | first 2 (s) | marginal per checkpoint, wall (s) | CPU (s) "
          "| one forward pass, wall / CPU (ms) | x forward pass, wall | CPU |")
    print("|---|---|---|---|---|---|---|---|")
    per_ckpt = {}
    for name in chosen:
        probes, cett_p = variants()[name]
        kw = dict(probes=probes, eval_sequences=eval_sequences, cett_p=cett_p, progress=False)
        analyze_run(copy(name, 1), **kw)  # compiles: untimed
        rows = []
        for r in range(repeats):
            fwd_wall, fwd_cpu = forward_s()
            (all_w, all_c), (two_w, two_c) = (timed(analyze_run, copy(f"{name}_{r}", keep), **kw) for keep in (n, 2))
            wall, cpu = (all_w - two_w) / (n - 2), (all_c - two_c) / (n - 2)
            rows.append((all_w, two_w, wall, cpu, fwd_wall, fwd_cpu, wall / fwd_wall, cpu / fwd_cpu))
        all_w, two_w, wall, cpu, fwd_wall, fwd_cpu, x_wall, x_cpu = np.median(np.array(rows), axis=0)
        per_ckpt[name] = np.array(rows)
        print(f"| {name} | {all_w:.2f} | {two_w:.2f} | {wall:.3f} | {cpu:.3f} | {fwd_wall * 1e3:.1f} / {fwd_cpu * 1e3:.1f} "
              f"| {x_wall:,.1f} | {x_cpu:,.1f} |", flush=True)
    print()
    for base in ("all", "sparsity"):
        if base in per_ckpt and f"{base}-no-cett" in per_ckpt:
            d = per_ckpt[base] - per_ckpt[f"{base}-no-cett"]  # repeat r of one minus repeat r of the other
            w, c, xw, xc = np.median(d[:, [2, 3, 6, 7]], axis=0)
            print(f"CETT-PPL search ({base} - {base}-no-cett, median over repeats): {w:.3f} s wall, {c:.3f} s CPU "
                  f"per checkpoint = {xw:.1f} / {xc:.1f} forward passes\n")
    return per_ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-sequences", type=int, default=16)
    ap.add_argument("--checkpoints", type=int, default=9, help="log-spaced: 0, 1, 2, 4, ... (at least 3)")
    ap.add_argument("--variants", default=",".join(variants()), help="comma-separated, from: %(default)s")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in variants()]
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {', '.join(variants())}")
    measure(args.eval_sequences, args.checkpoints, chosen, args.repeats)


if __name__ == "__main__":
    main()
