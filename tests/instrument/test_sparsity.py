"""seismo.instrument.sparsity: dead neurons and CETT on toy MLPs whose answers are known by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo.instrument import sparsity

# ----------------------------------------------------------------------------- dead neurons


def test_dead_neurons_of_a_relu_map_with_known_zero_pattern(rng):
    n_neurons = 8
    dead = [2, 5]  # these neurons' pre-activations are always negative
    state = sparsity.ever_active_init(n_neurons)
    for _ in range(3):
        pre = np.abs(rng.normal(size=(16, n_neurons))) + 0.1
        pre[:, dead] *= -1.0
        pre[:, 7] = -1.0  # neuron 7 fires only once, in the last batch
        state = sparsity.ever_active_update(state, np.maximum(pre, 0.0))
    np.testing.assert_allclose(sparsity.dead_fraction(state), 3 / 8)
    last = np.zeros((4, n_neurons))
    last[2, 7] = 0.5
    state = sparsity.ever_active_update(state, last)
    np.testing.assert_allclose(sparsity.dead_fraction(state), 2 / 8)
    assert [i for i in range(n_neurons) if not state.active[i]] == dead
    assert int(state.n_tokens) == 3 * 16 + 4
    # tau: "never above tau" (docs/methods.md §7.7) counts the 0.5 spike as silent at tau = 0.5
    strict = sparsity.ever_active_update(sparsity.ever_active_init(n_neurons), last, tau=0.5)
    np.testing.assert_allclose(sparsity.dead_fraction(strict.active), 1.0)


def test_ever_active_per_layer_and_under_jit(rng):
    act_LxNxF = np.maximum(rng.normal(size=(2, 5, 4)), 0.0)
    act_LxNxF[0, :, 1] = 0.0
    act_LxNxF[1, :, :3] = 0.0
    update = jax.jit(sparsity.ever_active_update)
    state = update(sparsity.ever_active_init((2, 4)), act_LxNxF)
    np.testing.assert_allclose(sparsity.dead_fraction(state), [1 / 4, 3 / 4])
    with pytest.raises(ValueError, match=r"does not match the record's neuron shape \(2, 4\)"):
        sparsity.ever_active_update(state, act_LxNxF[:, :, :3])


# ----------------------------------------------------------------------------- CETT


# Three neurons with orthogonal output rows: W_out = diag(1, 2, 3). Token 0 has s = (1, 1, 1), so
# the neuron outputs are (1,0,0), (0,2,0), (0,0,3), norms 1, 2, 3 and ||FFN|| = sqrt(14).
# Token 1 has s = (0, 0, 2): norms 0, 0, 6, FFN = (0, 0, 6).
W_OUT = np.diag([1.0, 2.0, 3.0])
S = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])


@pytest.mark.parametrize(
    "eps, want_tokens",
    [
        (0.5, (0.0, 0.0)),  # token 1: its two zero outputs are truncated, a zero tail
        (1.5, (1 / math.sqrt(14), 0.0)),
        (2.5, (math.sqrt(5 / 14), 0.0)),
        (3.5, (1.0, 0.0)),
        (10.0, (1.0, 1.0)),
    ],
)
def test_cett_hand_computed(eps, want_tokens):
    np.testing.assert_allclose(sparsity.cett(S, W_OUT, eps), np.mean(want_tokens), rtol=1e-6)


def test_cett_is_the_mean_of_per_token_ratios():
    got = float(sparsity.cett(S, W_OUT, 2.5))
    mean_of_ratios = (math.sqrt(5 / 14) + 0.0) / 2
    ratio_of_means = math.sqrt(5) / (math.sqrt(14) + 6.0)
    np.testing.assert_allclose(got, mean_of_ratios, rtol=1e-6)
    assert abs(got - ratio_of_means) > 0.05


def test_activation_ratio_and_norms_hand_computed():
    np.testing.assert_allclose(sparsity.neuron_output_norms(S, W_OUT), [[1, 2, 3], [0, 0, 6]])
    np.testing.assert_allclose(sparsity.activation_ratio(S, W_OUT, 2.5), 2 / 6)
    np.testing.assert_allclose(sparsity.activation_ratio(S, W_OUT, 0.0), 1.0)


@pytest.mark.parametrize(
    "target, want_eps",
    [
        (0.0, 1.0),
        (0.2, 1.0),
        (0.3, 2.0),
        (0.6, 3.0),
        (1.0, np.nextafter(np.float32(3.0), np.float32(np.inf))),
    ],
)
def test_cett_threshold_hand_computed(target, want_eps):
    # token 0 alone: CETT(eps = 1) = 0, CETT(2) = 1/sqrt(14) = 0.267, CETT(3) = sqrt(5/14) = 0.598,
    # CETT(just above 3) = 1; the threshold is the largest candidate whose CETT <= target.
    got = sparsity.cett_threshold(S[:1], W_OUT, target)
    np.testing.assert_array_equal(np.float32(got), np.float32(want_eps))


def test_cett_threshold_is_the_crossing_on_random_layers(rng):
    s = np.maximum(rng.normal(size=(32, 24)), 0.0)
    w = rng.normal(size=(24, 16)) / 4.0
    norms = np.asarray(sparsity.neuron_output_norms(s, w)).ravel()
    for target in (0.05, 0.2, 0.5):
        eps = float(sparsity.cett_threshold(s, w, target))
        assert float(sparsity.cett(s, w, eps)) <= target
        above = norms[norms > eps]
        assert float(sparsity.cett(s, w, above.min())) > target
    # vmapped over stacked layers, inside jit
    many = jax.jit(jax.vmap(sparsity.cett_threshold, in_axes=(0, 0, None)))
    eps_L = many(np.stack([s, 2 * s]), np.stack([w, w]), 0.2)
    np.testing.assert_allclose(eps_L[1], 2 * eps_L[0], rtol=1e-6)


def _toy_layers():
    """Two layers with orthogonal neuron outputs. Layer 0: s = (1, 2, 3, 4), W_out = I;
    layer 1: s = (2, 2, 2, 2), W_out = diag(1, 2, 3, 4). Both have neuron-output norms in the
    ratio 1:2:3:4, so pruning the k smallest gives CETT_k = sqrt(sum_{i<=k} i^2 / 30):
    k = 1: 0.1826, k = 2: sqrt(5/30) = 0.4082, k = 3: 0.6831, k = 4: 1."""
    acts = np.array([[[1.0, 2.0, 3.0, 4.0]], [[2.0, 2.0, 2.0, 2.0]]])
    w_outs = np.stack([np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])])
    return acts, w_outs


def _toy_loss_fn(acts, w_outs, c):
    """A model with a neuron_threshold: loss = 2 + c * sum_l ||FFN_l - FFN_l,sparse||^2 / ||FFN_l||^2.
    With orthogonal outputs that is 2 + c * sum_l CETT_l^2, so pruning k neurons per layer costs
    2 c CETT_k^2 nats."""

    def loss_fn(thresholds_L):
        total = 2.0
        for s, w, th in zip(acts, w_outs, thresholds_L):
            dense = s @ w
            norms = np.abs(s) * np.linalg.norm(w, axis=1)
            sparse = np.where(norms >= th, s, 0.0) @ w
            total += c * np.sum((dense - sparse) ** 2) / np.sum(dense**2)
        return total

    return loss_fn


def test_cett_ppl_search_finds_the_known_crossing():
    acts, w_outs = _toy_layers()
    # c = 0.06: pruning 1 neuron per layer costs 2c/30 = 0.004 nats (ppl x1.004 < 1.01), pruning
    # 2 costs 2c*5/30 = 0.02 nats (ppl x1.0202 > 1.01): the crossing is at CETT = sqrt(5/30).
    result = sparsity.cett_ppl_search(
        _toy_loss_fn(acts, w_outs, c=0.06), acts, w_outs, p=0.01, tol=1e-3
    )
    crossing = math.sqrt(5 / 30)
    assert abs(result.target_cett - crossing) <= 1e-3
    assert result.loss_dense == pytest.approx(2.0)
    if result.target_cett < crossing:  # one neuron pruned per layer
        np.testing.assert_allclose(result.thresholds, [2.0, 4.0])
        np.testing.assert_allclose(result.activation_ratio, [0.75, 0.75])
        assert result.ppl_ratio == pytest.approx(math.exp(0.004), rel=1e-6)
    else:
        np.testing.assert_allclose(result.thresholds, [3.0, 6.0])
        np.testing.assert_allclose(result.activation_ratio, [0.5, 0.5])
        assert result.ppl_ratio == pytest.approx(math.exp(0.02), rel=1e-6)
    # 1 dense + 10 bisection steps (2^-10 < 1e-3) + 1 at the final midpoint
    assert result.n_evals == 12


def test_cett_ppl_search_when_pruning_is_free():
    acts, w_outs = _toy_layers()
    result = sparsity.cett_ppl_search(_toy_loss_fn(acts, w_outs, c=0.0), list(acts), list(w_outs))
    assert result.target_cett > 1 - 1e-3
    assert result.ppl_ratio == pytest.approx(1.0)


def test_cett_ppl_search_rejects_mismatched_layers():
    acts, w_outs = _toy_layers()
    with pytest.raises(ValueError, match="same L"):
        sparsity.cett_ppl_search(lambda th: 0.0, acts, w_outs[:1])


def test_cett_stats_run_under_jit():
    for fn in (sparsity.cett, sparsity.activation_ratio, sparsity.cett_threshold):
        np.testing.assert_allclose(jax.jit(fn)(S, W_OUT, 0.3), fn(S, W_OUT, 0.3), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(sparsity.neuron_output_norms)(S, W_OUT), jnp.abs(S) * jnp.diag(W_OUT)
    )
