"""Spectral statistics of weight matrices: condition number and effective rank.

Sources:
- Condition number kappa = sigma_max / sigma_min per weight tensor, and its top-r variant
  for nearly singular matrices: Ludwig 2025, KappaTune, arXiv 2506.16289 (docs/methods.md §7.1).
- Effective rank exp(H(sigma / sum sigma)): Roy & Vetterli 2007, "The effective rank: a
  measure of effective dimensionality", EUSIPCO (docs/methods.md §7.1, 7.6).

Every function takes a matrix [a, b] or a stack [..., a, b] (e.g. scanned layers [L, a, b])
and returns one value per matrix. The SVD runs in float32 whatever the input dtype
(bf16 singular values are too coarse to separate sigma_min from 0). Keep these off the
training step: they run over checkpoints.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy
from jax.typing import ArrayLike

Array = jax.Array


@jax.jit
def singular_values(w_AxB: ArrayLike) -> Array:
    """Singular values in descending order, float32 [..., min(a, b)]."""
    w = jnp.asarray(w_AxB, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 axes, got shape {tuple(w.shape)}")
    return jnp.linalg.svd(w, compute_uv=False)


@partial(jax.jit, static_argnames="top_r")
def condition_number(w_AxB: ArrayLike, top_r: int | None = None) -> Array:
    """kappa = sigma_1 / sigma_r, with r = min(a, b) by default (sigma_max / sigma_min).

    inf when sigma_r is 0. A numerically rank-deficient matrix gives a huge finite value
    (float32 rounding leaves sigma_min near 1e-7 sigma_max); `top_r` restricts the ratio
    to the r largest singular values, the variant to log when sigma_min is tiny.
    """
    s = singular_values(w_AxB)
    n = s.shape[-1]
    r = n if top_r is None else top_r
    if not 1 <= r <= n:
        raise ValueError(f"top_r must be between 1 and {n}, got {top_r}")
    s_min = s[..., r - 1]
    return jnp.where(s_min > 0, s[..., 0] / jnp.where(s_min > 0, s_min, 1.0), jnp.inf)


@jax.jit
def effective_rank(w_AxB: ArrayLike) -> Array:
    """exp of the Shannon entropy (nats) of the normalised singular values p = sigma / sum.

    Between 1 (rank 1) and min(a, b) (all singular values equal); 0 for the zero matrix.
    """
    s = singular_values(w_AxB)
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.where(total > 0, total, 1.0)
    erank = jnp.exp(-jnp.sum(xlogy(p, p), axis=-1))
    return jnp.where(total[..., 0] > 0, erank, 0.0)
