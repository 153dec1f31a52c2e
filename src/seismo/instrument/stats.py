"""Statistics of activations and attention maps: pure functions on arrays.

Every function takes arrays (numpy or jax), computes in at least float32 and returns jax
arrays. Each is jitted (its integer and boolean options are static), so a notebook call
compiles once per shape, and each traces inside an outer `jax.jit` or `jax.vmap`. Shapes are in the argument names: B batch,
T query positions, S key slots, H heads, D features, L layers, N tokens. Definitions, units
and where each value is logged: docs/metrics.md.

Sources:
- Massive activations: Sun et al. 2024, "Massive Activations in Large Language Models",
  arXiv 2402.17762 (docs/methods.md §3). The continuous top-1/median ratio, per sequence then
  averaged: Gallego-Feliciano et al. 2025, arXiv 2508.03616 (docs/methods.md §4.1, pitfall 0.1.4).
- Max attention logit: Wortsman et al. 2023, arXiv 2309.14322 (docs/methods.md §1.3).
- Attention entropy: Zhai et al. 2023, arXiv 2303.06296 (docs/methods.md §7.2). Row mass for
  sigmoid attention: Ramapuram et al. 2024, arXiv 2409.04431 (docs/methods.md §2, 8).
- Sink scores: Gu et al. 2024, arXiv 2410.10781, threshold 0.3 (docs/methods.md §7.5).
- RMS: Wortsman et al. 2023 (docs/methods.md §1.4). Kurtosis and infinity norm: Bondarenko et al.
  2023, arXiv 2306.12929, and Nrusimha et al. 2024, arXiv 2404.03605 (docs/methods.md §7.3, 7.4).
- Rank collapse: Dong et al. 2021, arXiv 2103.03404 (docs/methods.md §7.6).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy
from jax.typing import ArrayLike

Array = jax.Array

# Sun et al. 2024, section 2: |a| > 100 and |a| >= ~1000 x median(|h|). A flag, not the
# measure: small models never reach it (Pythia-14M peaks at a ratio of 83; pitfall 0.1.4).
MASSIVE_MIN_ABS = 100.0
MASSIVE_MIN_RATIO = 1000.0

# Gu et al. 2024: a head is a sink head for key k when its sink score exceeds 0.3.
SINK_EPS = 0.3


def as_float(x: ArrayLike) -> Array:
    """`x` as a jax array of at least float32: bf16 taps are summed and sorted in float32."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _require_ndim(x: Array, ndim: int, name: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- massive


def median_nonneg(a: ArrayLike) -> Array:
    """`jnp.median(a, axis=-1)` for non-negative float32 `a` (such as |h|), to the bit, without a
    sort. The order statistics come from a binary search on the floats' bits (non-negative
    floats order as their int32 bit patterns do): 31 passes that count the entries below a
    candidate, O(31 N) work and no [N] permutation. XLA's sort is the slow part of a median
    on CPU (on 3 layers of 16 x 64 x 64 residuals: 131 ms for jnp.median, 7 ms for this). The
    two middle values are combined with jnp.quantile's own weights, and a NaN anywhere gives
    NaN, as jnp.median does. Other dtypes go to jnp.median."""
    a = jnp.asarray(a)
    if a.dtype != jnp.float32:
        return jnp.median(a, axis=-1)
    n = a.shape[-1]
    q = np.float32(0.5) * (np.float32(n) - np.float32(1))  # jnp.quantile's position, in its dtype
    low, high = int(np.floor(q)), int(np.ceil(q))
    w_high = np.float32(q - np.float32(low))
    w_low = np.float32(1) - w_high
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)

    def search(i, prefix):  # the largest pattern with at most `low` entries below it
        candidate = prefix | (jnp.int32(1) << (30 - i))
        return jnp.where(jnp.sum(bits < candidate[..., None], axis=-1) <= low, candidate, prefix)

    low_bits = jax.lax.fori_loop(0, 31, search, jnp.zeros(a.shape[:-1], jnp.int32), unroll=4)
    low_value = jax.lax.bitcast_convert_type(low_bits, jnp.float32)
    if high == low:
        high_value = low_value
    else:  # the next order statistic: the same value while it repeats, else the next larger one
        repeats = jnp.sum(bits <= low_bits[..., None], axis=-1) > high
        above = jnp.min(jnp.where(bits > low_bits[..., None], a, jnp.inf), axis=-1)
        high_value = jnp.where(repeats, low_value, above)
    median = low_value * w_low + high_value * w_high
    return jnp.where(jnp.any(jnp.isnan(a), axis=-1), jnp.nan, median)


