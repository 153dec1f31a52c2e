"""An independent baseline: a hand-written flax.linen + optax trainer of seismo's preset model.

    python benchmarks/baseline.py --preset tiny            # times its own step and loop, prints ms/step
    python benchmarks/baseline.py --preset proxy_256 --batch 8 --seq 128

It shares no code with seismo: nothing is imported from the `seismo` package. The shapes come
from a preset YAML file read with plain `yaml` (src/seismo/configs/models/<name>.yaml), and what
a preset leaves out takes seismo's documented defaults, written out below (`Spec`). The model is
written the way one writes it by hand, blocks as a Python loop (unrolled, no scan):

    tokens -> embedding N(0, 1/d) -> L x [x + attn(LN(x)); x + mlp(LN(x))] -> LN -> untied head

    LN         LayerNorm over d, a scale and no bias, eps 1e-6 (flax.linen.LayerNorm)
    attn       separate q, k, v projections (no bias), optional qk-LayerNorm per head over
               head_dim (scale shared by the heads), RoPE (split halves, base 10000),
               causal softmax of q.k / sqrt(head_dim), output projection
    mlp        d -> 4d -> d with GELU (tanh approximation)
    kernels    truncated normal with std 1/sqrt(fan_in)

and trained with the AdamW recipe of seismo's presets (Wortsman et al. 2023): global-norm
clipping 1.0, Adam (b1 0.9, b2 0.95, eps 1e-8), independent weight decay 1e-4 on kernels and
embeddings, linear warmup then cosine decay to 1e-5, token cross-entropy. The step is one
`jax.jit` with the parameters and optimizer state donated.

`Trainer.run_steps(n)` is the training loop a person writes: each step a fresh numpy batch of
random windows of a token array (this file's own bytes), handed to the jitted step as numpy, and the loss fetched to the
host every `log_every` steps. `Trainer.run_fixed(n)` runs the jitted step alone on one device
batch made beforehand, nothing fetched. benchmarks/run.py times both beside seismo.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "src" / "seismo" / "configs" / "models"


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything the baseline needs: model shapes, batch shape, optimizer settings. The
    defaults are those seismo documents for a preset that does not set them."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 128
    qk_norm: bool = False
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    steps: int = 100_000
    min_lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    weight_decay: float = 1e-4
    log_every: int = 10
    seed: int = 0

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model


# What the baseline implements; a preset that asks for anything else is refused.
_SUPPORTED = {"positions": "rope", "norm": "layernorm", "norm_placement": "pre", "attention": "softmax",
              "mlp": "dense", "activation": "gelu", "tie_embeddings": False, "use_bias": False}
_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "qk_norm", "norm_eps",
               "rope_base")


def spec_from_preset(name: str, **overrides: Any) -> Spec:
    """A Spec from src/seismo/configs/models/<name>.yaml (plain yaml), then `overrides`."""
    raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    model = raw.get("model", raw)
    for key, want in _SUPPORTED.items():
        if key in model and model[key] != want:
            raise SystemExit(f"preset {name}: {key}={model[key]!r}; the baseline implements only {want!r}")
    for key in ("head_dim", "layerscale", "attn_bias", "mup", "init_std", "embed_init_std"):
        if model.get(key) not in (None, False, "off"):
            raise SystemExit(f"preset {name}: {key} is not implemented by the baseline")
    fields = {k: model[k] for k in _SHAPE_KEYS if k in model}
    return dataclasses.replace(Spec(**fields), **overrides)


# --------------------------------------------------------------------------- the model


# truncated normal on [-2, 2] std, rescaled so that the std is exactly 1/sqrt(fan_in)
_KERNEL = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _rope(x: jax.Array, base: float) -> jax.Array:
    """x [B, T, H, K] rotated by position, halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    T, K = x.shape[1], x.shape[-1]
    freq = base ** (-jnp.arange(0, K // 2, dtype=jnp.float32) * 2.0 / K)
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : K // 2], x[..., K // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class SelfAttention(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        B, T, D = x.shape
        H = s.n_heads
        K = D // H
        dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=_KERNEL, name=name)
        q = dense(H * K, "q")(x).reshape(B, T, H, K)
        k = dense(H * K, "k")(x).reshape(B, T, H, K)
        v = dense(H * K, "v")(x).reshape(B, T, H, K)
        if s.qk_norm:
            q = nn.LayerNorm(epsilon=s.norm_eps, use_bias=False, name="q_ln")(q)
            k = nn.LayerNorm(epsilon=s.norm_eps, use_bias=False, name="k_ln")(k)
        q, k = _rope(q, s.rope_base), _rope(k, s.rope_base)
        att = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(K)
        causal = jnp.tril(jnp.ones((T, T), bool))
        att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
        y = jnp.einsum("bhqs,bshk->bqhk", att, v).reshape(B, T, H * K)
        return nn.Dense(D, use_bias=False, kernel_init=_KERNEL, name="proj")(y)


class FeedForward(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F = x.shape[-1], self.spec.ff
        h = nn.Dense(F, use_bias=False, kernel_init=_KERNEL, name="fc")(x)
        return nn.Dense(D, use_bias=False, kernel_init=_KERNEL, name="out")(nn.gelu(h, approximate=True))


class DecoderLM(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        s = self.spec
        ln = lambda name: nn.LayerNorm(epsilon=s.norm_eps, use_bias=False, name=name)
        x = nn.Embed(s.vocab_size, s.d_model, embedding_init=nn.initializers.normal(s.d_model**-0.5),
                     name="wte")(tokens)
        for i in range(s.n_layers):
            x = x + SelfAttention(s, name=f"attn_{i}")(ln(f"ln1_{i}")(x))
            x = x + FeedForward(s, name=f"mlp_{i}")(ln(f"ln2_{i}")(x))
        x = ln("ln_f")(x)
        return nn.Dense(s.vocab_size, use_bias=False, kernel_init=_KERNEL, name="lm_head")(x)


def param_count(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------- the trainer


def make_optimizer(s: Spec) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, max(s.warmup_steps, 1), s.steps, s.min_lr)
    decay = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)
    return optax.chain(optax.clip_by_global_norm(s.clip_norm),
                       optax.scale_by_adam(b1=s.b1, b2=s.b2, eps=s.eps),
                       optax.add_decayed_weights(s.weight_decay / s.lr, decay),
                       optax.scale_by_schedule(lambda t: -sched(t)))


class Trainer:
    """Params, optimizer state, the jitted step, a token array to sample batches from."""

    def __init__(self, spec: Spec):
        self.spec = s = spec
        self.model = DecoderLM(s)
        self.tx = make_optimizer(s)
        self.params = jax.jit(self.model.init)(jax.random.PRNGKey(s.seed), jnp.zeros((1, s.seq_len), jnp.int32))
        self.params = self.params["params"]
        self.opt_state = jax.jit(self.tx.init)(self.params)
        self.n_params = param_count(self.params)

        def loss_fn(params, inputs, targets):
            logits = self.model.apply({"params": params}, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        def step(params, opt_state, inputs, targets):
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step_fn = jax.jit(step, donate_argnums=(0, 1))
        # data: windows of this file's own bytes (text worth learning; no dataset needed)
        text = np.frombuffer(Path(__file__).read_bytes(), np.uint8).astype(np.int32) % s.vocab_size
        self.tokens = np.tile(text, -(-(1 << 20) // len(text)))
        self.rng = np.random.default_rng(s.seed)
        self.offsets = np.arange(s.seq_len + 1)
        self.fixed = jax.device_put(self.host_batch())
        self.step = 0
        self.losses: list[float] = []

    def host_batch(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.spec
        starts = self.rng.integers(0, len(self.tokens) - s.seq_len - 1, size=s.batch_size)
        windows = self.tokens[starts[:, None] + self.offsets]
        return windows[:, :-1], windows[:, 1:]

    def run_fixed(self, n: int) -> None:
        """n steps of the jitted step on one device batch, nothing fetched."""
        inputs, targets = self.fixed
        for _ in range(n):
            self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state, inputs, targets)
        jax.block_until_ready((self.params, loss))

    def run_steps(self, n: int) -> None:
        """n steps of the loop: a fresh numpy batch each step, the loss fetched every log_every steps."""
        for _ in range(n):
            inputs, targets = self.host_batch()
            self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state, inputs, targets)
            self.step += 1
            if self.step % self.spec.log_every == 0:
                self.losses.append(float(loss))
        jax.block_until_ready((self.params, loss))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="a file stem of src/seismo/configs/models/")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    spec = spec_from_preset(args.preset, batch_size=args.batch, seq_len=args.seq)
    tr = Trainer(spec)
    print(f"{args.preset}: {tr.n_params:,} params, batch {spec.batch_size} x {spec.seq_len}; {jax.devices()}")
    for name, fn in (("step (fixed device batch)", tr.run_fixed), ("loop (numpy batch, loss every 10)", tr.run_steps)):
        fn(2)  # compile
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(args.steps)
            times.append((time.perf_counter() - t0) / args.steps)
        print(f"  {name}: median {np.median(times) * 1e3:.2f} ms/step, min {min(times) * 1e3:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
