"""Activation sparsity of FFN layers: dead neurons and CETT thresholds.

Sources:
- Dead neurons (never active over a large eval stream): Voita et al. 2023, arXiv 2309.04827
  (docs/methods.md §7.7).
- CETT and CETT-PPL-p%: Luo et al. 2024, "Sparsing Law", arXiv 2411.02335 (docs/methods.md §5.2),
  with the definitions as the authors' code computes them (thunlp/SparsingLaw,
  `src_bmt/model_utils.py` `calc_sparsity` and `src/calc_cett.py`):
    * the neuron output of neuron i on a token is n_i = s_i * W_out[i, :], where s is the
      input of the down-projection (post-activation and, for gated MLPs, post-gate), so
      ||n_i|| = |s_i| * ||W_out[i, :]||_2 and FFN(x) = s @ W_out = sum_i n_i;
    * CETT(eps) = ||sum_{i: ||n_i|| < eps} n_i||_2 / ||FFN(x)||_2 per token, then the MEAN
      OF THE PER-TOKEN RATIOS (the code's `torch.mean(difference.norm(-1) / norm_x)`);
    * the per-layer eps is the largest threshold whose CETT does not exceed the target
      (binary search over candidate thresholds);
    * Algorithm 1 bisects the shared target in [0, 1] to tolerance 1e-3 and returns the
      midpoint of the final interval.
  These functions use the same neuron-output norm as the model's `neuron_threshold`
  (models/mlp.py zeroes the neurons with |s_i| * ||W_out[i, :]|| < threshold). In seismo, s is
  the 'mlp_post' tap of a dense apply (no threshold) flattened to [N, F], and W_out the MLP's
  'down' kernel [F, D] ([L, F, D] for scanned blocks). A down-projection bias is not a neuron
  output and is left out of FFN(x).
  The search over targets costs its loss evaluations: nothing in a layer's threshold search
  depends on the target but the comparisons, so `cett_curve` sorts the neuron outputs and
  computes CETT at every candidate threshold once, and each bisection step looks its
  thresholds up (`threshold_from_curve`, the same binary search as `cett_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from seismo.instrument.stats import as_float

Array = jax.Array

# Statistics want exact float32 products; GPUs default to TF32 for float32 matmuls.
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- dead neurons


class EverActive(NamedTuple):
    """Running record of which neurons have fired. A pytree: it can pass through jit."""

    active: Array  # bool [..., F]
    n_tokens: Array  # int32 scalar: tokens seen


def ever_active_init(shape: int | tuple[int, ...]) -> EverActive:
    """An empty record for neurons of `shape` (F, or (L, F) for stacked layers)."""
    return EverActive(jnp.zeros(shape, bool), jnp.zeros((), jnp.int32))


@jax.jit
def ever_active_update(state: EverActive, act_NxF: ArrayLike, tau: float = 0.0) -> EverActive:
    """Mark the neurons with act > tau on any of the N tokens (axis -2) as active.

    `act` is [..., N, F] matching `state.active` [..., F]. Voita et al. call a ReLU neuron
    active when its output is > 0 (tau = 0). For GELU or SiLU pass a tau > 0, or |act|.
    """
    act = jnp.asarray(act_NxF)
    if act.shape[:-2] + act.shape[-1:] != state.active.shape:
        raise ValueError(
            f"act of shape {tuple(act.shape)} ([..., N, F]) does not match the record's "
            f"neuron shape {tuple(state.active.shape)} ([..., F])"
        )
    fired = jnp.any(act > tau, axis=-2)
    return EverActive(state.active | fired, state.n_tokens + act.shape[-2])


@jax.jit
def dead_fraction(state: EverActive | ArrayLike) -> Array:
    """Fraction of neurons that never fired: mean over F of not active, shape [...]."""
    active = state.active if isinstance(state, EverActive) else jnp.asarray(state)
    return jnp.mean(~active.astype(bool), axis=-1)


# ----------------------------------------------------------------------------- CETT


@jax.jit
def neuron_output_norms(s_NxF: ArrayLike, w_out_FxD: ArrayLike) -> Array:
    """||n_i||_2 = |s_i| * ||W_out[i, :]||_2 for every token and neuron, float [N, F] (any
    leading token axes [..., F] work too)."""
    s, w = as_float(s_NxF), as_float(w_out_FxD)
    return jnp.abs(s) * jnp.linalg.norm(w, axis=-1)


def _cett_from_norms(s: Array, w: Array, norms_NxF: Array, eps: ArrayLike) -> Array:
    full_NxD = jnp.matmul(s, w, precision=_HIGHEST)
    tail_NxD = jnp.matmul(jnp.where(norms_NxF < eps, s, 0.0), w, precision=_HIGHEST)
    num_N = jnp.linalg.norm(tail_NxD, axis=-1)
    den_N = jnp.linalg.norm(full_NxD, axis=-1)
    # A token whose FFN output is exactly 0 has nothing to truncate: it counts as 0.
    return jnp.mean(jnp.where(den_N > 0, num_N / jnp.where(den_N > 0, den_N, 1.0), 0.0))


@jax.jit
def cett(s_NxF: ArrayLike, w_out_FxD: ArrayLike, eps: ArrayLike) -> Array:
    """CETT: mean over tokens of ||sum_{i: ||n_i|| < eps} n_i|| / ||FFN(x)||.

    0 when nothing is truncated, 1 when everything is; in between usually, though a token
    whose kept outputs point against its truncated ones can push it above 1.
    """
    s, w = as_float(s_NxF), as_float(w_out_FxD)
    return _cett_from_norms(s, w, neuron_output_norms(s, w), eps)


@jax.jit
def activation_ratio(s_NxF: ArrayLike, w_out_FxD: ArrayLike, eps: ArrayLike) -> Array:
    """Fraction of (token, neuron) pairs with ||n_i|| >= eps: 1 - sparsity."""
    return jnp.mean(neuron_output_norms(s_NxF, w_out_FxD) >= eps)


@jax.jit
def cett_threshold(s_NxF: ArrayLike, w_out_FxD: ArrayLike, target_cett: ArrayLike) -> Array:
    """The largest eps (among the neuron-output norms) with cett(s, w, eps) <= target_cett.

    Candidates are the sorted norms plus one value just above the largest (which truncates
    everything); eps = the smallest norm truncates nothing, so a solution always exists.
    Exact binary search, ceil(log2(N*F + 1)) + 1 CETT evaluations, jit- and vmap-friendly.
    CETT is monotone in eps unless truncated outputs cancel; then this is a crossing point.
    """
    s, w = as_float(s_NxF), as_float(w_out_FxD)
    norms_NxF = neuron_output_norms(s, w)
    sorted_M = jnp.sort(norms_NxF.reshape(-1))
    cand = jnp.append(sorted_M, jnp.nextafter(sorted_M[-1], jnp.inf))
    n_cand = cand.shape[0]

    def body(_, lo_hi):  # invariant: cand[lo] is feasible; the answer lies in [lo, hi]
        lo, hi = lo_hi
        mid = (lo + hi + 1) // 2
        ok = _cett_from_norms(s, w, norms_NxF, cand[mid]) <= target_cett
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    n_iter = math.ceil(math.log2(n_cand)) + 1
    lo, _ = jax.lax.fori_loop(0, n_iter, body, (jnp.int32(0), jnp.int32(n_cand - 1)))
    return cand[lo]


# The CETT-PPL search asks for thresholds at about a dozen targets on the same neuron outputs.
# `cett_curve` does, once, everything that does not depend on the target: it sorts the outputs
# and computes CETT at every candidate threshold, so a target's threshold is then a binary
# search over a precomputed array (`threshold_from_curve`: the same candidates, the same steps
# and the same answer as `cett_threshold`, with no matmul and no sort).


class CettCurve(NamedTuple):
    """CETT at every candidate threshold of each layer (`cett_curve`), numpy arrays [L, N*F + 1]."""

    candidates: np.ndarray  # float32: the neuron-output norms sorted, then one just above the largest
    cett: np.ndarray  # float64: cett(s, w, candidates[l, j]) of layer l


def _token_cett(s_NxF: Array, w_FxD: Array, order_NxF: Array) -> Array:
    """[N, F + 1]: for each token, ||sum of its k smallest neuron outputs|| / ||FFN(x)|| for
    k = 0..F (0 for a token whose FFN output is exactly 0, as in `cett`). One pass over the
    token's outputs in increasing norm (`order`), carrying the running sum [N, D]; nothing of
    size N x F x D is formed."""
    s_sorted_NxF = jnp.take_along_axis(s_NxF, order_NxF, axis=-1)

    def step(partial_NxD, x):
        s_N, neuron_N = x
        partial_NxD = partial_NxD + s_N[:, None] * w_FxD[neuron_N]
        return partial_NxD, jnp.linalg.norm(partial_NxD, axis=-1)

    zeros_NxD = jnp.zeros((s_NxF.shape[0], w_FxD.shape[-1]), s_NxF.dtype)
    _, num_FxN = jax.lax.scan(step, zeros_NxD, (s_sorted_NxF.T, order_NxF.T))
    den_N = num_FxN[-1]
    ratio_FxN = jnp.where(den_N > 0, num_FxN / jnp.where(den_N > 0, den_N, 1.0), 0.0)
    return jnp.concatenate([jnp.zeros_like(ratio_FxN[:1]), ratio_FxN]).T


_layer_norms = jax.jit(jax.vmap(neuron_output_norms))
_layer_token_cett = jax.jit(jax.vmap(_token_cett))
_activation_ratios = jax.jit(jax.vmap(activation_ratio))


def _sort_nonnegative(x_LxM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(np.sort(x), np.argsort(x, kind='stable')) along the last axis for non-negative floats.
    For float32, 2-3x faster than np.argsort: the float's bits (which order non-negative floats
    as integers do) and the index are packed in one int64 and sorted as values."""
    m = x_LxM.shape[-1]
    bits = max(1, (m - 1).bit_length())
    if x_LxM.dtype != np.float32 or bits > 32:
        order = np.argsort(x_LxM, axis=-1, kind="stable")
        return np.take_along_axis(x_LxM, order, axis=-1), order
    keys = (np.ascontiguousarray(x_LxM).view(np.int32).astype(np.int64) << bits) | np.arange(m, dtype=np.int64)
    keys.sort(axis=-1)
    return (keys >> bits).astype(np.int32).view(np.float32), keys & ((1 << bits) - 1)


