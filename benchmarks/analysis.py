"""Checkpoint-analysis cost: `seismo analyze` time per checkpoint against one evaluation
forward pass over the same sequences (issue 4's benchmark).

    .venv/bin/python benchmarks/analysis.py [--eval-sequences 16] [--checkpoints 9]

Trains the tiny config (configs/tiny.yaml) just long enough to save `--checkpoints`
checkpoints, then times `analyze_run` on all of them and on the first two only (the
difference divided by the extra checkpoints is the marginal cost per checkpoint, with
compilation excluded), per analysis group, and a jitted forward pass on the evaluation set.
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


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-sequences", type=int, default=16)
    ap.add_argument("--checkpoints", type=int, default=9, help="log-spaced: 0, 1, 2, 4, ... (at least 3)")
    args = ap.parse_args()
    steps = 2 ** (args.checkpoints - 2)
    cfg = config.load("configs/tiny.yaml", [f"run.steps={steps}", f"run.checkpoint_log_until={steps}",
                                            f"run.checkpoint_every={steps}", "run.probe_every=0",
                                            "run.progress=off", "run.checkpoint_async=false"])
    root = Path(tempfile.mkdtemp())
    train(cfg, root / "run")
    ckpt_steps = Checkpointer(root / "run" / "checkpoints").steps()
    n = len(ckpt_steps)

    # one evaluation forward pass (jitted, compiled first) on the same N sequences
    model = models.build(cfg.model)
    ev = data.build(cfg.data, cfg.run.seed).eval_set()
    tokens = jnp.asarray(ev["inputs"][: args.eval_sequences])
    params = model.init(jax.random.PRNGKey(0), tokens)
    fwd = jax.jit(lambda p, t: model.apply(p, t)[0])
    jax.block_until_ready(fwd(params, tokens))
    fwd_times = [timed(lambda: jax.block_until_ready(fwd(params, tokens))) for _ in range(20)]
    fwd_s = float(np.median(fwd_times))

    print(f"tiny model, {args.eval_sequences} eval sequences x {cfg.data.seq_len} tokens, {n} checkpoints {ckpt_steps}")
    print(f"one eval forward pass: {fwd_s * 1e3:.1f} ms (median of 20)")
    print("| analysis | all checkpoints (s) | first 2 (s) | marginal per checkpoint (s) | x forward pass |")
    print("|---|---|---|---|---|")
    for group in [None, *GROUPS]:
        totals = []
        for keep in (n, 2):
            d = root / f"copy_{group}_{keep}"
            shutil.copytree(root / "run", d)
            for s in ckpt_steps[keep:]:
                shutil.rmtree(d / "checkpoints" / str(s))
            totals.append(timed(analyze_run, d, probes=None if group is None else [group],
                                eval_sequences=args.eval_sequences, progress=False))
        per = (totals[0] - totals[1]) / (n - 2)
        print(f"| {group or 'all groups'} | {totals[0]:.1f} | {totals[1]:.1f} | {per:.2f} | {per / fwd_s:,.0f} |")


if __name__ == "__main__":
    main()
