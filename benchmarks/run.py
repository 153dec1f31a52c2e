"""seismo benchmarks: seismo against an independent baseline, framework overhead, probe overhead,
and the layer-stacking choice.

    python benchmarks/run.py [all|throughput|overhead|probes|layers|fetch|analysis] [--presets tiny,proxy]
                             [--set model.scan_layers=false ...] [--steps N] [--repeats R] [--json out.json]

`all` runs throughput, overhead and probes as one measurement (every variant interleaved in the
same rounds, so all the ratios come from one run), then the checkpoint analysis's cost
(`analysis`: benchmarks/analysis.py's "all" and "all-no-cett" on tiny, in eval-forward
equivalents per checkpoint), and ends with the goals table: seismo's plain step and loop against
the independent baseline, probes every step and every 10 steps against the plain loop, and the
analysis's cost per checkpoint. `layers` times seismo's step scanned and unrolled at several depths
(compile time and step time; the measurement behind `model.scan_layers: auto`); `fetch` is a
diagnostic of the per-step metrics fetch.

Every number is a time per training step of an already compiled function: each variant
runs `--warmup` steps first (compilation included there), then `--repeats` timed rounds of
`--steps` steps each, ended with `jax.block_until_ready`. The variants of one preset are
interleaved inside each round (rotating order), so a load change hits all of them alike. Each
variant gets its wall time and the CPU time of this process per step (median [interquartile
range], min); ratios are paired per round and reported as median (bootstrap 95% interval of
the median) [interquartile range]. XLA's cost analysis (FLOPs and bytes, every loop iteration
counted: seismo.train.aot.cost_for_compiled) comes with the compiled steps.

Variants:
  base        the independent baseline (benchmarks/baseline.py: flax.linen + optax written
              from scratch, no seismo code, layers unrolled), its jitted step on one device
              batch made beforehand, nothing fetched
  base/loop   the baseline's training loop: a fresh numpy batch each step, the loss fetched
              every 10 steps
  hand        seismo's model (`seismo.models.build`) in a plain optax step (CE loss, the same
              AdamW chain as `base`): with `base` and `step` it splits seismo's cost into the
              model's and the step's
  step        seismo's jitted `engine.train_step` on one device batch, nothing fetched
  step+batch  `step` fed by `Feed(engine).batch(step)` each step
  loop        the loop path of `seismo.train.loop._run_steps` minus eval and checkpoints:
              `feed.batch`, the step, the loop's `Recorder` (losses fetched in windows, a
              metrics.jsonl row every run.log_every steps into a `PointRun`)
  loop/p10    `loop` with run.probe_every=10: the loop's `_probe_due` picks the instrumented
              `engine.probe_step` every 10th step and the run's probe records its probe row
  loop/p1     the same with run.probe_every=1
  probe_step  the instrumented step alone on one device batch, nothing fetched
  step+sync, step+late, step+late/vector (fetch suite): `step` with its metrics dict fetched
              every step at once, one step late, or one step late as one stacked vector

Presets: `tiny` is configs/tiny.yaml; `proxy` is the smallest configs/models/proxy_*.yaml by
parameter count with data.batch_size=8, data.seq_len=128. `--set` applies overrides to
seismo's config (the baseline has its own fixed recipe and follows only the shapes).

Set JAX_COMPILATION_CACHE_DIR to reuse compilations across invocations (timings exclude
compilation either way; the layers suite turns the cache off to time compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import baseline  # noqa: E402  (benchmarks/baseline.py: imports nothing from seismo)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import analysis as analysis_bench  # noqa: E402  (benchmarks/analysis.py: checkpoint-analysis cost)
from seismo import config as config_lib  # noqa: E402
from seismo import models  # noqa: E402
from seismo.train import aot  # noqa: E402
from seismo.train import engine as engine_lib  # noqa: E402
from seismo.train import mesh as mesh_lib  # noqa: E402
from seismo.train import optimizer as opt_lib  # noqa: E402
from seismo.train.loop import Feed, PointRun, Recorder, _probe_due  # noqa: E402
from seismo.train.metrics import Progress  # noqa: E402
from seismo.train.step import make_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Used only when configs/tiny.yaml or configs/models/proxy_*.yaml do not exist.
FALLBACK_TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
                 "data.batch_size=8", "data.seq_len=64"]
FALLBACK_PROXY = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.qk_norm=true",
                  "model.max_seq_len=128"]
PROXY_DATA = ["data.batch_size=8", "data.seq_len=128"]
# Benchmark-only settings: a long schedule (warmup must fit), no progress bar, probes on
# (the engine is also built with probes=True; the loop still decides per step which
# function to call).
BENCH = ["run.steps=100000", "run.progress=off", "run.probe_every=1"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Steps per timed repeat, repeats, and variants left out, for one kind of preset."""

    steps: int
    repeats: int
    micro_steps: int  # steps run to time the fetch and the recorder alone
    skip: tuple[str, ...] = ()
    budget_s: float | None = None  # timed repeats cut to fit this (unless --repeats is given)