def cett_curve(acts_LxNxF: ArrayLike | Sequence[ArrayLike],
               w_outs_LxFxD: ArrayLike | Sequence[ArrayLike]) -> CettCurve:
    """CETT at every candidate threshold of `cett_threshold`, per layer, computed once.

    Per layer: each token's outputs in increasing norm and its CETT ratio after each one
    (`_token_cett`, on the device); then all N*F outputs in increasing norm, where truncating
    the next one changes its token's ratio by a known step, so CETT at the j-th smallest norm
    is the running sum of the first j steps over N (float64 sums on the host, whose rounding is
    far below the float32 rounding of `cett` itself). Equal norms are truncated together,
    as `cett`'s `norms < eps` does. The norms and ratios come to the host once; the host
    works one layer at a time (about 40 bytes per token and neuron).
    """
    acts, w_outs = _stacked(acts_LxNxF), _stacked(w_outs_LxFxD)
    _check_layers(acts, w_outs)
    norms_LxNxF = np.asarray(_layer_norms(acts, w_outs))
    order_LxNxF = _sort_nonnegative(norms_LxNxF)[1].astype(np.int32)  # each token's outputs, increasing
    ratio_LxNxF1 = _layer_token_cett(acts, w_outs, jnp.asarray(order_LxNxF))  # dispatched: runs meanwhile
    sorts = [_sort_nonnegative(n.reshape(-1)) for n in norms_LxNxF]  # all outputs of a layer, increasing
    ratio_LxNxF1 = np.asarray(ratio_LxNxF1)
    layers = [_layer_curve(*args) for args in zip(order_LxNxF, ratio_LxNxF1, sorts)]
    return CettCurve(candidates=np.stack([c for c, _ in layers]), cett=np.stack([v for _, v in layers]))


