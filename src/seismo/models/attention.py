"""Causal self-attention: softmax | sigmoid | clipped softmax | gated, with qk-layernorm,
an explicit attention bias, and rope | alibi positions.

    softmax          softmax(q.k * scale + alibi) with causal mask.
    sigmoid          Ramapuram et al. 2024 (arXiv 2409.04431, docs/methods.md §2.1):
                     sigma(q.k / sqrt(d_h) + alibi + b), b a fixed scalar (config
                     `model.sigmoid_bias`, default -log max_seq_len), masked weights exactly
                     0, no row normalisation.
    clipped_softmax  Bondarenko et al. 2023 (arXiv 2306.12929, docs/methods.md §7.3):
                     clip((zeta - gamma) softmax + gamma, 0, 1), so exact 0 and 1 are
                     reachable with finite logits.
    gated            Bondarenko et al. 2023: softmax attention whose head h output is
                     multiplied by sigmoid(x_h . w_h + b_h), x_h head h's slice of the
                     attention input, gate bias init `model.gate_bias_init` (logit 0.25).

Options on every kind:
  * qk-layernorm (`model.qk_norm`, Wortsman et al. 2023, arXiv 2309.14322, docs/methods.md §1.1):
    LayerNorm of q and k per head over head_dim, the head_dim scales shared across heads, no
    bias, eps `model.norm_eps` (1e-6), applied before rope.
  * explicit attention bias (`model.attn_bias`, Sun et al. 2024, arXiv 2402.17762, docs/methods.md
    3.2): learnable k', v' per head, init N(0, 0.02), prepended as key/value slot 0 that every
    query sees (no rope, no alibi distance). Attention maps then have S = T + 1 columns.
  * scale 1/sqrt(d_h), or 1/d_h under muParam (full) (docs/methods.md §1.5), which also zeroes the
    initial query kernel.

Grouped-query and multi-query attention (`model.n_kv_heads`, Ainslie et al. 2023, arXiv
2305.13245): keys and values have Hkv heads, query head h reads kv head h // (H / Hkv); the
attention bias k', v' has one slot per kv head.

How the weights are computed (`model.attention_impl`, the same numbers each way up to float
rounding; `IMPLS`, docs/design.md):
    explicit     [B, H, T, S] float32 logits and weights, materialised: every kind, and the
                 only path that can hand whole maps to the checkpoint analysis.
    blockwise    plain-JAX online softmax / sigmoid over blocks of `model.attention_block`
                 (blockwise.py): memory linear in T on every backend, statistics from its own
                 running max and log-sum-exp.
    dot_product  `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPUs in bf16.
    pallas       Pallas kernels: FlashSigmoid (kernels/flash_sigmoid.py) and the Pallas GPU
                 flash attention for softmax.
    auto         `resolve_impl`: the fastest correct one for the backend.
The fused paths cover softmax (and gated) and sigmoid attention with causal masking; the
attention-bias slot joins a fused kernel's output through its log-sum-exp (softmax) or as one
more sigmoid term, so kernels stay square and causal.

Taps. Full taps (`Model.apply(..., taps="full")`, the explicit path): 'attn_logits' = q.k *
scale in float32, after qk-norm and rope, before alibi, sigmoid bias and mask, [B, H, T, S];
'attn_probs' = the weights actually used (masked entries 0), [B, H, T, S]; 'attn_out' = the
sublayer output [B, T, D] (after the output projection, before any post-norm, LayerScale or
residual add). Statistics taps (`taps="stats"`, every path): the per-layer scalars of
`blockwise.finish_row_stats`, reduced inside the layer, so no [B, H, T, S] array outlives
one block of the computation.

A new attention kind is a weights function plus one registry line:

    ATTENTIONS.register("relu2", AttentionKind(lambda z, mask, cfg: jnp.where(mask, relu(z)**2, 0)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.scipy.special import xlogy

from seismo.config import ModelConfig
from seismo.models import blockwise
from seismo.models.linear import Dense, truncated_normal
from seismo.models.norms import LayerNorm
from seismo.models.positions import alibi_bias, alibi_slopes, apply_rope
from seismo.models.taps import tap, tap_stats, taps_mode
from seismo.registry import Registry

# weights(z_BxHxTxS float32 (logits + position bias), mask_TxS bool, cfg) -> weights, masked 0
WeightsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclass(frozen=True)
class AttentionKind:
    """What `model.attention` names: how logits become weights, and whether heads are gated."""

    weights: WeightsFn
    output_gate: bool = False
    description: str = ""
    fused: str | None = None  # 'softmax' | 'sigmoid': the weights the fused kernels compute; None: explicit only


ATTENTIONS: Registry[AttentionKind] = Registry("attention")

ATTENTION_OUT = "attention_out"  # checkpoint name of the attention kernel's output
_NEG = -1e30  # a float32 logit that softmax turns into an exact 0 without inf - inf NaNs


def softmax_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    # Every row sees at least one key (causal: itself), so exp(_NEG - row max) underflows to an
    # exact 0 at every masked entry: the weights are masked without a second select.
    return jax.nn.softmax(jnp.where(mask, z, _NEG), axis=-1)


def sigmoid_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jnp.where(mask, jax.nn.sigmoid(z + cfg.resolved_sigmoid_bias), 0.0)


def clipped_softmax_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    p = softmax_weights(z, mask, cfg)
    p = jnp.clip((cfg.clip_zeta - cfg.clip_gamma) * p + cfg.clip_gamma, 0.0, 1.0)
    return jnp.where(mask, p, 0.0)


ATTENTIONS.register("softmax", AttentionKind(softmax_weights, description="softmax attention", fused="softmax"))
ATTENTIONS.register("sigmoid", AttentionKind(
    sigmoid_weights, description="sigmoid attention with bias -log n (Ramapuram et al., arXiv 2409.04431)",
    fused="sigmoid"))
ATTENTIONS.register("clipped_softmax", AttentionKind(
    clipped_softmax_weights, description="clipped softmax (Bondarenko et al., arXiv 2306.12929)"))
ATTENTIONS.register("gated", AttentionKind(
    softmax_weights, output_gate=True, description="softmax with per-head output gates (Bondarenko et al.)",
    fused="softmax"))


# --------------------------------------------------------------------------- implementations

# run(q [B,T,H,dh], k, v [B,T,Hkv,dh], fused, scale, sigmoid bias, ALiBi slopes [H] | None, cfg)
#   -> (out [B,T,H,dh], per-row log-sum-exp [B,H,T] or None when the kernel does not return it)
RunFn = Callable[..., tuple[jax.Array, jax.Array | None]]


@dataclass(frozen=True)
class AttentionImpl:
    """What `model.attention_impl` names: a fused kernel for the kinds it covers."""

    unsupported: Callable[[ModelConfig], str | None]  # why it cannot run this config, or None
    run: RunFn | None = None  # None: the path is written inside Attention (explicit, blockwise)
    description: str = ""


IMPLS: Registry[AttentionImpl] = Registry("attention implementation")


def _kind_reason(cfg: ModelConfig, kinds: tuple[str, ...]) -> str | None:
    fused = ATTENTIONS.get(cfg.attention).fused if cfg.attention in ATTENTIONS else None
    if fused not in kinds:
        return f"it computes {' and '.join(kinds)} attention, not {cfg.attention}"
    return None


def _dot_product_run(q, k, v, fused, scale, bias, slopes, cfg):
    cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       implementation="cudnn" if cudnn else None)
    return out, None


def _dot_product_unsupported(cfg: ModelConfig) -> str | None:
    if (reason := _kind_reason(cfg, ("softmax",))) is not None:
        return reason
    if cfg.positions == "alibi":
        return "it takes no ALiBi bias without materialising it"
    if cfg.attn_bias:
        return "it returns no log-sum-exp to join the attention-bias slot with"
    return None


def _pallas_run(q, k, v, fused, scale, bias, slopes, cfg):
    interpret = jax.default_backend() == "cpu"
    if fused == "sigmoid":
        from seismo.models.kernels.flash_sigmoid import flash_sigmoid_attention

        block = cfg.attention_block
        return flash_sigmoid_attention(q, k, v, scale=scale, bias=bias, alibi_slopes=slopes,
                                       block_q=block, block_k=block, interpret=interpret), None
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    block = min(cfg.attention_block, 128, q.shape[1])
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, block),
                                     block_kv_dkv=min(32, block), block_q_dq=min(32, block),
                                     block_kv_dq=min(32, block))
    return gpu_attention.mha(q, k, v, None, sm_scale=scale, causal=True, block_sizes=sizes,
                             interpret=interpret), None


def _pallas_unsupported(cfg: ModelConfig) -> str | None:
    if (reason := _kind_reason(cfg, ("softmax", "sigmoid"))) is not None:
        return reason
    if jax.default_backend() == "tpu":
        return "on TPUs seismo does not yet wrap its Pallas kernels in the shard_map Mosaic needs; use blockwise"
    if ATTENTIONS.get(cfg.attention).fused == "softmax":
        if cfg.positions == "alibi":
            return "its softmax kernel takes no ALiBi bias"
        if cfg.attn_bias:
            return "its softmax kernel returns no log-sum-exp to join the attention-bias slot with"
    return None


IMPLS.register("explicit", AttentionImpl(
    lambda cfg: None, description="materialised [B, H, T, S] float32 logits and weights; every kind, the reference"))
IMPLS.register("blockwise", AttentionImpl(
    lambda cfg: _kind_reason(cfg, ("softmax", "sigmoid")),
    description="plain-JAX online softmax / sigmoid over key blocks; memory linear in T on every backend"))
IMPLS.register("dot_product", AttentionImpl(
    _dot_product_unsupported, _dot_product_run,
    "jax.nn.dot_product_attention: cuDNN flash attention on GPUs in bf16, XLA elsewhere"))
IMPLS.register("pallas", AttentionImpl(
    _pallas_unsupported, _pallas_run,
    "Pallas kernels: FlashSigmoid (seismo.models.kernels) for sigmoid, the Pallas GPU flash attention for softmax"))

# `auto` on the CPU keeps the explicit maps up to this length. Measured (benchmarks/attention.py,
# benchmarks/RESULTS.md): at T = 64 the two are equal, at T = 256 blockwise takes 0.89x the
# explicit step's time; up to 128 explicit also keeps every earlier run's numbers bit for bit.
CPU_EXPLICIT_MAX_T = 128


def impl_unsupported(cfg: ModelConfig, impl: str) -> str | None:
    """Why `impl` cannot run `cfg` (a sentence), or None."""
    return IMPLS.get(impl).unsupported(cfg)


def resolve_impl(cfg: ModelConfig, T: int | None = None, platform: str | None = None) -> str:
    """The implementation `model.attention_impl` means on `platform` (default: JAX's default
    backend) for sequences of T: itself, or for `auto` the fastest correct one there (the
    explicit maps for kinds no kernel computes)."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    if ATTENTIONS.get(cfg.attention).fused is None:
        return "explicit"
    backend = platform or jax.default_backend()
    if backend == "gpu":
        kind = ATTENTIONS.get(cfg.attention).fused
        if kind == "softmax" and cfg.dtype == "bfloat16" and _dot_product_unsupported(cfg) is None:
            return "dot_product"
        # FlashSigmoid (pallas) lowers for GPUs but has not yet run on one (benchmarks/RESULTS.md):
        # until benchmarks/gpu.py has checked it there, auto keeps sigmoid attention blockwise.
        return "blockwise"
    if backend == "cpu" and (T if T is not None else cfg.max_seq_len) <= CPU_EXPLICIT_MAX_T:
        return "explicit"
    return "blockwise"


