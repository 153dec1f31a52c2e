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


# ----------------------------------------------------------------------------- the search against numpy
#
# A plain float64 numpy reference of cett_threshold (binary search over the sorted norms, each
# CETT a masked matmul) and of Algorithm 1 (bisection of the shared target). It takes only the
# float32 neuron-output norms from the code (the candidate set, also what the model thresholds
# on); everything else is recomputed here.


def _np_cett(s, w, norms, eps):
    full = s @ w
    tail = np.where(norms < eps, s, 0.0) @ w
    den = np.linalg.norm(full, axis=-1)
    num = np.linalg.norm(tail, axis=-1)
    return np.mean(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))


def _np_threshold(s, w, norms, target):
    cand = np.sort(norms.ravel())
    cand = np.append(cand, np.nextafter(cand[-1], np.float32(np.inf)))
    lo, hi = 0, len(cand) - 1
    for _ in range(math.ceil(math.log2(len(cand))) + 1):
        mid = (lo + hi + 1) // 2
        if _np_cett(s, w, norms, cand[mid]) <= np.float32(target):
            lo = mid
        else:
            hi = mid - 1
    return cand[lo]


def _np_cett_ppl_search(loss_fn, acts, w_outs, p=0.01, tol=1e-3):
    acts64 = [np.asarray(a, np.float64) for a in acts]
    w64 = [np.asarray(w, np.float64) for w in w_outs]
    norms = [np.asarray(sparsity.neuron_output_norms(a, w)) for a, w in zip(acts, w_outs)]

    def thresholds(target):
        return np.array([_np_threshold(s, w, n, target) for s, w, n in zip(acts64, w64, norms)], np.float32)

    dense = float(loss_fn(np.zeros(len(acts), np.float32)))
    lo, hi, n_evals = 0.0, 1.0, 1
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        n_evals += 1
        if math.exp(float(loss_fn(thresholds(mid))) - dense) < 1.0 + p:
            lo = mid
        else:
            hi = mid
    target = 0.5 * (lo + hi)
    eps = thresholds(target)
    sparse = float(loss_fn(eps))
    ratio = [np.mean(n >= e) for n, e in zip(norms, eps)]
    return dict(target=target, eps=eps, ratio=np.array(ratio), dense=dense, sparse=sparse, n_evals=n_evals + 1)


def _layer_with_ties(rng, n_tokens=12, n_neurons=10, d=6):
    """A ReLU layer with many zero outputs, a token whose FFN output is 0, two neurons with
    identical outputs on every token (exactly equal norms) and a zero row of W_out."""
    s = np.maximum(rng.normal(size=(n_tokens, n_neurons)), 0.0).astype(np.float32)
    s[3] = 0.0
    w = rng.normal(size=(n_neurons, d)).astype(np.float32)
    s[:, 5], w[5] = s[:, 4], w[4]
    w[7] = 0.0
    return s, w


def test_cett_curve_is_cett_at_every_candidate(rng):
    layers = [_layer_with_ties(rng), (rng.normal(size=(12, 10)).astype(np.float32),
                                      rng.normal(size=(10, 6)).astype(np.float32))]
    curve = sparsity.cett_curve([s for s, _ in layers], [w for _, w in layers])
    for (s, w), cand, got in zip(layers, curve.candidates, curve.cett):
        norms = np.asarray(sparsity.neuron_output_norms(s, w))
        want_cand = np.append(np.sort(norms.ravel()), np.nextafter(norms.max(), np.float32(np.inf)))
        np.testing.assert_array_equal(cand, want_cand)
        want = [_np_cett(s.astype(np.float64), w.astype(np.float64), norms, e) for e in cand]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert got[0] == 0.0 and got[-1] == pytest.approx(1.0 * np.mean(norms.max(1) > 0))


@pytest.mark.parametrize("target", [0.0, 0.01, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_threshold_from_curve_is_cett_threshold_and_numpy(rng, target):
    layers = [_layer_with_ties(rng)] + [
        (np.maximum(rng.normal(size=(40, 24)), 0.0).astype(np.float32), (rng.normal(size=(24, 16)) / 4).astype(np.float32)),
        (rng.normal(size=(40, 24)).astype(np.float32), rng.normal(size=(24, 16)).astype(np.float32)),
    ]
    for s, w in layers:
        got = sparsity.threshold_from_curve(sparsity.cett_curve(s[None], w[None]), target)[0]
        norms = np.asarray(sparsity.neuron_output_norms(s, w))
        assert got == _np_threshold(s.astype(np.float64), w.astype(np.float64), norms, target)
        assert got == np.float32(sparsity.cett_threshold(s, w, target))


def test_sort_of_nonnegative_floats_matches_numpy(rng):
    x = np.abs(rng.normal(size=(3, 500))).astype(np.float32)
    x[:, :100] = 0.0
    x[1, 100:200] = x[1, 200:300]
    x[2, 7] = np.inf
    values, order = sparsity._sort_nonnegative(x)
    np.testing.assert_array_equal(values, np.sort(x, axis=-1))
    np.testing.assert_array_equal(order, np.argsort(x, axis=-1, kind="stable"))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_cett_stats_of_a_tiny_model_match_the_numpy_search(activation):
    """The whole search as `seismo analyze` runs it (tables.cett_stats) on a fixed random tiny
    model: the same bisection, thresholds, losses and ratios as the float64 reference."""
    from seismo import config, models
    from seismo.instrument import tables

    cfg = config.load(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16",
                             f"model.activation={activation}"])
    model = models.build(cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, cfg.model.vocab_size)
    params = model.init(jax.random.PRNGKey(0), tokens)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    acts = tables.stats_fn(model, ("sparsity",))(params, tokens)["_acts"]
    w_outs = tables.down_kernels(params, cfg.model.n_layers)
    loss = tables.loss_fn(model)
    want = _np_cett_ppl_search(
        lambda thr: loss(params, batch["inputs"], batch["targets"], batch["loss_mask"], jnp.asarray(thr)),
        np.asarray(acts), np.asarray(w_outs))
    got = tables.cett_stats(model, params, batch, acts)
    assert 0 < want["target"] < 1
    assert got["cett_target"] == want["target"]
    np.testing.assert_array_equal(got["cett_threshold"], want["eps"])
    np.testing.assert_allclose(got["cett_activation_ratio"], want["ratio"], rtol=1e-6)
    assert got["cett_loss_dense"] == want["dense"] and got["cett_loss_sparse"] == want["sparse"]
    assert got["cett_ppl_ratio"] == pytest.approx(math.exp(want["sparse"] - want["dense"]), rel=1e-12)
    assert got["cett_n_evals"] == want["n_evals"] == 12
