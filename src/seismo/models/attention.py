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

The logits and weights are float32 whatever the compute dtype. Taps (when the model runs with
taps): 'attn_logits' = q.k * scale in float32, after qk-norm and rope, before alibi, sigmoid
bias and mask, [B, H, T, S]; 'attn_probs' = the attention weights actually used (masked
entries 0), [B, H, T, S]; 'attn_out' = the sublayer output [B, T, D] (after the output
projection, before any post-norm, LayerScale or residual add).

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

from seismo.config import ModelConfig
from seismo.models.linear import Dense, truncated_normal
from seismo.models.norms import LayerNorm
from seismo.models.positions import alibi_bias, apply_rope
from seismo.models.taps import tap
from seismo.registry import Registry

# weights(z_BxHxTxS float32 (logits + position bias), mask_TxS bool, cfg) -> weights, masked 0
WeightsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclass(frozen=True)
class AttentionKind:
    """What `model.attention` names: how logits become weights, and whether heads are gated."""

    weights: WeightsFn
    output_gate: bool = False
    description: str = ""


ATTENTIONS: Registry[AttentionKind] = Registry("attention")

_NEG = -1e30  # a float32 logit that softmax turns into an exact 0 without inf - inf NaNs


def softmax_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    p = jax.nn.softmax(jnp.where(mask, z, _NEG), axis=-1)
    return jnp.where(mask, p, 0.0)


def sigmoid_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jnp.where(mask, jax.nn.sigmoid(z + cfg.resolved_sigmoid_bias), 0.0)


def clipped_softmax_weights(z: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    p = softmax_weights(z, mask, cfg)
    p = jnp.clip((cfg.clip_zeta - cfg.clip_gamma) * p + cfg.clip_gamma, 0.0, 1.0)
    return jnp.where(mask, p, 0.0)


ATTENTIONS.register("softmax", AttentionKind(softmax_weights, description="softmax attention"))
ATTENTIONS.register("sigmoid", AttentionKind(
    sigmoid_weights, description="sigmoid attention with bias -log n (Ramapuram et al., arXiv 2409.04431)"))
ATTENTIONS.register("clipped_softmax", AttentionKind(
    clipped_softmax_weights, description="clipped softmax (Bondarenko et al., arXiv 2306.12929)"))
ATTENTIONS.register("gated", AttentionKind(
    softmax_weights, output_gate=True, description="softmax with per-head output gates (Bondarenko et al.)"))


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
        H, dh = cfg.n_heads, cfg.resolved_head_dim
        dtype = jnp.dtype(cfg.dtype)

        def proj(name: str, std: float | None) -> jax.Array:
            dense = Dense(D, H * dh, ("embed", "heads"), std, cfg.use_bias, dtype, name=name)
            return dense(x_BxTxD).reshape(B, T, H, dh)

        q_BxTxHxK = proj("query", 0.0 if cfg.mup == "full" else cfg.init_std)
        k_BxTxHxK = proj("key", cfg.init_std)
        v_BxTxHxK = proj("value", cfg.init_std)
        if cfg.qk_norm:  # per head over head_dim; scale shared across heads; never a bias
            q_BxTxHxK = LayerNorm(cfg.norm_eps, use_bias=False, axis_name="kv", name="q_norm")(q_BxTxHxK)
            k_BxTxHxK = LayerNorm(cfg.norm_eps, use_bias=False, axis_name="kv", name="k_norm")(k_BxTxHxK)
        if cfg.positions == "rope":
            q_BxTxHxK = apply_rope(q_BxTxHxK, cfg.rope_base)
            k_BxTxHxK = apply_rope(k_BxTxHxK, cfg.rope_base)
        if key_slots(cfg):
            k_BxSxHxK, v_BxSxHxK = self._prepend_bias_slot(k_BxTxHxK, v_BxTxHxK)
        else:
            k_BxSxHxK, v_BxSxHxK = k_BxTxHxK, v_BxTxHxK
        S = k_BxSxHxK.shape[1]

        logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK.astype(jnp.float32),
                                    k_BxSxHxK.astype(jnp.float32)) * attention_scale(cfg)
        tap(self, "attn_logits", logits_BxHxTxS)
        z_BxHxTxS = logits_BxHxTxS
        if cfg.positions == "alibi":
            z_BxHxTxS = z_BxHxTxS + alibi_bias(H, T, S)[None]
        probs_BxHxTxS = kind.weights(z_BxHxTxS, causal_mask(T, S)[None, None], cfg)
        tap(self, "attn_probs", probs_BxHxTxS)

        out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(dtype), v_BxSxHxK.astype(dtype))
        if kind.output_gate:
            out_BxTxHxK = out_BxTxHxK * self._gate(x_BxTxD)[..., None].astype(dtype)
        out = Dense(H * dh, D, ("heads", "embed"), cfg.init_std, cfg.use_bias, dtype, name="out")
        y_BxTxD = out(out_BxTxHxK.reshape(B, T, H * dh))
        tap(self, "attn_out", y_BxTxD)
        return y_BxTxD

    def _prepend_bias_slot(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        B, _, H, dh = k.shape
        kb, vb = AttentionBias(H, dh, name="attn_bias")()
        slot = lambda p, like: jnp.broadcast_to(p.astype(like.dtype)[None, None], (B, 1, H, dh))
        return jnp.concatenate([slot(kb, k), k], axis=1), jnp.concatenate([slot(vb, v), v], axis=1)

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
