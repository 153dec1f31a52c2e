"""The language-model loss: token cross-entropy plus the optional z-loss, with log Z statistics.

    ce      = mean_t [ log Z_t - y_t[target_t] ],   log Z_t = logsumexp(y_t)
    z_loss  = coef * mean_t (log Z_t)^2

The z-loss keeps log Z near 0; it removes the output-logit divergence of Wortsman et al. 2023
(arXiv 2309.14322, section 3.2; docs/methods.md §1.3 and 1.8, coefficient 1e-4 in the paper). The
mean and max of log Z per step are that paper's Fig. 4 diagnostic. Everything is float32.

`lm_loss_chunked` computes the same loss and statistics from the final hidden states, applying
the output head to `chunk` sequence positions at a time inside a rematerialised scan, so the
[B, T, V] float32 logits never exist at once (the memory of a large vocabulary; the same idea
as the blockwise cross-entropy of Wijmans et al. 2024, arXiv 2411.09009, without a kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def lm_loss(
    logits_BxTxV: jax.Array,
    targets_BxT: jax.Array,
    *,
    z_loss: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, stats) with loss = ce + z_loss (the weighted term).

    `mask` [B, T] weighs tokens (1 counts, 0 ignores); None counts every token. stats (float32
    scalars): 'ce', 'z_loss' (already multiplied by the coefficient), 'logz_mean', 'logz_max'
    (over counted tokens), 'logit_mean' (mean output logit). `z_loss` may be a traced value
    (vmapped sweeps).
    """
    logits = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w_BxT = jnp.ones(targets_BxT.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w_BxT), 1.0)
    mean = lambda v: jnp.sum(v * w_BxT) / count
    ce = mean(logz_BxT - target_logit_BxT)
    zl = z_loss * mean(jnp.square(logz_BxT))
    stats = {
        "ce": ce,
        "z_loss": zl,
        "logz_mean": mean(logz_BxT),
        "logz_max": jnp.max(jnp.where(w_BxT > 0, logz_BxT, -jnp.inf)),
        "logit_mean": mean(jnp.mean(logits, axis=-1)),
    }
    return ce + zl, stats


def _sums(logits, targets, w):
    """Weighted sums of one chunk: ce, log Z^2, log Z, mean logit; and the max log Z."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    sums = jnp.stack([jnp.sum(w * (logz - target_logit)), jnp.sum(w * jnp.square(logz)), jnp.sum(w * logz),
                      jnp.sum(w * jnp.mean(logits, axis=-1))])
    return sums, jnp.max(jnp.where(w > 0, logz, -jnp.inf))


def lm_loss_chunked(
    head: Callable[[jax.Array], jax.Array],
    hidden_BxTxD: jax.Array,
    targets_BxT: jax.Array,
    *,
    chunk: int,
    z_loss: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`lm_loss(head(hidden), ...)` with the head applied `chunk` positions at a time (module
    docstring). `head`: hidden [B, c, D] -> logits [B, c, V] float32. The sequence is padded
    to a whole number of chunks with weight 0."""
    B, T, D = hidden_BxTxD.shape
    c = min(chunk, T)
    n = -(-T // c)
    w_BxT = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    pad = n * c - T
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        w_BxT = jnp.pad(w_BxT, ((0, 0), (0, pad)))
    split = lambda x: jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of keeping them
    def part(x, t, w):
        return _sums(head(x).astype(jnp.float32), t, w)

    def body(carry, xs):
        sums, top = carry
        s, m = part(*xs)
        return (sums + s, jnp.maximum(top, m)), None

    init = (jnp.zeros(4, jnp.float32), jnp.asarray(-jnp.inf, jnp.float32))
    (sums, top), _ = jax.lax.scan(body, init, (split(hidden_BxTxD), split(targets_BxT), split(w_BxT)))
    count = jnp.maximum(jnp.sum(w_BxT), 1.0)
    ce, z2, logz, logit = sums[0] / count, sums[1] / count, sums[2] / count, sums[3] / count
    zl = z_loss * z2
    stats = {"ce": ce, "z_loss": zl, "logz_mean": logz, "logz_max": top, "logit_mean": logit}
    return ce + zl, stats
