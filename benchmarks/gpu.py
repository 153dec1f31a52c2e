"""seismo GPU benchmarks. Two sections: `kernels`, the FlashSigmoid Pallas kernel
(src/seismo/models/kernels/flash_sigmoid.py) against fused softmax attention, and `model`,
tokens/s and MFU of seismo's train step (gpt2_small, bf16, T 1024 and 2048) with explicit
against fused attention (`model.attention_impl`).

    PYTHONPATH=src python3 benchmarks/gpu.py                         # every section, GPU shapes
    PYTHONPATH=src python3 benchmarks/gpu.py --only kernels --json kernels.json
    PYTHONPATH=src python3 benchmarks/gpu.py --only kernels --seq-lens 1024,4096 --head-dims 128
    PYTHONPATH=src python3 benchmarks/gpu.py --cpu-smoke --json /tmp/smoke.json   # seconds, CPU

The kernels section needs only jax (the kernel module is loaded from its file); the model
section imports seismo from src/ (jax, flax, optax, numpy, yaml). A table goes to stdout as Markdown, progress to stderr,
and `--json PATH` writes every row, the correctness check and the machine.

kernels: causal self-attention, bfloat16 q, k, v [B, T, H, D] (defaults B=4, H=16, D 64 and
128, T 1024..8192), two modes: `fwd` (output) and `fwd+bwd` (output and the vjp of q, k, v
with a fixed cotangent), each jitted; implementations

    flash_sigmoid   this repo's FlashSigmoid kernel (Pallas/Triton), bias -log T, no ALiBi
    softmax_cudnn   jax.nn.dot_product_attention(implementation='cudnn')  (GPU + cuDNN only)
    softmax_pallas  jax.experimental.pallas.ops.gpu.attention.mha (Pallas/Triton flash attention)
    softmax_xla     jax.nn.dot_product_attention(implementation='xla'), weights materialised
    sigmoid_xla     the plain-JAX sigmoid attention seismo runs without the kernel, materialised

Time per call: `--warmup` untimed calls (compilation there), then `--repeats` timed repeats of
`iters` back-to-back calls ended by jax.block_until_ready (iters sized from the warmup so a
repeat lasts about 50 ms); the median and min per call are reported. TFLOP/s counts the causal
attention matmuls alike for every implementation (fwd 2 matmuls x 2 B H T^2 D / 2, fwd+bwd 3.5x
that), so it compares speed, not work done. An implementation that fails (no cuDNN, out of
memory, unsupported shape) gets its error in the row instead of a time. Before timing, the
`check` step compares FlashSigmoid's output and gradients with sigmoid_xla in float32 at the
smallest T (compiled on GPU, i.e. the real Triton kernels).

model: seismo's jitted `engine.train_step` on one pre-made device batch of `--model-tokens`
tokens (batch = tokens / T), per `model.attention_impl`; median seconds per step over
`--model-repeats` runs of `--model-steps` steps after two warm-up steps. tokens/s = batch T /
step; MFU = the PaLM model FLOPs per step (seismo.train.aot.model_flops_per_step: 6 N per token
plus 12 L H Q T attention) / step time / the chip's dense bf16 peak (989 TFLOP/s for H200).

A new section is a function `run(args) -> dict` plus a SECTIONS entry and its arguments in
`add_arguments`; `--only a,b` picks sections.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_KERNEL_FILE = Path(__file__).resolve().parents[1] / "src/seismo/models/kernels/flash_sigmoid.py"


def _load_flash_sigmoid():
    """The kernel module by file path: `import seismo.models...` would run seismo's package
    imports (config, flax models, yaml), which this script does not need."""
    spec = importlib.util.spec_from_file_location("_flash_sigmoid", _KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flash_sigmoid_attention


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# kernels section

IMPLS = ("flash_sigmoid", "softmax_cudnn", "softmax_pallas", "softmax_xla", "sigmoid_xla")
MODES = ("fwd", "fwd+bwd")


def sigmoid_xla(q, k, v, *, scale: float, bias: float) -> jax.Array:
    """Materialised causal sigmoid attention (what seismo's model code computes), float32
    weights, GQA by repeating k and v."""
    T, H = q.shape[1], q.shape[2]
    G = H // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    z = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32) * scale + bias
    mask = jnp.tril(jnp.ones((T, T), bool))
    a = jnp.where(mask, jax.nn.sigmoid(z), 0.0)
    return jnp.einsum("bhij,bjhd->bihd", a.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def attention_fn(impl: str, *, T: int, D: int, interpret: bool, block_q: int, block_k: int,
                 ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """impl's causal attention as f(q, k, v) -> out, all [B, T, heads, D]."""
    scale, bias = D**-0.5, -math.log(T)
    if impl == "flash_sigmoid":
        fsa = _load_flash_sigmoid()
        return lambda q, k, v: fsa(q, k, v, scale=scale, bias=bias, block_q=block_q,
                                   block_k=block_k, interpret=interpret)
    if impl in ("softmax_cudnn", "softmax_xla"):
        which = impl.removeprefix("softmax_")
        if which == "cudnn" and jax.default_backend() != "gpu":
            raise RuntimeError("needs a GPU (cuDNN)")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                            implementation=which)
    if impl == "softmax_pallas":
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        def mha(q, k, v):
            G = q.shape[2] // k.shape[2]  # this kernel has no GQA: repeat the kv heads
            k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
            return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=True,
                                        interpret=interpret)
        return mha
    if impl == "sigmoid_xla":
        return lambda q, k, v: sigmoid_xla(q, k, v, scale=scale, bias=bias)
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


