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


@jax.jit
def _thresholds_and_ratios(acts_LxNxF: Array, w_outs_LxFxD: Array, target: Array):
    eps_L = jax.vmap(cett_threshold, in_axes=(0, 0, None))(acts_LxNxF, w_outs_LxFxD, target)
    ratio_L = jax.vmap(activation_ratio)(acts_LxNxF, w_outs_LxFxD, eps_L)
    return eps_L, ratio_L


def cett_ppl_search(
    loss_fn: Callable[[np.ndarray], float],
    acts_LxNxF: ArrayLike | Sequence[ArrayLike],
    w_outs_LxFxD: ArrayLike | Sequence[ArrayLike],
    p: float = 0.01,
    tol: float = 1e-3,
) -> CettSearch:
    """CETT-PPL-p% (Sparsing Law, Algorithm 1): the shared CETT target whose per-layer
    thresholds raise perplexity by the factor 1 + p.

    `loss_fn(thresholds_L)` returns the eval loss (nats per token) with neurons whose output
    norm is below thresholds[l] zeroed in layer l (the model's `neuron_threshold`); the dense
    loss is `loss_fn(zeros)`. `acts` are the dense down-projection inputs s of each layer on
    the same eval tokens and `w_outs` the down-projection matrices. Bisection on the target
    in [0, 1]: a target whose ratio exp(loss - loss_dense) stays below 1 + p raises the lower
    end, otherwise the upper end falls; stop when the interval is shorter than `tol` and
    report its midpoint, as the authors' code does. To average over checkpoints (as the
    paper does) wrap several models in one loss_fn.
    """
    acts = jnp.stack([as_float(a) for a in acts_LxNxF])
    w_outs = jnp.stack([as_float(w) for w in w_outs_LxFxD])
    if acts.ndim != 3 or w_outs.ndim != 3 or acts.shape[0] != w_outs.shape[0]:
        raise ValueError(
            f"acts must be [L, N, F] and w_outs [L, F, D] with the same L; got "
            f"{tuple(acts.shape)} and {tuple(w_outs.shape)}"
        )
    n_layers = acts.shape[0]
    loss_dense = float(loss_fn(np.zeros(n_layers, np.float32)))
    n_evals = 1

    def evaluate(target: float):
        eps_L, ratio_L = _thresholds_and_ratios(acts, w_outs, jnp.float32(target))
        eps = np.asarray(eps_L)
        return eps, np.asarray(ratio_L), float(loss_fn(eps))

    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        _, _, loss = evaluate(mid)
        n_evals += 1
        if math.exp(loss - loss_dense) < 1.0 + p:
            lo = mid
        else:
            hi = mid
    target = 0.5 * (lo + hi)
    eps, ratio, loss_sparse = evaluate(target)
    return CettSearch(
        target_cett=target,
        thresholds=eps,
        activation_ratio=ratio,
        ppl_ratio=math.exp(loss_sparse - loss_dense),
        loss_dense=loss_dense,
        loss_sparse=loss_sparse,
        n_evals=n_evals + 1,
    )