@partial(jax.jit, static_argnames="k")
def massive_activations(h_BxTxD: ArrayLike, k: int = 5) -> dict[str, Array]:
    """Massive-activation summary of one layer's residual stream (post-residual block output).

    Returns scalars
      max_abs, median_abs   over all B*T*D entries
      ratio                 max_abs / median_abs (inf when the median is 0)
      ratio_seq_mean        max/median computed per sequence, then averaged over B: the
                            quantity Gallego-Feliciano et al. fit over training
    and, for the k largest |h| (largest first), arrays [k]
      top_value (signed), top_batch, top_position, top_dim (int32), top_ratio = |a|/median,
      top_strict            |a| > 100 and |a|/median >= 1000 (Sun et al.'s rule)
    """
    h = as_float(h_BxTxD)
    _require_ndim(h, 3, "h_BxTxD")
    if not 1 <= k <= h.size:
        raise ValueError(f"k must be between 1 and the number of entries {h.size}, got {k}")
    a_BxTxD = jnp.abs(h)
    median = median_nonneg(a_BxTxD.reshape(-1))
    max_abs = jnp.max(a_BxTxD)
    a_BxN = a_BxTxD.reshape(h.shape[0], -1)
    ratio_B = jnp.max(a_BxN, axis=1) / median_nonneg(a_BxN)
    top_abs, flat_idx = jax.lax.top_k(a_BxTxD.reshape(-1), k)
    b, t, d = jnp.unravel_index(flat_idx, h.shape)
    top_ratio = top_abs / median
    return {
        "max_abs": max_abs,
        "median_abs": median,
        "ratio": max_abs / median,
        "ratio_seq_mean": jnp.mean(ratio_B),
        "top_value": h.reshape(-1)[flat_idx],
        "top_batch": b.astype(jnp.int32),
        "top_position": t.astype(jnp.int32),
        "top_dim": d.astype(jnp.int32),
        "top_ratio": top_ratio,
        "top_strict": (top_abs > MASSIVE_MIN_ABS) & (top_ratio >= MASSIVE_MIN_RATIO),
    }


@partial(jax.jit, static_argnames="k")
def massive_activations_per_layer(h_LxBxTxD: ArrayLike, k: int = 5) -> dict[str, Array]:
    """`massive_activations` for each layer of stacked taps: every value gains a leading L."""
    return jax.vmap(lambda h: massive_activations(h, k))(as_float(h_LxBxTxD))


# ----------------------------------------------------------------------------- attention


def visible_TxS(t: int, s: int, offset: int | None = None) -> Array:
    """Causal visibility of key slot j to query i, bool [T, S].

    Slots j < offset are extra slots every query sees (the explicit attention bias k', v' of
    Sun et al. 2024 sits at slot 0, offset 1); slot j >= offset holds position j - offset,
    visible to query i when j - offset <= i. `offset=None` takes S - T: 1 when the model's
    attention bias adds a slot, 0 otherwise (the model's own mask, models/attention.py).
    """
    offset = s - t if offset is None else offset
    if not 0 <= offset <= s:
        raise ValueError(f"offset must be between 0 and S={s} (extra key slots), got {offset}")
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    return (j < offset) | (j - offset <= i)


@partial(jax.jit, static_argnames=("causal", "offset"))
def max_attention_logit(
    logits_BxHxTxS: ArrayLike, causal: bool = True, offset: int | None = None
) -> dict[str, Array]:
    """Largest attention logit z_ij = <q_i, k_j>/sqrt(d_h) over batch, heads and visible pairs.

    Pass the logits before the mask. With `causal`, only pairs in `visible_TxS(T, S, offset)`
    count, so masked entries (even -inf) never win; `offset` (the always-visible slots before
    the first token) defaults to S - T. Returns {"max_abs": max |z|, "max": max z}.
    """
    z = as_float(logits_BxHxTxS)
    _require_ndim(z, 4, "logits_BxHxTxS")
    if causal:
        mask = visible_TxS(z.shape[2], z.shape[3], offset)
        return {
            "max_abs": jnp.max(jnp.where(mask, jnp.abs(z), 0.0)),
            "max": jnp.max(jnp.where(mask, z, -jnp.inf)),
        }
    return {"max_abs": jnp.max(jnp.abs(z)), "max": jnp.max(z)}


@partial(jax.jit, static_argnames=("causal", "offset"))
def max_attention_logit_per_layer(
    logits_LxBxHxTxS: ArrayLike, causal: bool = True, offset: int | None = None
) -> dict[str, Array]:
    """`max_attention_logit` per layer: {"max_abs": [L], "max": [L]}."""
    fn = lambda z: max_attention_logit(z, causal=causal, offset=offset)
    return jax.vmap(fn)(as_float(logits_LxBxHxTxS))


