"""The language-model loss: token cross-entropy plus the optional z-loss, with log Z statistics.

    ce      = mean_t [ log Z_t - y_t[target_t] ],   log Z_t = logsumexp(y_t)
    z_loss  = coef * mean_t (log Z_t)^2

The z-loss keeps log Z near 0; it removes the output-logit divergence of Wortsman et al. 2023
(arXiv 2309.14322, section 3.2; docs/methods.md §1.3 and 1.8, coefficient 1e-4 in the paper). The
mean and max of log Z per step are that paper's Fig. 4 diagnostic. Everything is float32.
"""

from __future__ import annotations

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
