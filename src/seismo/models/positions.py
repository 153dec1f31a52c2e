"""Position information: rotary embeddings, ALiBi biases and learned absolute positions.

    rope     Su et al. 2021, RoFormer (arXiv 2104.09864): rotate pairs of q/k channels by
             position-dependent angles theta_i = base^(-2i/d_h); q.k then depends on i - j.
             The rotation keeps norms, so qk-layernorm's bound |q.k| <= d_h still holds.
    alibi    Press et al. 2021, ALiBi (arXiv 2108.12409): add -m_h * (i - j) to the logits,
             slopes m_h geometric (2^(-8/H), 2^(-16/H), ...; the standard interleaving for a
             head count that is not a power of two). The sigmoid-attention LMs of Ramapuram
             et al. 2024 use it (docs/methods.md §2.1); sigmoid is not shift-invariant, so the full
             offsets are used, never a shifted variant.
    learned  GPT-2: a [max_seq_len, d_model] table added to the token embeddings (made in
             transformer.py; group 'embedding').
    none     no position information beyond causal masking.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_angles(positions_T: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, each [T, head_dim // 2], float32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_TxK = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles_TxK), jnp.sin(angles_TxK)


def apply_rope(x_BxTxHxK: jax.Array, base: float) -> jax.Array:
    """Rotate q or k [B, T, H, head_dim] by position (split-half convention, as in
    GPT-NeoX and nanodo). Computed in float32, returned in the input dtype."""
    T, dh = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
    cos_TxK, sin_TxK = rope_angles(jnp.arange(T), dh, base)
    cos, sin = cos_TxK[None, :, None, :], sin_TxK[None, :, None, :]
    z = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = z[..., : dh // 2], z[..., dh // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """The standard ALiBi slopes for `n_heads` heads (Press et al., reference implementation):
    for a power of two n, 2^(-8 i / n) for i = 1..n; otherwise the slopes of the next lower
    power of two followed by every other slope of twice that many."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, np.float32)


def alibi_bias(n_heads: int, T: int, S: int) -> jax.Array:
    """ALiBi logit bias [H, T, S]: -m_h * (i - j) for query i and key j. When S = T + 1 (an
    explicit attention-bias slot at index 0) the extra slot has no distance and gets 0."""
    offset = S - T
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S - offset)[None, :]
    dist_TxS = (i - j).astype(jnp.float32)
    if offset:
        dist_TxS = jnp.concatenate([jnp.zeros((T, offset), jnp.float32), dist_TxS], axis=1)
    return -jnp.asarray(alibi_slopes(n_heads))[:, None, None] * dist_TxS[None]