def _layer_curve(order_NxF: np.ndarray, ratio_NxF1: np.ndarray,
                 sort: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sorted_M, global_M = sort
    n_tokens, n_neurons = order_NxF.shape
    m = sorted_M.shape[0]
    # the step of its token's ratio when output i is truncated, in the outputs' own layout [N, F]
    step_NxF = np.empty((n_tokens, n_neurons))
    np.put_along_axis(step_NxF, order_NxF, np.diff(ratio_NxF1.astype(np.float64), axis=-1), axis=-1)
    truncated_M1 = np.zeros(m + 1)  # CETT with the j smallest outputs truncated
    np.cumsum(step_NxF.reshape(-1)[global_M], out=truncated_M1[1:])
    truncated_M1 /= n_tokens
    # candidate j truncates the outputs below it: those before the first one equal to it
    top = np.nextafter(sorted_M[-1], np.float32(np.inf))
    candidates = np.append(sorted_M, top)
    new_run = np.ones(m, bool)
    new_run[1:] = sorted_M[1:] != sorted_M[:-1]
    if new_run.all() and top > sorted_M[-1]:  # no equal norms: candidate j truncates j outputs
        return candidates, truncated_M1
    first_M = np.maximum.accumulate(np.where(new_run, np.arange(m), 0))
    first_top = m if top > sorted_M[-1] else first_M[-1]
    return candidates, truncated_M1[np.append(first_M, first_top)]


def threshold_from_curve(curve: CettCurve, target_cett: float) -> np.ndarray:
    """Per-layer thresholds [L] at `target_cett`: `cett_threshold`'s binary search, step for
    step, on the precomputed CETT values."""
    n_layers, n_cand = curve.candidates.shape
    layers = np.arange(n_layers)
    target = np.float64(np.float32(target_cett))  # the float32 target cett_threshold compares with
    lo, hi = np.zeros(n_layers, np.int64), np.full(n_layers, n_cand - 1, np.int64)
    for _ in range(math.ceil(math.log2(n_cand)) + 1):  # invariant: candidates[lo] is feasible
        mid = (lo + hi + 1) // 2
        ok = curve.cett[layers, mid] <= target
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid - 1)
    return curve.candidates[layers, lo]