# The proxy_256 step costs about 0.45 s of CPU on 2 idle cores, so its rounds are 10 steps
# (exactly one probe step per round at probe_every 10) and few: 5, cut to at least 3 when a
# step is slower than the budget allows; the host-side pieces are timed alone on a few steps.
PLANS = {"tiny": Plan(steps=10, repeats=30, micro_steps=30),
         "proxy": Plan(steps=10, repeats=5, micro_steps=3, budget_s=300,
                       skip=("step+sync", "step+late", "step+late/vector"))}
VARIANTS = ["base", "base/loop", "hand", "step", "step+batch", "probe_step", "loop", "loop/p10", "loop/p1",
            "step+sync", "step+late", "step+late/vector"]

SUITES = {
    "throughput": ["step", "loop"],
    "overhead": ["base", "base/loop", "hand", "step", "step+batch", "loop"],
    "probes": ["step", "probe_step", "loop", "loop/p10", "loop/p1", "base/loop"],
    # diagnostic, not in `all`: what a per-step metrics fetch costs, and with one array
    "fetch": ["step", "step+sync", "step+late", "step+late/vector"],
}
ALL = ["throughput", "overhead", "probes"]
PROBED = ("probe_step", "loop/p10", "loop/p1")  # variants that need the instrumented step
# The goals of issue 10: (variant, against, at most)
GOALS = [("step", "base", 1.05), ("loop", "base/loop", 1.05), ("loop/p1", "loop", 1.10), ("loop/p10", "loop", 1.02)]


# --------------------------------------------------------------------------- presets


@dataclasses.dataclass
class Preset:
    kind: str  # tiny | proxy
    name: str
    cfg: config_lib.Config
    source: str  # where the config came from, for the report


def _model_params(model_cfg: config_lib.ModelConfig) -> int:
    return models.param_count(model_cfg)


def load_presets(names: list[str], overrides: list[str] = ()) -> list[Preset]:
    """The presets, with `overrides` (--set) applied last to seismo's config."""
    out = []
    sets = list(overrides)
    for name in names:
        if name == "tiny":
            path = CONFIGS / "tiny.yaml"
            if path.exists():
                out.append(Preset("tiny", "tiny", config_lib.load(path, BENCH + sets), "configs/tiny.yaml"))
            else:
                out.append(Preset("tiny", "tiny", config_lib.load(None, FALLBACK_TINY + BENCH + sets),
                                  "built-in (configs/tiny.yaml missing): " + " ".join(FALLBACK_TINY)))
        elif name == "proxy":
            files = sorted((CONFIGS / "models").glob("proxy_*.yaml"))
            if files:
                sized = []
                for f in files:
                    cfg = config_lib.load(None, [f"model={f.stem}"])
                    sized.append((_model_params(cfg.model), f.stem))
                _, stem = min(sized)
                cfg = config_lib.load(None, [f"model={stem}"])
                extra = [f"model.max_seq_len={max(128, cfg.model.max_seq_len)}"]
                cfg = config_lib.load(None, [f"model={stem}", *extra, *PROXY_DATA, *BENCH, *sets])
                others = ", ".join(f"{s} ({n / 1e6:.1f}M)" for n, s in sorted(sized))
                out.append(Preset("proxy", stem, cfg, f"configs/models/{stem}.yaml + {' '.join(PROXY_DATA)} "
                                             f"(smallest of: {others})"))
            else:
                out.append(Preset("proxy", "proxy_fallback", config_lib.load(None, FALLBACK_PROXY + PROXY_DATA + BENCH + sets),
                                  "built-in (no configs/models/proxy_*.yaml): "
                                  + " ".join(FALLBACK_PROXY + PROXY_DATA)))
        else:
            raise SystemExit(f"unknown preset {name!r}; use tiny and/or proxy")
    for p in out:
        if sets:
            p.source += " + --set " + " ".join(sets)
    return out


# --------------------------------------------------------------------------- the baseline


def baseline_spec(cfg: config_lib.Config) -> baseline.Spec:
    """The independent baseline's settings for the shapes of `cfg` (plain numbers only: the
    baseline shares no code with seismo). Refuses a config the baseline does not implement."""
    m, d, o = cfg.model, cfg.data, cfg.optimizer
    wanted = {"positions": "rope", "norm": "layernorm", "norm_placement": "pre", "attention": "softmax",
              "mlp": "dense", "activation": "gelu", "tie_embeddings": False, "use_bias": False, "layerscale": False,
              "attn_bias": False, "mup": "off", "init_std": None, "embed_init_std": None, "head_dim": None,
              "dtype": "float32"}
    wrong = {k: getattr(m, k) for k, v in wanted.items() if getattr(m, k) != v}
    if getattr(m, "n_kv_heads", None) not in (None, m.n_heads):
        wrong["n_kv_heads"] = m.n_kv_heads
    if dict(m.activation_kwargs):
        wrong["activation_kwargs"] = dict(m.activation_kwargs)
    if wrong:
        raise SystemExit(f"the independent baseline implements only seismo's preset recipe; not {wrong}")
    return baseline.Spec(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                         d_ff=m.resolved_d_ff, max_seq_len=m.max_seq_len, qk_norm=m.qk_norm, norm_eps=m.norm_eps,
                         rope_base=m.rope_base, batch_size=d.batch_size, seq_len=d.seq_len, lr=o.lr,
                         warmup_steps=o.warmup_steps, steps=cfg.run.steps, min_lr=o.min_lr, b1=o.b1, b2=o.b2,
                         eps=o.eps, clip_norm=o.clip_norm, weight_decay=o.weight_decay, log_every=cfg.run.log_every,
                         seed=cfg.run.seed)