# XLA compile options for every timed function; --cpu-smoke sets backend optimisation level 0,
# which halves the compile time of interpret-mode kernels (the smoke run is all compilation).
JIT_OPTIONS: dict[str, Any] = {}


def step_fn(attn: Callable, mode: str) -> Callable:
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: attn(q, k, v), compiler_options=JIT_OPTIONS or None)
    if mode == "fwd+bwd":
        def fwd_bwd(q, k, v, do):
            out, vjp = jax.vjp(attn, q, k, v)
            return out, vjp(do)
        return jax.jit(fwd_bwd, compiler_options=JIT_OPTIONS or None)
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


def attention_flops(B: int, H: int, T: int, D: int, mode: str) -> float:
    fwd = 4.0 * B * H * T * T * D / 2  # QK^T and PV, causal half
    return fwd if mode == "fwd" else 3.5 * fwd


def make_inputs(B: int, T: int, H: int, Hkv: int, D: int, dtype, seed: int = 0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, Hkv, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


def time_call(fn: Callable, args: tuple, *, warmup: int, repeats: int,
              target_s: float = 0.05) -> dict[str, float]:
    """Seconds per call of an already built jitted fn: median and min over repeats."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t_one = compile_s
    for _ in range(max(0, warmup - 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        t_one = time.perf_counter() - t0
    iters = max(1, min(1000, int(target_s / max(t_one, 1e-6))))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return dict(median_s=statistics.median(per_call), min_s=min(per_call), iters=iters,
                repeats=repeats, first_call_s=compile_s)


def check_flash_sigmoid(*, B: int, T: int, H: int, Hkv: int, D: int, interpret: bool,
                        block_q: int, block_k: int) -> dict[str, Any]:
    """FlashSigmoid vs sigmoid_xla in float32: max |diff| of out, dq, dk, dv, each relative to
    the reference's max |value|."""
    q, k, v, do = make_inputs(B, T, H, Hkv, D, jnp.float32, seed=1)
    flash = step_fn(attention_fn("flash_sigmoid", T=T, D=D, interpret=interpret,
                                 block_q=block_q, block_k=block_k), "fwd+bwd")
    ref = step_fn(attention_fn("sigmoid_xla", T=T, D=D, interpret=interpret, block_q=block_q,
                               block_k=block_k), "fwd+bwd")
    with jax.default_matmul_precision("float32"):
        (out, grads), (out_r, grads_r) = flash(q, k, v, do), ref(q, k, v, do)
    errs = jax.jit(lambda xs, ys: [jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))
                                   for a, b in zip(xs, ys)])((out, *grads), (out_r, *grads_r))
    rel = {name: float(e) for name, e in zip(("out", "dq", "dk", "dv"), errs)}
    return dict(shape=dict(B=B, T=T, H=H, Hkv=Hkv, D=D), dtype="float32", max_rel_err=rel,
                ok=all(e < 1e-4 for e in rel.values()))


