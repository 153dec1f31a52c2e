"""seismo benchmarks: step throughput, framework overhead, probe overhead.

    python benchmarks/run.py [throughput|overhead|probes|all|fetch] [--steps N] [--repeats R]
                             [--presets tiny,proxy] [--json out.json]

`all` runs throughput, overhead and probes (about 6 minutes on 2 busy CPU cores); `fetch`
is a diagnostic of the per-step metrics fetch, run on its own.

Every number is a time per training step of an already compiled function: each variant
runs `--warmup` steps first (compilation included there), then `--repeats` timed runs of
`--steps` steps each, ended with `jax.block_until_ready`. The variants of one preset are
interleaved inside each repeat (rotating order), so a load change on a shared machine hits
all of them alike. Each variant gets its wall time and the CPU time of this process per
step (median [interquartile range], min); ratios are paired per repeat and reported as
median (bootstrap 95% interval of the median) [interquartile range]. The overhead and
probes suites add XLA's cost analysis (flops, bytes) of the compiled steps, and the
overhead suite times the loop's host-side pieces alone.

Variants (all on the same model from `seismo.models.build`, the same batch shape):
  hand        hand-written baseline: CE loss, optax.adamw chain, jax.jit; one pre-made
              device batch, nothing fetched (the lower bound a minimal script reaches)
  step        seismo's jitted `engine.train_step` (`seismo.train.engine.build`) on one
              pre-made device batch, nothing fetched
  step+batch  `step` fed by `Feed(engine).batch(step)` (host batch + device put) each step
  loop        the loop path of `seismo.train.loop._run_steps` minus eval and checkpoints:
              `feed.batch`, the step, and the previous step's metrics fetched and recorded
              by the loop's `Recorder` into a `PointRun` (metrics.jsonl row every
              run.log_every steps) one step late
  loop/p10    `loop` with run.probe_every=10: the loop's `_probe_due` picks the instrumented
              `engine.probe_step` every 10th step and the run's probe records its probe row
  loop/p1     the same with run.probe_every=1
  probe_step  the instrumented step alone on a pre-made batch, nothing fetched
  step+sync, step+late, step+late/vector (fetch suite): `step` with its metrics dict fetched
              every step at once, one step late (as the loop does), or one step late as one
              stacked float32 vector made inside the jit

Presets: `tiny` is configs/tiny.yaml; `proxy` is the smallest configs/models/proxy_*.yaml
by parameter count with data.batch_size=8, data.seq_len=128. A missing file falls back to
the built-in shapes below, and the output says so.

Set JAX_COMPILATION_CACHE_DIR to reuse compilations across invocations (timings exclude
compilation either way).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from seismo import config as config_lib  # noqa: E402
from seismo import models  # noqa: E402
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


# The proxy_256 step costs about 0.45 s of CPU here (1 s of wall time under a load of 8-10),
# so 10-step loop-cadence rounds would blow the 10-minute budget of `all`: for it probes are
# measured every step (loop/p1) and per call (probe_step/step), the host-side pieces are
# timed alone, and its repeats are cut (to at least 3) when a step is slower than the budget.
PLANS = {"tiny": Plan(steps=10, repeats=40, micro_steps=30),
         "proxy": Plan(steps=3, repeats=5, micro_steps=3, budget_s=150,
                       skip=("step+batch", "loop/p10", "step+sync", "step+late", "step+late/vector"))}
VARIANTS = ["hand", "step", "step+batch", "probe_step", "loop", "loop/p10", "loop/p1", "step+sync", "step+late",
            "step+late/vector"]

SUITES = {
    "throughput": ["step", "loop"],
    "overhead": ["hand", "step", "step+batch", "loop"],
    "probes": ["step", "probe_step", "loop", "loop/p10", "loop/p1"],
    # diagnostic, not in `all`: what a per-step metrics fetch costs, and with one array
    "fetch": ["step", "step+sync", "step+late", "step+late/vector"],
}
ALL = ["throughput", "overhead", "probes"]
PROBED = ("probe_step", "loop/p10", "loop/p1")  # variants that need the instrumented step


# --------------------------------------------------------------------------- presets


@dataclasses.dataclass
class Preset:
    kind: str  # tiny | proxy
    name: str
    cfg: config_lib.Config
    source: str  # where the config came from, for the report


def _model_params(model_cfg: config_lib.ModelConfig) -> int:
    return models.param_count(model_cfg)


def load_presets(names: list[str]) -> list[Preset]:
    out = []
    for name in names:
        if name == "tiny":
            path = CONFIGS / "tiny.yaml"
            if path.exists():
                out.append(Preset("tiny", "tiny", config_lib.load(path, BENCH), "configs/tiny.yaml"))
            else:
                out.append(Preset("tiny", "tiny", config_lib.load(None, FALLBACK_TINY + BENCH),
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
                cfg = config_lib.load(None, [f"model={stem}", *extra, *PROXY_DATA, *BENCH])
                others = ", ".join(f"{s} ({n / 1e6:.1f}M)" for n, s in sorted(sized))
                out.append(Preset("proxy", stem, cfg, f"configs/models/{stem}.yaml + {' '.join(PROXY_DATA)} "
                                             f"(smallest of: {others})"))
            else:
                out.append(Preset("proxy", "proxy_fallback", config_lib.load(None, FALLBACK_PROXY + PROXY_DATA + BENCH),
                                  "built-in (no configs/models/proxy_*.yaml): "
                                  + " ".join(FALLBACK_PROXY + PROXY_DATA)))
        else:
            raise SystemExit(f"unknown preset {name!r}; use tiny and/or proxy")
    return out


# --------------------------------------------------------------------------- the baseline


def make_hand_step(model: Any, cfg: config_lib.Config) -> tuple[Callable, Any, Any]:
    """A minimal JAX/optax train step of the same model: what a user would write by hand.
    Returns (jitted step, params, opt_state)."""
    o = cfg.optimizer
    sched = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1), cfg.run.steps, o.min_lr)
    decay = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: str(path[-1].key) in ("kernel", "embedding"), params)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay))

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
        self.fixed_batch = self.feed.batch(0)
        probe = self.engine.probes[0] if self.engine.probes else None
        self.run = PointRun(self.cfg, run_dir, True, probe)
        self.writer = self.run.writer
        self.rec = Recorder(self.engine, [self.run], Progress(self.cfg.run.steps, 0, "off"), 0)
        self.step = 0
        self.hand_fn, self.hand_params, self.hand_opt = make_hand_step(self.engine.model, self.cfg)
        self.setup_s = time.perf_counter() - t0
        self.compile_s: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # variant -> the exception that stopped it
        self.tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len

    # each runner: n steps, blocking at the end
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
        e = self.engine
        cfg = dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, probe_every=probe_every))
        pending = None
        for _ in range(n):
            probing = e.probe_step is not None and _probe_due(cfg, self.step + 1)
            out = (e.probe_step if probing else e.train_step)(self.state, self.feed.batch(self.step))
            self.state, self.step = out[0], self.step + 1
            if pending is not None:
                self.rec(*pending)
            pending = (self.step, out[1], out[2] if probing else None)
        self.rec(*pending)  # the last step's fetch: the loop does it at the next step or at the end
        jax.block_until_ready(self.state)

    def cost(self, variant: str) -> dict[str, float]:
        """XLA's cost analysis of a compiled step (flops, bytes accessed): the device-side work,
        free of timing noise. Read from the executable the warm-up compiled (no recompile)."""
        b = self.fixed_batch
        if variant == "hand":
            lowered = self.hand_fn.lower(self.hand_params, self.hand_opt, b["inputs"], b["targets"])
        else:
            fn = self.engine.probe_step if variant == "probe_step" else self.engine.train_step
            lowered = fn.lower(self.state, b)
        ca = lowered.compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return {k: float(ca.get(k, float("nan"))) for k in ("flops", "bytes accessed", "transcendentals")}

    def runner(self, variant: str) -> Callable[[int], None]:
        return {
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
    "put_batch (device put)": "mesh.put_batch: make_array_from_process_local_data per array",
    "Feed.batch (both)": "loop.Feed.batch: the two above",
    "ref: jax.device_put(batch)": "reference: one jax.device_put of the host batch dict",
    "device_get(metrics)": "jax.device_get of the step's metrics dict (finished step)",
    "ref: device_get(one array)": "reference: jax.device_get of one float32 vector as long as the metrics dict",
    "recorder(metrics)": "loop.Recorder on metrics: fetch, finiteness check, row every log_every",
    "device_get(probes)": "jax.device_get of the probe dict (finished step)",
    "write(probe row)": "MetricsWriter.write of the probe row (to_jsonable + json + append)",
    "recorder(metrics, probes)": "loop.Recorder on a probe step: both fetches, the probe's on_step (probe row, "
                                 "logit trend)",
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
        timed("put_batch (device put)", functools.partial(mesh_lib.put_batch, host, e.batch_sharding, rows_n))
        timed("ref: jax.device_put(batch)", functools.partial(jax.device_put, host, e.batch_sharding))
        timed("Feed.batch (both)", functools.partial(feed.batch, i))
    # A fetched jax.Array caches its host copy, so every fetch below gets fresh arrays.
    for i in range(2 * step_calls):
        bench.state, metrics = e.train_step(bench.state, bench.fixed_batch)
        vec = jnp.zeros(len(metrics), jnp.float32) + i
        jax.block_until_ready((metrics, vec))
        bench.step += 1
        if i % 2:
            timed("device_get(metrics)", functools.partial(jax.device_get, metrics))
            timed("ref: device_get(one array)", functools.partial(jax.device_get, vec))
        else:
            timed("recorder(metrics)", functools.partial(bench.rec, bench.step, metrics, None))
    for i in range(2 * step_calls if "probe_step" not in bench.errors else 0):
        bench.state, metrics, probes = e.probe_step(bench.state, bench.fixed_batch)
        jax.block_until_ready(probes)
        bench.step += 1
        if i % 2:
            host_probes = timed("device_get(probes)", functools.partial(jax.device_get, probes))
            timed("write(probe row)", functools.partial(bench.writer.write, {"step": bench.step, "kind": "probe",
                                                                             **host_probes}))
        else:
            timed("recorder(metrics, probes)", functools.partial(bench.rec, bench.step, metrics, probes))
    return {k: (statistics.median(v), statistics.fmean(v)) for k, v in out.items() if v}


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


def _cost_table(costs: dict[str, dict[str, float]], base: str) -> str:
    lines = ["\nXLA cost analysis of the compiled steps (device-side work, no timing noise):\n\n"
             "| step | GFLOP | ratio | MB accessed | ratio |\n|---|---|---|---|---|\n"]
    for v, c in costs.items():
        b = costs[base]
        lines.append(f"| {v} | {c['flops'] / 1e9:.3f} | {c['flops'] / b['flops']:.3f} | "
                     f"{c['bytes accessed'] / 1e6:.1f} | {c['bytes accessed'] / b['bytes accessed']:.3f} |\n")
    return "".join(lines)


def report(suite: str, bench: Bench, times: dict[str, list[float]], micro: dict[str, tuple[float, float]] | None,
           costs: dict[str, dict[str, float]]) -> str:
    p, tok = bench.preset, bench.tokens_per_step
    m, d = p.cfg.model, p.cfg.data
    head = (f"**{p.name}**: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}, "
            f"{_model_params(m) / 1e6:.2f}M params; batch {d.batch_size} x seq {d.seq_len} = {tok} tokens/step; "
            f"data {d.source}; config: {p.source}\n\n")
    lines = [head]
    if suite == "throughput":
        lines.append(_HEAD + " tokens/s of the median step |\n|---|---|---|---|\n")
        for v in SUITES["throughput"]:
            lines.append(_row(times, v, None, tok=tok) if v in times else "")
    elif suite == "overhead":
        lines.append(_HEAD + _RATIOS.replace(" ratio", " ratio to hand", 2))
        for v in SUITES["overhead"]:
            lines.append(_row(times, v, "hand") if v in times else _missing(v))
        if {"hand", "step"} <= set(costs):
            lines.append(_cost_table({v: costs[v] for v in ("hand", "step")}, "hand"))
        if micro:
            lines.append("\nHost-side pieces of the loop, each timed alone (wall time per call; the recorder "
                         f"writes a metrics.jsonl row every {p.cfg.run.log_every} steps, hence mean > median):\n\n"
                         "| piece | median ms | mean ms | what |\n|---|---|---|---|\n")
            for k, (med, mean) in micro.items():
                lines.append(f"| {k} | {med * 1e3:.3f} | {mean * 1e3:.3f} | {MICRO[k]} |\n")
    elif suite == "probes":
        lines.append(_HEAD + _RATIOS)
        label = "probe_step vs step"
        lines.append(_row(times, "probe_step", "step", label) if "probe_step" in times else _missing(label))
        for v, goal in (("loop/p10", 1.02), ("loop/p1", 1.10)):
            label = f"{v} vs loop (goal < {goal})"
            lines.append(_row(times, v, "loop", label) if v in times else _missing(label))
        if {"step", "probe_step"} <= set(costs):
            lines.append(_cost_table({v: costs[v] for v in ("step", "probe_step")}, "step"))
    elif suite == "fetch":
        lines.append(_HEAD + _RATIOS.replace(" ratio", " ratio to step", 2))
        for v in SUITES["fetch"]:
            lines.append(_row(times, v, "step") if v in times else _missing(v))
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"])
    ap.add_argument("--steps", type=int, help="steps per timed repeat (default: tiny 10, proxy 3); "
                    "rounded up to a multiple of 10 where loop/p10 runs")
    ap.add_argument("--repeats", type=int,
                    help="timed repeats per variant (default: tiny 40, proxy 5, fewer if over budget)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation included)")
    ap.add_argument("--presets", default="tiny,proxy")
    ap.add_argument("--json", type=Path, help="also write every raw timing here")
    args = ap.parse_args(argv)

    suites = ALL if args.suite == "all" else [args.suite]
    wanted = [v for v in VARIANTS if any(v in SUITES[s] for s in suites)]
    warmup = max(args.warmup, 2)  # two steps: a probe-cadence variant meets both compiled functions
    info = machine()
    t_start = time.perf_counter()
    print(f"# seismo benchmarks: {' '.join(suites)}\n")
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; python {info['python']}, jax {info['jax']}, "
          f"jaxlib {info['jaxlib']}; seismo {info['commit']}; {info['date']}; "
          f"load average at start {info['loadavg_start'][0]:.2f}; busiest processes (%CPU): "
          f"{'; '.join(info['top_processes_start'][:4])}")
    results: dict[str, Any] = {"machine": info, "args": vars(args) | {"json": str(args.json)}, "presets": {}}
    warnings.simplefilter("ignore")  # library warnings; the logit-trend warning goes to the run log (and stderr)
    print()
    with tempfile.TemporaryDirectory(prefix="seismo-bench-") as tmp:
        for preset in load_presets(args.presets.split(",")):
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
            print(f"## {preset.name}: {steps} steps x {repeats} repeats per variant after {warmup} warm-up steps, "
                  f"variants interleaved: {', '.join(variants)}\n", flush=True)
            for v, err in bench.errors.items():
                print(f"**{v} could not be built**, so it and the variants that need it were not measured:\n\n"
                      f"```\n{err}\n```\n")
            micro = micro_costs(bench, plan.micro_steps) if "overhead" in suites else None
            costs = {v: bench.cost(v) for v in ("hand", "step", "probe_step") if v in variants}
            results["presets"][preset.name] = {"source": preset.source, "steps": steps, "repeats": repeats,
                                               "seconds_per_step": times, "micro": micro, "costs": costs,
                                               "warmup_s": bench.compile_s, "setup_s": bench.setup_s,
                                               "errors": bench.errors}
            for s in suites:
                print(f"### {s}: {preset.name}\n")
                print(report(s, bench, times, micro, costs))
            bench.run.ckpt.close()  # the run record's checkpoint manager (nothing was saved)
            del bench
    info["loadavg_end"] = os.getloadavg()
    print(f"total {time.perf_counter() - t_start:.0f}s; load average at end {info['loadavg_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
