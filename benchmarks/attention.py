"""CPU wall time of the attention implementations against the explicit one, in one run.

    python benchmarks/attention.py [--presets tiny,proxy_256] [--seq-lens 64,256,1024]
                                   [--impls explicit,blockwise,dot_product] [--steps 10] [--repeats 7]

For each preset and sequence length, seismo's jitted train step (`engine.train_step`, the
same for every implementation but `model.attention_impl`) runs on one pre-made device batch.
The implementations are interleaved inside each repeat in rotating order, so a load change
on a shared machine hits all alike; each repeat times `--steps` steps after a warm-up. The
ratio to `explicit` is paired per repeat: median [min, max]. This is what `auto`'s CPU
threshold (seismo.models.attention.CPU_EXPLICIT_MAX_T) was chosen from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from seismo import config as config_lib  # noqa: E402
from seismo.train import engine as engine_lib  # noqa: E402
from seismo.train import mesh as mesh_lib  # noqa: E402


def make(preset: str, T: int, impl: str, batch: int):
    overrides = [f"data.seq_len={T}", f"model.max_seq_len={max(T, 128)}", f"data.batch_size={batch}",
                 f"model.attention_impl={impl}", "run.probe_every=0", "run.steps=1000"]
    cfg = config_lib.load("tiny", overrides=([f"model={preset}"] if preset != "tiny" else []) + overrides)
    eng = engine_lib.build(cfg, mesh_lib.make_mesh(cfg.mesh))
    rng = np.random.default_rng(0)
    toks = rng.integers(1, cfg.model.vocab_size, (batch, T + 1)).astype(np.int32)
    batch_arrays = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, eng.batch_sharding)
    state = eng.init_state()
    return eng, state, batch_arrays


def run(eng, state, batch, steps: int):
    for _ in range(steps):
        state, metrics = eng.train_step(state, batch)
    jax.block_until_ready(metrics)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,proxy_256")
    p.add_argument("--seq-lens", default="")
    p.add_argument("--impls", default="explicit,blockwise,dot_product")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, backend {jax.default_backend()}")
    print("| preset | T | impl | ms/step (median) | / explicit: median [min, max] |")
    print("|---|---|---|---|---|")
    for preset in a.presets.split(","):
        default_T = config_lib.load("tiny").data.seq_len
        seq_lens = [int(t) for t in a.seq_lens.split(",")] if a.seq_lens else [default_T]
        for T in seq_lens:
            built = {}
            for impl in impls:
                eng, state, batch = make(preset, T, impl, a.batch)
                built[impl] = [eng, run(eng, state, batch, 2), batch]  # warm-up (compilation)
            times = {impl: [] for impl in impls}
            for r in range(a.repeats):
                order = impls[r % len(impls):] + impls[:r % len(impls)]
                for impl in order:
                    eng, state, batch = built[impl]
                    t0 = time.perf_counter()
                    built[impl][1] = run(eng, state, batch, a.steps)
                    times[impl].append((time.perf_counter() - t0) / a.steps * 1e3)
            for impl in impls:
                ratios = [x / e for x, e in zip(times[impl], times["explicit"])] if "explicit" in times else [1.0]
                print(f"| {preset} | {T} | {impl} | {statistics.median(times[impl]):.2f} | "
                      f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