def make_hand_step(model: Any, cfg: config_lib.Config, tx: optax.GradientTransformation) -> tuple[Callable, Any, Any]:
    """seismo's model in a minimal JAX/optax train step (CE loss, the baseline's optimizer `tx`,
    jax.jit with the state donated). Returns (jitted step, params, opt_state)."""

    def loss_fn(params, inputs_BxT, targets_BxT):
        logits_BxTxV, _ = model.apply(params, inputs_BxT)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()

    def step(params, opt_state, inputs_BxT, targets_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BxT, targets_BxT)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.PRNGKey(cfg.run.seed), jnp.zeros((1, cfg.data.seq_len), jnp.int32))
    return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params)


# --------------------------------------------------------------------------- variants


class Bench:
    """One preset: the engine and its feed, the baseline, and a runner per variant (`run(n)`
    does n steps and returns when they are done)."""

    def __init__(self, preset: Preset, tmp: Path):
        self.preset, self.cfg = preset, preset.cfg
        t0 = time.perf_counter()
        run_dir = tmp / preset.name
        run_dir.mkdir(parents=True, exist_ok=True)
        engine_lib.check_config(self.cfg)
        # probes=True: the instrumented step is built whatever run.probe_every says.
        self.engine = engine_lib.build(self.cfg, mesh_lib.make_mesh(self.cfg.mesh), probes=True)
        self.feed = Feed(self.engine)
        self.state = self.engine.init_state()
        self.fixed_batch = jax.device_put(self.feed.batch(0), self.engine.batch_sharding)
        probe = self.engine.probes[0] if self.engine.probes else None
        self.run = PointRun(self.cfg, run_dir, True, probe)
        self.writer = self.run.writer
        self.rec = Recorder(self.engine, [self.run], Progress(self.cfg.run.steps, 0, "off"), 0)
        self.step = 0
        self.base = baseline.Trainer(baseline_spec(self.cfg))
        seismo_params = models.param_count(self.state.params)
        if self.base.n_params != seismo_params:
            raise SystemExit(f"{preset.name}: the baseline has {self.base.n_params:,} parameters, seismo's model "
                             f"{seismo_params:,}: not the same model")
        self.hand_fn, self.hand_params, self.hand_opt = make_hand_step(self.engine.model, self.cfg, self.base.tx)
        self.setup_s = time.perf_counter() - t0
        self.compile_s: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # variant -> the exception that stopped it
        self.tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len

    # each runner: n steps, blocking at the end
    def run_base(self, n: int) -> None:
        self.base.run_fixed(n)

    def run_base_loop(self, n: int) -> None:
        self.base.run_steps(n)

    def run_hand(self, n: int) -> None:
        b = self.fixed_batch
        for _ in range(n):
            self.hand_params, self.hand_opt, loss = self.hand_fn(self.hand_params, self.hand_opt,
                                                                 b["inputs"], b["targets"])
        jax.block_until_ready((self.hand_params, loss))

    def run_step(self, n: int) -> None:
        for _ in range(n):
            self.state, metrics = self.engine.train_step(self.state, self.fixed_batch)
        jax.block_until_ready((self.state, metrics))

    def run_probe_step(self, n: int) -> None:
        for _ in range(n):
            self.state, metrics, probes = self.engine.probe_step(self.state, self.fixed_batch)
        jax.block_until_ready((self.state, metrics, probes))

    def run_step_batch(self, n: int) -> None:
        for _ in range(n):
            self.state, metrics = self.engine.train_step(self.state, self.feed.batch(self.step))
            self.step += 1
        jax.block_until_ready((self.state, metrics))

    def run_fetch(self, n: int, mode: str) -> None:
        """The step with its metrics fetched every step: at once ('sync'), one step late as the
        loop does ('late'), or one step late as one stacked float32 vector ('vector')."""
        fn = self.vector_step_fn() if mode == "vector" else self.engine.train_step
        pending = None
        for _ in range(n):
            self.state, metrics = fn(self.state, self.fixed_batch)
            if mode == "sync":
                jax.device_get(metrics)
            elif pending is not None:
                jax.device_get(pending)
            pending = metrics
        jax.device_get(pending)
        jax.block_until_ready(self.state)

    def vector_step_fn(self) -> Callable:
        """seismo's step with its metrics stacked into one vector inside the jit (one transfer)."""
        if not hasattr(self, "_vector_step"):
            e, steps = self.engine, self.cfg.run.steps
            tx = opt_lib.build(self.cfg.optimizer, self.cfg.model, e.params_shape, steps)
            step = make_train_step(e.model, tx, self.cfg, opt_lib.schedule(self.cfg.optimizer, steps))

            def vector_step(state, batch):
                state, metrics = step(state, batch)
                return state, jnp.stack([metrics[k].astype(jnp.float32) for k in sorted(metrics)])

            self._vector_step = jax.jit(vector_step, in_shardings=(e.state_shardings, e.batch_sharding),
                                        donate_argnums=(0,))
        return self._vector_step

    def run_loop(self, n: int, probe_every: int = 0) -> None:
        """The body of `seismo.train.loop._run_steps` without eval and checkpoints."""
        e, rec = self.engine, self.rec
        cfg = dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, probe_every=probe_every))
        for _ in range(n):
            probing = e.probe_step is not None and _probe_due(cfg, self.step + 1)
            out = (e.probe_step if probing else e.train_step)(self.state, self.feed.batch(self.step))
            self.state, self.step = out[0], self.step + 1
            rec.add(self.step, out[1], out[2] if probing else None)
            if rec.due():
                rec.flush(keep=1)
        rec.flush()  # what the loop records at its next flush point or at the end
        jax.block_until_ready(self.state)

    def cost(self, variant: str) -> dict[str, Any]:
        """XLA's cost analysis of a compiled step, every loop iteration counted
        (seismo.train.aot.cost_for_compiled: flops and bytes_accessed, and XLA's own single
        count of loop bodies as flops_once): the device-side work, free of timing noise."""
        b = self.fixed_batch
        if variant == "base":
            inputs, targets = self.base.fixed
            lowered = self.base.step_fn.lower(self.base.params, self.base.opt_state, inputs, targets)
        elif variant == "hand":
            lowered = self.hand_fn.lower(self.hand_params, self.hand_opt, b["inputs"], b["targets"])
        else:
            fn = self.engine.probe_step if variant == "probe_step" else self.engine.train_step
            lowered = fn.lower(self.state, b)
        return aot.cost_for_compiled(lowered.compile())

    def runner(self, variant: str) -> Callable[[int], None]:
        return {
            "base": self.run_base,
            "base/loop": self.run_base_loop,
            "hand": self.run_hand,
            "step": self.run_step,
            "probe_step": self.run_probe_step,
            "step+batch": self.run_step_batch,
            "loop": lambda n: self.run_loop(n, 0),
            "loop/p10": lambda n: self.run_loop(n, 10),
            "loop/p1": lambda n: self.run_loop(n, 1),
            "step+sync": lambda n: self.run_fetch(n, "sync"),
            "step+late": lambda n: self.run_fetch(n, "late"),
            "step+late/vector": lambda n: self.run_fetch(n, "vector"),
        }[variant]