def kernel_bench(*, batch: int = 4, heads: int = 16, kv_heads: int | None = None,
                 head_dims=(64, 128), seq_lens=(1024, 2048, 4096, 8192), impls=IMPLS,
                 modes=MODES, dtype=jnp.bfloat16, warmup: int = 2, repeats: int = 10,
                 block_q: int = 128, block_k: int = 128, interpret: bool | None = None,
                 check: bool = True) -> dict[str, Any]:
    """Time each implementation x mode x head dim x sequence length. Returns
    {'rows': [...], 'check': {...}}; a row has impl, mode, B, T, H, Hkv, D, dtype and either
    ms / ms_min / tflops / first_call_s or error."""
    kv_heads = heads if kv_heads is None else kv_heads
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    result: dict[str, Any] = dict(rows=[])
    if check and "flash_sigmoid" in impls:
        T0, D0 = min(seq_lens), min(head_dims)
        log(f"check: flash_sigmoid vs sigmoid_xla, float32, T={T0} D={D0}")
        try:
            result["check"] = check_flash_sigmoid(B=1, T=T0, H=min(heads, 4),
                                                  Hkv=max(1, min(heads, 4) * kv_heads // heads),
                                                  D=D0, interpret=interpret, block_q=block_q,
                                                  block_k=block_k)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            result["check"] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        log(f"  {result['check']}")
    for D in head_dims:
        for T in seq_lens:
            q, k, v, do = make_inputs(batch, T, heads, kv_heads, D, dtype)
            for impl in impls:
                for mode in modes:
                    row: dict[str, Any] = dict(impl=impl, mode=mode, B=batch, T=T, H=heads,
                                               Hkv=kv_heads, D=D, dtype=jnp.dtype(dtype).name)
                    log(f"{impl:15s} {mode:8s} D={D} T={T}")
                    try:
                        fn = step_fn(attention_fn(impl, T=T, D=D, interpret=interpret,
                                                  block_q=block_q, block_k=block_k), mode)
                        t = time_call(fn, (q, k, v, do), warmup=warmup, repeats=repeats)
                        row.update(ms=1e3 * t["median_s"], ms_min=1e3 * t["min_s"],
                                   tflops=attention_flops(batch, heads, T, D, mode)
                                   / t["median_s"] / 1e12,
                                   first_call_s=t["first_call_s"], iters=t["iters"],
                                   repeats=t["repeats"])
                    except Exception as e:  # noqa: BLE001 - an impl that cannot run is a row
                        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        log(f"  error: {row['error']}")
                    result["rows"].append(row)
            del q, k, v, do
    return result


def kernels_table(result: dict[str, Any]) -> str:
    """Markdown: one line per (D, T, mode), ms per implementation, and FlashSigmoid's speed-up
    over the fastest fused softmax that ran."""
    rows = result["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["D"], r["T"], r["mode"]) for r in rows))
    head = ["D", "T", "mode"] + [f"{i} ms" for i in impls] + ["flash_sigmoid speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for D, T, mode in keys:
        cell = {r["impl"]: r for r in rows if (r["D"], r["T"], r["mode"]) == (D, T, mode)}
        vals = []
        for i in impls:
            r = cell.get(i)
            vals.append("-" if r is None else ("error" if "error" in r else f"{r['ms']:.3f}"))
        fused = [cell[i]["ms"] for i in ("softmax_cudnn", "softmax_pallas")
                 if i in cell and "ms" in cell[i]]
        ratio = "-"
        if fused and "ms" in cell.get("flash_sigmoid", {}):
            ratio = f"{min(fused) / cell['flash_sigmoid']['ms']:.2f}x"
        lines.append("| " + " | ".join([str(D), str(T), mode, *vals, ratio]) + " |")
    errors = sorted({(r["impl"], r["error"]) for r in rows if "error" in r})
    lines += [f"\n{impl}: {err}" for impl, err in errors]
    if "check" in result:
        lines.append(f"\ncheck (flash_sigmoid vs sigmoid_xla, float32): {result['check']}")
    return "\n".join(lines)


def run_kernels(args: argparse.Namespace) -> dict[str, Any]:
    ints = lambda s: tuple(int(x) for x in s.split(","))
    if args.cpu_smoke:
        kw = dict(batch=1, heads=2, kv_heads=1, head_dims=(16,), seq_lens=(32,),
                  impls=("flash_sigmoid", "softmax_pallas", "sigmoid_xla", "softmax_cudnn"),
                  warmup=1, repeats=2, block_q=16, block_k=16, interpret=True)
        JIT_OPTIONS["xla_backend_optimization_level"] = 0
    else:
        kw = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                  head_dims=ints(args.head_dims), seq_lens=ints(args.seq_lens),
                  impls=tuple(args.impls.split(",")), warmup=args.warmup,
                  repeats=args.repeats, block_q=args.block_q, block_k=args.block_k)
    kw["modes"] = tuple(args.modes.split(","))
    result = kernel_bench(**kw)
    print("## kernels\n")
    print(kernels_table(result))
    print()
    return result


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernels")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    g.add_argument("--head-dims", default="64,128")
    g.add_argument("--seq-lens", default="1024,2048,4096,8192")
    g.add_argument("--impls", default=",".join(IMPLS))
    g.add_argument("--modes", default=",".join(MODES))
    g.add_argument("--block-q", type=int, default=128)
    g.add_argument("--block-k", type=int, default=128)
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--repeats", type=int, default=10)


# ----------------------------------------------------------------------------------------------
# model: seismo's train step, explicit against fused attention

H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (NVIDIA's datasheet, no sparsity)


def model_bench(*, preset: str, seq_lens: list[int], tokens_per_step: int, impls: list[str], dtype: str,
                steps: int, repeats: int, peak_flops: float | None) -> dict[str, Any]:
    """tokens/s and MFU of seismo's jitted train step per attention implementation."""
    from seismo import config as config_lib
    from seismo.train import aot
    from seismo.train import engine as engine_lib
    from seismo.train import mesh as mesh_lib

    rows = []
    for T in seq_lens:
        batch = max(1, tokens_per_step // T)
        for impl in impls:
            row = dict(preset=preset, T=T, batch=batch, impl=impl, dtype=dtype)
            try:
                overrides = [f"data.seq_len={T}", f"model.max_seq_len={T}", f"data.batch_size={batch}",
                             f"model.attention_impl={impl}", f"model.dtype={dtype}", "run.probe_every=0",
                             "run.steps=1000"]
                cfg = config_lib.load("tiny", overrides=([f"model={preset}"] if preset != "tiny" else []) + overrides)
                eng = engine_lib.build(cfg, mesh_lib.make_mesh(cfg.mesh))
                rng = np.random.default_rng(0)
                toks = rng.integers(1, cfg.model.vocab_size, (batch, T + 1)).astype(np.int32)
                data = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, eng.batch_sharding)
                state = eng.init_state()

                def run(state, n, eng=eng, data=data):
                    for _ in range(n):
                        state, metrics = eng.train_step(state, data)
                    jax.block_until_ready(metrics)
                    return state

                t0 = time.perf_counter()
                state = run(state, 2)
                row["first_steps_s"] = time.perf_counter() - t0
                per_step = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    state = run(state, steps)
                    per_step.append((time.perf_counter() - t0) / steps)
                step_s = statistics.median(per_step)
                flops = aot.model_flops_per_step(cfg, eng.params_shape)
                row.update(step_ms=step_s * 1e3, tokens_per_s=batch * T / step_s, model_flops=flops,
                           mfu=(flops / step_s / peak_flops) if peak_flops else None)
            except Exception as e:  # noqa: BLE001 - reported in the row, the other rows still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"model {row}")
            rows.append(row)
    return dict(rows=rows, peak_flops=peak_flops)


def model_table(result: dict[str, Any]) -> str:
    lines = ["| preset | T | batch | impl | ms/step | tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['T']} | {r['batch']} | {r['impl']} | {r['error']} | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['T']} | {r['batch']} | {r['impl']} | {r['step_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {mfu} |")
    return "\n".join(lines)


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    on_gpu = jax.default_backend() == "gpu"
    if args.cpu_smoke:
        kw = dict(preset="tiny", seq_lens=[64], tokens_per_step=256, impls=["explicit", "blockwise", "dot_product"],
                  dtype="float32", steps=2, repeats=2)
    else:
        kw = dict(preset=args.model_preset, seq_lens=[int(t) for t in args.model_seq_lens.split(",")],
                  tokens_per_step=args.model_tokens, impls=args.model_impls.split(","), dtype=args.model_dtype,
                  steps=args.model_steps, repeats=args.model_repeats)
    result = model_bench(**kw, peak_flops=H200_PEAK_BF16 if on_gpu else None)
    print(model_table(result), flush=True)
    return result


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="gpt2_small")
    g.add_argument("--model-seq-lens", default="1024,2048")
    g.add_argument("--model-tokens", type=int, default=16384, help="tokens per step (batch = tokens / T)")
    g.add_argument("--model-impls", default="explicit,dot_product,blockwise,pallas")
    g.add_argument("--model-dtype", default="bfloat16")
    g.add_argument("--model-steps", type=int, default=5)
    g.add_argument("--model-repeats", type=int, default=5)


# ----------------------------------------------------------------------------------------------
# driver

SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"kernels": run_kernels, "model": run_model}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes, Pallas interpret mode: checks the script runs, in seconds")
    p.add_argument("--json", default=None, help="write the results here")
    add_kernel_arguments(p)
    add_model_arguments(p)


def machine() -> dict[str, Any]:
    devs = jax.devices()
    return dict(jax=jax.__version__, backend=jax.default_backend(),
                devices=[d.device_kind for d in devs], python=platform.python_version(),
                host=platform.node())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    out: dict[str, Any] = dict(machine=machine(), cpu_smoke=args.cpu_smoke,
                               argv=sys.argv[1:] if argv is None else argv)
    log(f"machine: {out['machine']}")
    for name in names:
        out[name] = SECTIONS[name](args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