def causal_mask(T: int, S: int) -> jax.Array:
    """[T, S] bool: query i sees key j <= i; with S = T + 1 the extra slot 0 is seen by all."""
    offset = S - T
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :] - offset
    return j <= i


def attention_scale(cfg: ModelConfig) -> float:
    dh = cfg.resolved_head_dim
    return 1.0 / dh if cfg.mup == "full" else dh**-0.5


def key_slots(cfg: ModelConfig) -> int:
    """Key slots before the sequence: 1 with the explicit attention bias k', v' (slot 0, Sun
    et al. 2024), else 0. Every reader of attention maps takes the offset from here."""
    return 1 if cfg.attn_bias else 0


class Attention(nn.Module):
    """Causal multi-head self-attention on x [B, T, D] -> [B, T, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        kind = ATTENTIONS.get(cfg.attention)
        B, T, D = x_BxTxD.shape
        H, Hk, dh = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)

        def proj(name: str, heads: int, std: float | None) -> jax.Array:
            dense = Dense(D, heads * dh, ("embed", "heads"), std, cfg.use_bias, dtype, name=name)
            return dense(x_BxTxD).reshape(B, T, heads, dh)

        q_BxTxHxK = proj("query", H, 0.0 if cfg.mup == "full" else cfg.init_std)
        k_BxTxGxK = proj("key", Hk, cfg.init_std)  # G = Hkv key/value heads
        v_BxTxGxK = proj("value", Hk, cfg.init_std)
        if cfg.qk_norm:  # per head over head_dim; scale shared across heads; never a bias
            q_BxTxHxK = LayerNorm(cfg.norm_eps, use_bias=False, axis_name="kv", name="q_norm")(q_BxTxHxK)
            k_BxTxGxK = LayerNorm(cfg.norm_eps, use_bias=False, axis_name="kv", name="k_norm")(k_BxTxGxK)
        if cfg.positions == "rope":
            q_BxTxHxK = apply_rope(q_BxTxHxK, cfg.rope_base)
            k_BxTxGxK = apply_rope(k_BxTxGxK, cfg.rope_base)
        slot = AttentionBias(Hk, dh, name="attn_bias")() if key_slots(cfg) else None

        mode = taps_mode(self)
        impl = resolve_impl(cfg, T)
        if mode == "full" or impl == "explicit":  # the analysis reads whole maps: only this path has them
            out_BxTxHxK = self._explicit(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, slot, kind, mode)
        else:
            out_BxTxHxK = self._fused(impl, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, slot, kind, mode)
        out_BxTxHxK = checkpoint_name(out_BxTxHxK.astype(dtype), ATTENTION_OUT)  # remat 'attention' keeps it
        if kind.output_gate:
            out_BxTxHxK = out_BxTxHxK * self._gate(x_BxTxD)[..., None].astype(dtype)
        out = Dense(H * dh, D, ("heads", "embed"), cfg.init_std, cfg.use_bias, dtype, name="out")
        y_BxTxD = out(out_BxTxHxK.reshape(B, T, H * dh))
        tap(self, "attn_out", y_BxTxD)
        return y_BxTxD

    def _explicit(self, q, k, v, slot, kind: AttentionKind, mode: str | None) -> jax.Array:
        """The materialised path: [B, H, T, S] float32 logits and weights (every kind)."""
        cfg = self.cfg
        B, T, H, dh = q.shape
        dtype = jnp.dtype(cfg.dtype)
        if slot is not None:
            k, v = (jnp.concatenate([_slot(p, x), x], axis=1) for p, x in zip(slot, (k, v)))
        group = H // k.shape[2]
        if group > 1:  # grouped-query attention: each key/value head serves `group` query heads
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        S = k.shape[1]
        logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) \
            * attention_scale(cfg)
        tap(self, "attn_logits", logits_BxHxTxS)
        z_BxHxTxS = logits_BxHxTxS
        if cfg.positions == "alibi":
            z_BxHxTxS = z_BxHxTxS + alibi_bias(H, T, S)[None]
        mask_TxS = causal_mask(T, S)
        probs_BxHxTxS = kind.weights(z_BxHxTxS, mask_TxS[None, None], cfg)
        tap(self, "attn_probs", probs_BxHxTxS)
        if mode == "stats":
            tap_stats(self, map_row_stats(logits_BxHxTxS, z_BxHxTxS, probs_BxHxTxS, mask_TxS, key_slots(cfg),
                                          softmax=kind.fused == "softmax"))
        return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(dtype), v.astype(dtype))

    def _fused(self, impl: str, q, k, v, slot, kind: AttentionKind, mode: str | None) -> jax.Array:
        """A kernel that never holds a [T, S] map; the attention-bias slot joins afterwards."""
        cfg = self.cfg
        H = q.shape[2]
        scale = attention_scale(cfg)
        bias = cfg.resolved_sigmoid_bias if kind.fused == "sigmoid" else 0.0
        slopes = jnp.asarray(alibi_slopes(H)) if cfg.positions == "alibi" else None
        rows = {}
        if impl == "blockwise":
            out, lse, rows = blockwise.blockwise_attention(q, k, v, kind=kind.fused, scale=scale, bias=bias,
                                                           alibi_slopes=slopes, block=cfg.attention_block,
                                                           stats=mode == "stats")
        else:
            out, lse = IMPLS.get(impl).run(q, k, v, kind.fused, scale, bias, slopes, cfg)
            if mode == "stats":  # this kernel keeps no statistics: one blockwise pass, forward only
                _, _, rows = blockwise.blockwise_attention(q, k, v, kind=kind.fused, scale=scale, bias=bias,
                                                           alibi_slopes=slopes, block=cfg.attention_block,
                                                           stats=True)
        slot_score = None
        if slot is not None:  # slot 0 seen by every query, no ALiBi distance (Sun et al. 2024)
            out, slot_score = _join_slot(out, lse, q, slot, kind.fused, scale, bias)
        if mode == "stats":
            tap_stats(self, blockwise.finish_row_stats(kind.fused, rows, bias=bias, slot_score=slot_score))
        return out

    def _gate(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        D, H = x_BxTxD.shape[-1], cfg.n_heads
        if D % H:
            raise ValueError(f"gated attention slices the attention input per head: model.d_model ({D}) "
                             f"must be divisible by model.n_heads ({H})")
        return HeadGate(H, cfg.init_std, cfg.gate_bias_init, name="gate")(x_BxTxD)

class AttentionBias(nn.Module):
    """Sun et al. 2024: learnable k', v' [H, head_dim], init N(0, 0.02) (group 'attn_bias')."""

    n_heads: int
    head_dim: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", "kv"))
        shape = (self.n_heads, self.head_dim)
        return self.param("k", init, shape, jnp.float32), self.param("v", init, shape, jnp.float32)


class HeadGate(nn.Module):
    """Bondarenko et al. 2023 gates [B, T, H] = sigmoid(x_h . w_h + b_h), x_h head h's slice
    of x [B, T, D]. 'kernel' [H, D/H] (std 1/sqrt(D/H) or `init_std`), 'bias' [H]."""

    n_heads: int
    init_std: float | None
    bias_init: float

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        B, T, D = x_BxTxD.shape
        H = self.n_heads
        c = D // H
        std = self.init_std if self.init_std is not None else c**-0.5
        w = self.param("kernel", nn.with_logical_partitioning(truncated_normal(std), ("heads", None)),
                       (H, c), jnp.float32)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), ("heads",)),
                       (H,), jnp.float32)
        x_BxTxHxC = x_BxTxD.astype(jnp.float32).reshape(B, T, H, c)
        return jax.nn.sigmoid(jnp.einsum("bthc,hc->bth", x_BxTxHxC, w) + b)


def _slot(p: jax.Array, like: jax.Array) -> jax.Array:
    """A [Hkv, dh] bias key or value broadcast to one slot [B, 1, Hkv, dh]."""
    B, _, Hk, dh = like.shape
    return jnp.broadcast_to(p.astype(like.dtype)[None, None], (B, 1, Hk, dh))


def _join_slot(out_BxTxHxK, lse_BxHxT, q_BxTxHxK, slot, fused: str, scale: float, bias: Any):
    """Attention over [slot 0, the sequence] from the sequence's own output and log-sum-exp:
    softmax renormalises the two parts by their log-sum-exps; sigmoid adds the slot's term.
    Returns (output, the slot's score q.k' scale [B, H, T])."""
    kb, vb = slot
    H, Hk = q_BxTxHxK.shape[2], kb.shape[0]
    kb_HxK, vb_HxK = jnp.repeat(kb, H // Hk, axis=0), jnp.repeat(vb, H // Hk, axis=0)
    score_BxHxT = jnp.einsum("bthk,hk->bht", q_BxTxHxK.astype(jnp.float32), kb_HxK) * scale
    out = out_BxTxHxK.astype(jnp.float32)
    if fused == "softmax":
        total = jnp.logaddexp(lse_BxHxT, score_BxHxT)
        w_seq, w_slot = jnp.exp(lse_BxHxT - total), jnp.exp(score_BxHxT - total)
        out = out * jnp.swapaxes(w_seq, 1, 2)[..., None]
    else:
        w_slot = jax.nn.sigmoid(score_BxHxT + bias)
    out = out + jnp.swapaxes(w_slot, 1, 2)[..., None] * vb_HxK.astype(jnp.float32)
    return out, score_BxHxT


def map_row_stats(logits_BxHxTxS, scores_BxHxTxS, probs_BxHxTxS, mask_TxS, offset: int,
                  softmax: bool = False) -> dict[str, jax.Array]:
    """The per-layer attention statistics of `blockwise.finish_row_stats`, from whole maps:
    logits q.k scale, scores (logits plus ALiBi), the weights used, the causal mask and the
    index of the first token's key slot. `softmax`: the weights are the softmax of the scores
    over the visible keys, so the row's largest weight is exp(0) / Z exactly: log Z = m - log
    max p (m the row's largest score), and the entropy is -log max p - sum p (z - m). No
    per-entry exp or log is needed then (each term is at most log S in size: no cancellation
    at large logits)."""
    vis = mask_TxS[None, None]
    mass = jnp.sum(probs_BxHxTxS, axis=-1)
    if softmax:
        z_max = jnp.max(jnp.where(vis, scores_BxHxTxS, -jnp.inf), axis=-1)
        log_p_max = jnp.log(jnp.max(probs_BxHxTxS, axis=-1))
        lse = z_max - log_p_max
        spread = jnp.where(vis, scores_BxHxTxS - z_max[..., None], 0.0)
        entropy = -log_p_max - jnp.sum(probs_BxHxTxS * spread, axis=-1)
    else:
        lse = jax.nn.logsumexp(jnp.where(vis, scores_BxHxTxS, -jnp.inf), axis=-1)
        safe = jnp.where(mass > 0, mass, 1.0)[..., None]
        p = jnp.where(mass[..., None] > 0, probs_BxHxTxS / safe, 0.0)
        entropy = -jnp.sum(xlogy(p, p), axis=-1)
    return {
        "attn_logit_max": jnp.max(jnp.where(vis, jnp.abs(logits_BxHxTxS), 0.0)),
        "attn_logz_mean": jnp.mean(lse),
        "attn_logz_max": jnp.max(lse),
        "attn_entropy": jnp.mean(entropy),
        "attn_row_mass": jnp.mean(mass),
        "attn_sink_mass": jnp.mean(probs_BxHxTxS[..., offset]),
    }