def measure(bench: Bench, variants: list[str], steps: int, repeats: int, warmup: int,
            budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per repeat (variants interleaved): wall
    time under `v`, CPU time of this process (all its threads) under `cpu:v`. With
    `budget_s`, fewer repeats (at least 3) when one step is slower than the budget allows."""
    for v in list(variants):
        if v not in variants:
            continue
        t0 = time.perf_counter()
        try:
            bench.runner(v)(warmup)
        except Exception as e:  # a step that cannot be built: say so, measure the rest
            lines = traceback.format_exception_only(e)
            bench.errors[v] = "".join(lines).strip()
            dropped = [u for u in variants if u == v or (v in PROBED and u in PROBED)]
            print(f"  [{bench.preset.name}] {v} failed, dropping {', '.join(dropped)}:\n{bench.errors[v]}",
                  file=sys.stderr, flush=True)
            variants = [u for u in variants if u not in dropped]
            continue
        bench.compile_s[v] = time.perf_counter() - t0
        print(f"  [{bench.preset.name}] warm-up {v}: {bench.compile_s[v]:.1f}s", file=sys.stderr, flush=True)
    if budget_s is not None:
        t0 = time.perf_counter()
        bench.run_step(1)
        fit = int(budget_s / (len(variants) * steps * (time.perf_counter() - t0)))
        if fit < repeats:
            repeats = max(3, fit)
            print(f"  [{bench.preset.name}] {repeats} repeats to stay within {budget_s:.0f}s", file=sys.stderr)
    times: dict[str, list[float]] = {v: [] for v in variants} | {f"cpu:{v}": [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            t0, c0 = time.perf_counter(), time.process_time()
            bench.runner(v)(steps)
            times[v].append((time.perf_counter() - t0) / steps)
            times[f"cpu:{v}"].append((time.process_time() - c0) / steps)
        print(f"  [{bench.preset.name}] repeat {r + 1}/{repeats} load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    return times


# --------------------------------------------------------------------------- host-side costs


MICRO = {
    "data.batch (host batch)": "Dataset.batch(step, rows): numpy batch on the host",
    "Feed.batch": "loop.Feed.batch: the host batch, handed to the jitted step as it is (single process)",
    "step dispatch, numpy batch": "engine.train_step(state, host batch) returning (asynchronous; places the batch)",
    "step dispatch, device batch": "engine.train_step(state, device batch) returning (asynchronous)",
    "ref: put_batch": "mesh.put_batch (the multi-process path): make_array_from_process_local_data per array",
    "ref: jax.device_put(batch)": "reference: one jax.device_put of the host batch dict",
    "recorder per step (window)": "loop.Recorder: add + flush of one window of finished steps (one stacked loss "
                                  "fetch, the row's metrics fetch and write), per step",
    "ref: device_get(loss) per step": "reference: jax.device_get of each finished step's loss (the fetch per "
                                      "step it replaces)",
    "device_get(probes)": "the probe summary fetched (one packed vector per dtype) and split (finished step)",
    "write(probe row)": "MetricsWriter.write of the probe row (to_jsonable + json + append)",
    "recorder(metrics, probes)": "loop.Recorder on a probe step: the fetches and the probe's on_step (probe "
                                 "row, logit trend)",
}


def micro_costs(bench: Bench, step_calls: int, calls: int = 200) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per call of the host-side pieces of the loop, each timed alone.
    The fetches are of finished steps, so they time the transfer and recording, no waiting."""
    e, feed, rows_n = bench.engine, bench.feed, bench.cfg.data.batch_size
    data, rows = feed.datasets[bench.cfg.run.seed], feed.rows
    out: dict[str, list[float]] = {k: [] for k in MICRO}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        out[key].append(time.perf_counter() - t0)
        return result

    for i in range(calls):
        host = timed("data.batch (host batch)", functools.partial(data.batch, i, rows))
        timed("ref: put_batch", functools.partial(mesh_lib.put_batch, host, e.batch_sharding, rows_n))
        timed("ref: jax.device_put(batch)", functools.partial(jax.device_put, host, e.batch_sharding))
        timed("Feed.batch", functools.partial(feed.batch, i))
    host = feed.batch(0)
    for _ in range(step_calls):
        for key, batch in (("step dispatch, numpy batch", host), ("step dispatch, device batch", bench.fixed_batch)):
            bench.state, metrics = timed(key, functools.partial(e.train_step, bench.state, batch))
            jax.block_until_ready(bench.state)
    # A fetched jax.Array caches its host copy, so every fetch below gets fresh arrays.
    window = bench.rec.window
    for _ in range(max(step_calls // window, 3)):
        pending = []
        for _ in range(window):
            bench.state, metrics = e.train_step(bench.state, bench.fixed_batch)
            bench.step += 1
            pending.append((bench.step, metrics))
        jax.block_until_ready(bench.state)
        t0 = time.perf_counter()
        for step, metrics in pending:
            bench.rec.add(step, metrics, None)
        bench.rec.flush()
        out["recorder per step (window)"].append((time.perf_counter() - t0) / window)
    for _ in range(max(step_calls // window, 3)):
        losses = []
        for _ in range(window):
            bench.state, metrics = e.train_step(bench.state, bench.fixed_batch)
            losses.append(metrics["loss"])
        jax.block_until_ready(bench.state)
        t0 = time.perf_counter()
        for loss in losses:
            jax.device_get(loss)
        out["ref: device_get(loss) per step"].append((time.perf_counter() - t0) / window)
    for i in range(2 * step_calls if "probe_step" not in bench.errors else 0):
        bench.state, metrics, probes = e.probe_step(bench.state, bench.fixed_batch)
        jax.block_until_ready(probes)
        bench.step += 1
        if i % 2:
            host_probes = timed("device_get(probes)",
                                lambda probes=probes: e.unpack_probes(probes))
            timed("write(probe row)", functools.partial(bench.writer.write, {"step": bench.step, "kind": "probe",
                                                                             **host_probes}))
        else:
            timed("recorder(metrics, probes)", functools.partial(bench.rec, bench.step, metrics, probes))
    return {k: (statistics.median(v), statistics.fmean(v)) for k, v in out.items() if v}


# --------------------------------------------------------------------------- layers: scan or unroll


def layers_suite(preset: Preset, depths: list[int], steps: int, repeats: int) -> dict[str, Any]:
    """seismo's train step at each depth, layers scanned and unrolled: compile time (trace, lower
    and compile, the persistent cache off) and per-step wall and CPU time, the two interleaved
    per round; XLA's FLOPs with every loop iteration counted."""
    jax.config.update("jax_enable_compilation_cache", False)
    out: dict[str, Any] = {}
    for L in depths:
        row: dict[str, Any] = {}
        runners = {}
        for scan in (True, False):
            cfg = config_lib.with_overrides(preset.cfg, [f"model.n_layers={L}", f"model.scan_layers={str(scan).lower()}",
                                                         "run.probe_every=0"])
            engine = engine_lib.build(cfg, mesh_lib.make_mesh(cfg.mesh))
            state = engine.init_state()
            batch = jax.device_put(Feed(engine).batch(0), engine.batch_sharding)
            t0 = time.perf_counter()
            compiled = engine.train_step.lower(state, batch).compile()
            key = "scan" if scan else "unrolled"
            row[f"compile_s:{key}"] = time.perf_counter() - t0
            row[f"cost:{key}"] = aot.cost_for_compiled(compiled)
            box = [state]

            def run(n: int, compiled=compiled, box=box, batch=batch) -> None:
                s = box[0]
                for _ in range(n):
                    s, metrics = compiled(s, batch)
                jax.block_until_ready((s, metrics))
                box[0] = s

            run(1)
            runners[key] = run
        for key in runners:
            row[key], row["cpu:" + key] = [], []
        for r in range(repeats):
            for key in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                runners[key](steps)
                row[key].append((time.perf_counter() - t0) / steps)
                row["cpu:" + key].append((time.process_time() - c0) / steps)
        print(f"  [{preset.name}] layers {L}: compile scan {row['compile_s:scan']:.1f}s, unrolled "
              f"{row['compile_s:unrolled']:.1f}s; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        out[str(L)] = row
    return out


def layers_report(preset: Preset, rows: dict[str, Any], steps: int, repeats: int) -> str:
    m, d = preset.cfg.model, preset.cfg.data
    lines = [f"**{preset.name}** width (d_model {m.d_model}, {m.n_heads} heads, batch {d.batch_size} x seq "
             f"{d.seq_len}) at each depth; {steps} steps x {repeats} rounds per variant, scanned and unrolled "
             f"interleaved; config: {preset.source}\n\n",
             "| layers | compile s: scan | compile s: unrolled | CPU ms/step: scan | CPU ms/step: unrolled | "
             "unrolled / scan, CPU (95% CI) | unrolled / scan, wall (95% CI) | GFLOP scan (XLA's single count) "
             "| GFLOP unrolled |\n|---|---|---|---|---|---|---|---|---|\n"]
    for L, r in rows.items():
        cpu = [a / b for a, b in zip(r["cpu:unrolled"], r["cpu:scan"])]
        wall = [a / b for a, b in zip(r["unrolled"], r["scan"])]
        cs, cu = r["cost:scan"], r["cost:unrolled"]
        lines.append(f"| {L} | {r['compile_s:scan']:.1f} | {r['compile_s:unrolled']:.1f} | "
                     f"{statistics.median(r['cpu:scan']) * 1e3:.2f} | {statistics.median(r['cpu:unrolled']) * 1e3:.2f} | "
                     f"{_ratio(cpu)} | {_ratio(wall)} | {cs['flops'] / 1e9:.3f} ({cs['flops_once'] / 1e9:.3f}) | "
                     f"{cu['flops'] / 1e9:.3f} |\n")
    return "".join(lines)


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jaxlib

    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=5).stdout.splitlines()[1:]
        fields = [line.split(None, 2) for line in ps]
        top = [f"{f[1]} {f[2][:70]}" for f in fields if f[0] != str(os.getpid()) and f[2].split()[0] != "ps"][:5]
    except (OSError, subprocess.SubprocessError):
        top = []
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "commit": commit, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu": cpu, "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "devices": [str(d) for d in jax.devices()], "loadavg_start": os.getloadavg(),
            "top_processes_start": [t.strip() for t in top]}


def _ms(xs: list[float]) -> str:
    """Per-step times: median [interquartile range], min (the least disturbed repeat)."""
    q1, med, q3 = np.percentile(np.asarray(xs) * 1e3, [25, 50, 75])
    return f"{med:.2f} [{q1:.2f}-{q3:.2f}], {min(xs) * 1e3:.2f}"


def _ratio(xs: list[float]) -> str:
    """Paired ratios: median (bootstrap 95% interval of the median) [interquartile range]."""
    x = np.asarray(xs)
    boot = np.median(np.random.default_rng(0).choice(x, size=(2000, len(x))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    q1, q3 = np.percentile(x, [25, 75])
    return f"{np.median(x):.3f} ({lo:.3f}-{hi:.3f}) [{q1:.3f}-{q3:.3f}]"


def _row(times: dict[str, list[float]], v: str, base: str | None, label: str = "", tok: int = 0) -> str:
    """| label | wall ms | CPU ms | [tokens/s] | wall ratio | CPU ratio | (ratios paired per repeat)"""
    cells = [label or v, _ms(times[v]), _ms(times["cpu:" + v])]
    if tok:
        wall, cpu = statistics.median(times[v]), statistics.median(times["cpu:" + v])
        cells.append(f"{tok / wall:,.0f} (CPU time: {tok / cpu:,.0f})")
    if base is not None:
        for key in (v, "cpu:" + v):
            base_key = key.replace(v, base)
            cells.append(_ratio([a / b for a, b in zip(times[key], times[base_key])]))
    return "| " + " | ".join(cells) + " |\n"


def _missing(label: str) -> str:
    return f"| {label} | not run for this preset | | | |\n"


_HEAD = "| variant | wall ms/step: median [IQR], min | CPU ms/step: median [IQR], min |"
_RATIOS = (" wall ratio: median (95% CI) [IQR] | CPU ratio: median (95% CI) [IQR] |\n"
           "|---|---|---|---|---|\n")


def _cost_table(costs: dict[str, dict[str, Any]], base: str) -> str:
    lines = ["\nXLA cost analysis of the compiled steps (device-side work, no timing noise; every loop iteration "
             "counted, XLA's own count of loop bodies once in brackets):\n\n"
             "| step | GFLOP | ratio | MB accessed | ratio |\n|---|---|---|---|---|\n"]
    b = costs[base]
    for v, c in costs.items():
        once = f" ({c['flops_once'] / 1e9:.3f})" if c.get("flops_once") != c["flops"] else ""
        lines.append(f"| {v} | {c['flops'] / 1e9:.3f}{once} | {c['flops'] / b['flops']:.3f} | "
                     f"{c['bytes_accessed'] / 1e6:.1f} | {c['bytes_accessed'] / b['bytes_accessed']:.3f} |\n")
    return "".join(lines)


def _head(bench: Bench) -> str:
    p, tok = bench.preset, bench.tokens_per_step
    m, d = p.cfg.model, p.cfg.data
    return (f"**{p.name}**: d_model {m.d_model}, {m.n_layers} layers (scan_layers {m.scan_layers}), {m.n_heads} "
            f"heads, vocab {m.vocab_size}, {models.param_count(bench.state.params) / 1e6:.2f}M params; batch "
            f"{d.batch_size} x seq {d.seq_len} = {tok} tokens/step; data {d.source}; config: {p.source}\n\n")


def report(suite: str, bench: Bench, times: dict[str, list[float]], micro: dict[str, tuple[float, float]] | None,
           costs: dict[str, dict[str, Any]]) -> str:
    p, tok = bench.preset, bench.tokens_per_step
    lines = [_head(bench)]
    if suite == "throughput":
        lines.append(_HEAD + " tokens/s of the median step |\n|---|---|---|---|\n")
        for v in ("base", *SUITES["throughput"], "base/loop"):
            lines.append(_row(times, v, None, tok=tok) if v in times else "")
    elif suite == "overhead":
        lines.append(_HEAD + _RATIOS.replace(" ratio", " ratio to base", 2))
        for v in SUITES["overhead"]:
            lines.append(_row(times, v, "base") if v in times else _missing(v))
        if "loop" in times and "base/loop" in times:
            lines.append(_row(times, "loop", "base/loop", "loop vs base/loop"))
        if {"base", "hand", "step"} <= set(costs):
            lines.append(_cost_table({v: costs[v] for v in ("base", "hand", "step")}, "base"))
        if micro:
            lines.append("\nHost-side pieces of the loop, each timed alone (wall time per call; a metrics.jsonl "
                         f"row every {p.cfg.run.log_every} steps):\n\n"
                         "| piece | median ms | mean ms | what |\n|---|---|---|---|\n")
            for k, (med, mean) in micro.items():
                lines.append(f"| {k} | {med * 1e3:.3f} | {mean * 1e3:.3f} | {MICRO[k]} |\n")
    elif suite == "probes":
        lines.append(_HEAD + _RATIOS)
        label = "probe_step vs step"
        lines.append(_row(times, "probe_step", "step", label) if "probe_step" in times else _missing(label))
        for v, goal in (("loop/p10", 1.02), ("loop/p1", 1.10)):
            label = f"{v} vs loop (goal <= {goal})"
            lines.append(_row(times, v, "loop", label) if v in times else _missing(label))
            if "base/loop" in times and v in times:
                lines.append(_row(times, v, "base/loop", f"{v} vs base/loop"))
        if {"step", "probe_step"} <= set(costs):
            lines.append(_cost_table({v: costs[v] for v in ("step", "probe_step")}, "step"))
    elif suite == "fetch":
        lines.append(_HEAD + _RATIOS.replace(" ratio", " ratio to step", 2))
        for v in SUITES["fetch"]:
            lines.append(_row(times, v, "step") if v in times else _missing(v))
    return "".join(lines)


def goals_report(measured: dict[str, dict[str, list[float]]], analysis: dict[str, np.ndarray] | None = None) -> str:
    """One line per preset and goal: the paired ratio (wall and CPU) and whether its median meets
    it; then the checkpoint analysis's cost in eval-forward equivalents (median over repeats)."""
    lines = ["| preset | ratio | goal | wall: median (95% CI) | CPU: median (95% CI) | met (median wall, CPU) |\n"
             "|---|---|---|---|---|---|\n"]
    for name, times in measured.items():
        for v, against, goal in GOALS:
            if v not in times or against not in times:
                lines.append(f"| {name} | {v} / {against} | <= {goal} | not measured | | |\n")
                continue
            cells = []
            meds = []
            for key in (v, "cpu:" + v):
                x = [a / b for a, b in zip(times[key], times[key.replace(v, against)])]
                cells.append(_ratio(x).split(" [")[0])
                meds.append(float(np.median(x)))
            met = " / ".join("yes" if m <= goal else "no" for m in meds)
            lines.append(f"| {name} | {v} / {against} | <= {goal} | {cells[0]} | {cells[1]} | {met} |\n")
    if analysis and "all" in analysis:
        x_wall, x_cpu = np.median(analysis["all"][:, 6]), np.median(analysis["all"][:, 7])
        met = " / ".join("yes" if x <= analysis_bench.GOAL else "no" for x in (x_wall, x_cpu))
        lines.append(f"| tiny | analysis per checkpoint / one eval forward pass | <= {analysis_bench.GOAL:g} "
                     f"| {x_wall:.1f} | {x_cpu:.1f} | {met} |\n")
    return "".join(lines)


def analysis_suite(results: dict[str, Any], repeats: int) -> dict[str, np.ndarray]:
    """benchmarks/analysis.py's "all" and "all-no-cett" on tiny: its table printed, its raw rows
    kept in `results`, and returned for the goals table."""
    print("## checkpoint analysis (tiny; benchmarks/analysis.py, variants all and all-no-cett)\n", flush=True)
    rows = analysis_bench.measure(chosen=["all", "all-no-cett"], repeats=repeats)
    results["analysis"] = {k: v.tolist() for k, v in rows.items()}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "layers", "analysis", "all"])
    ap.add_argument("--steps", type=int, help="steps per timed round (default: 10; layers: tiny 5, proxy 2); "
                    "rounded up to a multiple of 10 where loop/p10 runs")
    ap.add_argument("--repeats", type=int,
                    help="timed rounds (default: tiny 30, proxy 5, fewer if over budget; layers: 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation included)")
    ap.add_argument("--presets", default="tiny,proxy")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of seismo's config, e.g. --set model.scan_layers=false (repeatable)")
    ap.add_argument("--layers", default="2,4,6,8,12", help="depths of the layers suite")
    ap.add_argument("--json", type=Path, help="also write every raw timing here")
    args = ap.parse_args(argv)

    info = machine()
    t_start = time.perf_counter()
    suites = ALL if args.suite == "all" else [args.suite]
    print(f"# seismo benchmarks: {' '.join(suites)}\n")
    print(f"command: {' '.join(['benchmarks/run.py', *(argv if argv is not None else sys.argv[1:])])}\n")
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; python {info['python']}, jax {info['jax']}, "
          f"jaxlib {info['jaxlib']}; seismo {info['commit']}; {info['date']}; "
          f"load average at start {info['loadavg_start'][0]:.2f}; busiest processes (%CPU): "
          f"{'; '.join(info['top_processes_start'][:4])}")
    results: dict[str, Any] = {"machine": info, "args": vars(args) | {"json": str(args.json)}, "presets": {}}
    warnings.simplefilter("ignore")  # library warnings; the logit-trend warning goes to the run log (and stderr)
    print()
    if args.suite == "analysis":
        print(goals_report({}, analysis_suite(results, args.repeats or 3)))
        _finish(info, t_start, args, results)
        return 0
    if args.suite == "layers":
        depths = [int(x) for x in args.layers.split(",")]
        for preset in load_presets(args.presets.split(","), args.overrides):
            steps = args.steps or (5 if preset.kind == "tiny" else 2)
            repeats = args.repeats or 6
            rows = layers_suite(preset, depths, steps, repeats)
            results["presets"][preset.name] = rows
            print(f"### layers: {preset.name}\n")
            print(layers_report(preset, rows, steps, repeats))
        _finish(info, t_start, args, results)
        return 0
    wanted = [v for v in VARIANTS if any(v in SUITES[s] for s in suites)]
    warmup = max(args.warmup, 2)  # two steps: a probe-cadence variant meets both compiled functions
    measured: dict[str, dict[str, list[float]]] = {}
    kinds: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="seismo-bench-") as tmp:
        for preset in load_presets(args.presets.split(","), args.overrides):
            kinds.add(preset.kind)
            plan = PLANS[preset.kind]
            variants = [v for v in wanted if v not in plan.skip]
            steps = args.steps or plan.steps
            if "loop/p10" in variants:
                steps = -(-steps // 10) * 10
            repeats = args.repeats or plan.repeats
            bench = Bench(preset, Path(tmp))
            times = measure(bench, variants, steps, repeats, warmup, None if args.repeats else plan.budget_s)
            variants = [v for v in variants if v in times]  # without those that failed to build
            repeats = len(times[variants[0]])
            measured[preset.name] = times
            print(f"## {preset.name}: {steps} steps x {repeats} rounds per variant after {warmup} warm-up steps, "
                  f"variants interleaved: {', '.join(variants)}\n", flush=True)
            for v, err in bench.errors.items():
                print(f"**{v} could not be built**, so it and the variants that need it were not measured:\n\n"
                      f"```\n{err}\n```\n")
            micro = micro_costs(bench, plan.micro_steps) if "overhead" in suites else None
            costs = {v: bench.cost(v) for v in ("base", "hand", "step", "probe_step") if v in variants}
            results["presets"][preset.name] = {"source": preset.source, "steps": steps, "repeats": repeats,
                                               "seconds_per_step": times, "micro": micro, "costs": costs,
                                               "warmup_s": bench.compile_s, "setup_s": bench.setup_s,
                                               "errors": bench.errors}
            for s in suites:
                print(f"### {s}: {preset.name}\n")
                print(report(s, bench, times, micro, costs))
            bench.run.ckpt.close()  # the run record's checkpoint manager (nothing was saved)
            del bench
    if args.suite == "all":
        analysis = analysis_suite(results, 3) if "tiny" in kinds else None
        print("## goals (issue 10): paired ratios of this run\n")
        print(goals_report(measured, analysis))
    _finish(info, t_start, args, results)
    return 0


def _finish(info: dict[str, Any], t_start: float, args: argparse.Namespace, results: dict[str, Any]) -> None:
    info["loadavg_end"] = os.getloadavg()
    print(f"total {time.perf_counter() - t_start:.0f}s; load average at end {info['loadavg_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