@dataclass(frozen=True)
class CettSearch:
    """Result of `cett_ppl_search` (arrays are per layer, float [L])."""

    target_cett: float  # the shared CETT value found
    thresholds: np.ndarray  # per-layer eps at that target
    activation_ratio: np.ndarray  # per-layer fraction of neuron outputs >= eps
    ppl_ratio: float  # exp(loss_sparse - loss_dense) at the thresholds
    loss_dense: float
    loss_sparse: float
    n_evals: int  # calls of loss_fn


def _stacked(x: ArrayLike | Sequence[ArrayLike]) -> Array:
    if isinstance(x, (jax.Array, np.ndarray)):
        return as_float(x)
    return jnp.stack([as_float(a) for a in x])


def _check_layers(acts: Array, w_outs: Array) -> None:
    if acts.ndim != 3 or w_outs.ndim != 3 or acts.shape[0] != w_outs.shape[0]:
        raise ValueError(
            f"acts must be [L, N, F] and w_outs [L, F, D] with the same L; got "
            f"{tuple(acts.shape)} and {tuple(w_outs.shape)}"
        )


def cett_ppl_search(
    loss_fn: Callable[[np.ndarray], float],
    acts_LxNxF: ArrayLike | Sequence[ArrayLike],
    w_outs_LxFxD: ArrayLike | Sequence[ArrayLike],
    p: float = 0.01,
    tol: float = 1e-3,
) -> CettSearch:
    """CETT-PPL-p% (Sparsing Law, Algorithm 1): the shared CETT target whose per-layer
    thresholds raise perplexity by the factor 1 + p.

    `loss_fn(thresholds_L)` returns the eval loss (nats per token, a float or a scalar array)
    with neurons whose output norm is below thresholds[l] zeroed in layer l (the model's
    `neuron_threshold`); the dense loss is `loss_fn(zeros)`. `acts` are the dense down-projection inputs s of each layer on
    the same eval tokens and `w_outs` the down-projection matrices. Bisection on the target
    in [0, 1]: a target whose ratio exp(loss - loss_dense) stays below 1 + p raises the lower
    end, otherwise the upper end falls; stop when the interval is shorter than `tol` and
    report its midpoint, as the authors' code does. To average over checkpoints (as the
    paper does) wrap several models in one loss_fn.

    The per-layer thresholds at each target are `cett_threshold`'s, looked up in the layers'
    `cett_curve`, built once per call: the cost is the loss evaluations (about 12) plus about
    one sort and one pass over the neuron outputs per layer.
    """
    acts, w_outs = _stacked(acts_LxNxF), _stacked(w_outs_LxFxD)
    _check_layers(acts, w_outs)
    n_layers = acts.shape[0]
    dense = loss_fn(np.zeros(n_layers, np.float32))  # a device value runs while the curve is built
    curve = cett_curve(acts, w_outs)  # once: each target below is a lookup
    loss_dense = float(dense)
    n_evals = 1

    def evaluate(target: float) -> tuple[np.ndarray, float]:
        eps = threshold_from_curve(curve, target)
        return eps, float(loss_fn(eps))

    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        _, loss = evaluate(mid)
        n_evals += 1
        if math.exp(loss - loss_dense) < 1.0 + p:
            lo = mid
        else:
            hi = mid
    target = 0.5 * (lo + hi)
    eps, loss_sparse = evaluate(target)
    ratio = np.asarray(_activation_ratios(acts, w_outs, jnp.asarray(eps)))
    return CettSearch(
        target_cett=target,
        thresholds=eps,
        activation_ratio=ratio,
        ppl_ratio=math.exp(loss_sparse - loss_dense),
        loss_dense=loss_dense,
        loss_sparse=loss_sparse,
        n_evals=n_evals + 1,
    )