@jax.jit
def attention_entropy(probs_BxHxTxS: ArrayLike) -> dict[str, Array]:
    """Attention entropy H_i = -sum_j A_ij log A_ij (nats), averaged over queries and batch.

    Rows are normalised to sum to 1 first. For softmax attention that changes nothing; for
    sigmoid attention (rows do not sum to 1) it is the entropy of where the row looks, and
    the row mass is reported separately by `attention_row_mass`. 0 log 0 = 0; a row with no
    mass has entropy 0. A causal row i of a uniform map has H = log(i + 1).
    Returns {"per_head": [H], "mean": scalar}.
    """
    a = as_float(probs_BxHxTxS)
    _require_ndim(a, 4, "probs_BxHxTxS")
    mass_BxHxT = jnp.sum(a, axis=-1, keepdims=True)
    p = jnp.where(mass_BxHxT > 0, a / jnp.where(mass_BxHxT > 0, mass_BxHxT, 1.0), 0.0)
    ent_BxHxT = -jnp.sum(xlogy(p, p), axis=-1)
    per_head = jnp.mean(ent_BxHxT, axis=(0, 2))
    return {"per_head": per_head, "mean": jnp.mean(per_head)}


@jax.jit
def attention_entropy_per_layer(probs_LxBxHxTxS: ArrayLike) -> dict[str, Array]:
    """`attention_entropy` per layer: {"per_head": [L, H], "mean": [L]}."""
    return jax.vmap(attention_entropy)(as_float(probs_LxBxHxTxS))


@jax.jit
def attention_row_mass(probs_BxHxTxS: ArrayLike) -> dict[str, Array]:
    """Mean attention row mass sum_j A_ij over queries and batch: 1 for softmax; for sigmoid
    attention with b = -log n it starts near n/(n+1) (docs/methods.md §2.5).
    Returns {"per_head": [H], "mean": scalar}."""
    a = as_float(probs_BxHxTxS)
    _require_ndim(a, 4, "probs_BxHxTxS")
    per_head = jnp.mean(jnp.sum(a, axis=-1), axis=(0, 2))
    return {"per_head": per_head, "mean": jnp.mean(per_head)}


@jax.jit
def attention_row_mass_per_layer(probs_LxBxHxTxS: ArrayLike) -> dict[str, Array]:
    """`attention_row_mass` per layer: {"per_head": [L, H], "mean": [L]}."""
    return jax.vmap(attention_row_mass)(as_float(probs_LxBxHxTxS))


@partial(jax.jit, static_argnames="offset")
def sink_scores(probs_BxHxTxS: ArrayLike, offset: int | None = None) -> Array:
    """Sink score alpha_k of every key slot k, per head, float [H, S].

    alpha_k = attention to slot k averaged over the batch and over the queries that can see
    it (i >= k - offset; every query for the slots before `offset`, by default S - T). A slot
    no query sees
    scores 0. High scores at non-BOS slots point at secondary sinks (docs/methods.md §7.5).
    """
    a = as_float(probs_BxHxTxS)
    _require_ndim(a, 4, "probs_BxHxTxS")
    b, _, t, s = a.shape
    vis_TxS = visible_TxS(t, s, offset)
    total_HxS = jnp.sum(jnp.where(vis_TxS, a, 0.0), axis=(0, 2))
    count_S = b * jnp.sum(vis_TxS, axis=0)
    return total_HxS / jnp.maximum(count_S, 1)


@partial(jax.jit, static_argnames=("position", "offset"))
def sink_mass(probs_BxHxTxS: ArrayLike, position: int = 0, offset: int | None = None) -> Array:
    """Sink score alpha of one key slot (`position` indexes S), per head, float [H].

    With the explicit attention bias (offset 1, inferred when S = T + 1), position 0 is the
    bias slot and position 1 the first token.
    """
    a = as_float(probs_BxHxTxS)
    _require_ndim(a, 4, "probs_BxHxTxS")
    if not 0 <= position < a.shape[3]:
        raise ValueError(f"position {position} is outside the {a.shape[3]} key slots")
    offset = a.shape[3] - a.shape[2] if offset is None else offset
    first_query = max(position - offset, 0)
    if first_query >= a.shape[2]:
        return jnp.zeros(a.shape[1], a.dtype)
    return jnp.mean(a[:, :, first_query:, position], axis=(0, 2))


@partial(jax.jit, static_argnames=("position", "offset"))
def sink_fraction(
    probs_LxBxHxTxS: ArrayLike, eps: float = SINK_EPS, position: int = 0, offset: int | None = None
) -> dict[str, Array]:
    """Fraction of (layer, head) pairs whose sink score for slot `position` exceeds `eps`.

    Returns {"fraction": scalar, "fraction_per_layer": [L], "alpha": [L, H] sink scores,
    "is_sink": bool [L, H]}.
    """
    a = as_float(probs_LxBxHxTxS)
    _require_ndim(a, 5, "probs_LxBxHxTxS")
    alpha_LxH = jax.vmap(lambda p: sink_mass(p, position=position, offset=offset))(a)
    is_sink_LxH = alpha_LxH > eps
    return {
        "fraction": jnp.mean(is_sink_LxH),
        "fraction_per_layer": jnp.mean(is_sink_LxH, axis=1),
        "alpha": alpha_LxH,
        "is_sink": is_sink_LxH,
    }


# ----------------------------------------------------------------------------- activations


@partial(jax.jit, static_argnames="axis")
def rms(x: ArrayLike, axis: int | tuple[int, ...] | None = None) -> Array:
    """Root mean square sqrt(mean(x^2)) over `axis` (all entries by default)."""
    x = as_float(x)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axis))


@partial(jax.jit, static_argnames="axis")
def max_abs(x: ArrayLike, axis: int | tuple[int, ...] | None = None) -> Array:
    """max |x| over `axis`. Over a whole tensor this is its infinity norm, the outlier measure
    Bondarenko et al. log for FFN and block outputs (`inf_norm` is the same function)."""
    return jnp.max(jnp.abs(as_float(x)), axis=axis)


inf_norm = max_abs


@partial(jax.jit, static_argnames="axis")
def zero_fraction(x: ArrayLike, axis: int | tuple[int, ...] | None = None) -> Array:
    """Fraction of entries exactly 0 (ReLU sparsity, Li et al. 2022, docs/methods.md §5.1).
    The nonzero fraction of the Lazy Neuron paper is 1 minus this."""
    return jnp.mean(jnp.asarray(x) == 0, axis=axis)


@partial(jax.jit, static_argnames="axis")
def kurtosis(x: ArrayLike, axis: int = -1) -> Array:
    """Kurtosis E[(x - mu)^4] / sigma^4 along `axis` (channels of each token by default).

    The plain (Pearson) kurtosis with population moments, equal to
    `scipy.stats.kurtosis(x, axis, fisher=False)`: 3 for a Gaussian, 1.8 for a uniform,
    large for a few outlier channels. A constant slice gives nan.
    """
    x = as_float(x)
    dev = x - jnp.mean(x, axis=axis, keepdims=True)
    m2 = jnp.mean(jnp.square(dev), axis=axis)
    m4 = jnp.mean(jnp.square(jnp.square(dev)), axis=axis)
    return m4 / jnp.square(m2)


@partial(jax.jit, static_argnames="axis")
def kurtosis_stats(x_NxD: ArrayLike, axis: int = -1) -> dict[str, Array]:
    """Per-token kurtosis over channels, then {"mean", "max"} over tokens (nan slices ignored):
    Bondarenko et al.'s average and max kurtosis."""
    k = kurtosis(x_NxD, axis=axis)
    return {"mean": jnp.nanmean(k), "max": jnp.nanmax(k)}


@jax.jit
def rank_collapse_residual(h_BxTxD: ArrayLike) -> Array:
    """Token-uniformity residual ||X - 1 mean_t(X)||_F / ||X||_F per sequence, averaged over B.

    Dong et al. measure res(X) = X - 1 x^T with x minimising the composite l1,inf norm; here x
    is the token mean (the minimiser in the Frobenius norm) and the norm is Frobenius. Range
    [0, 1]: 0 when every token carries the same vector, 1 when the token mean is 0.
    """
    h = as_float(h_BxTxD)
    _require_ndim(h, 3, "h_BxTxD")
    res_BxTxD = h - jnp.mean(h, axis=1, keepdims=True)
    num_B = jnp.sqrt(jnp.sum(jnp.square(res_BxTxD), axis=(1, 2)))
    den_B = jnp.sqrt(jnp.sum(jnp.square(h), axis=(1, 2)))
    return jnp.mean(num_B / den_B)


@jax.jit
def rank_collapse_residual_per_layer(h_LxBxTxD: ArrayLike) -> Array:
    """`rank_collapse_residual` for each layer, float [L]."""
    return jax.vmap(rank_collapse_residual)(as_float(h_LxBxTxD))
