"""seismo.instrument.stats against plain numpy loops on planted inputs."""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest
import scipy.stats

from seismo.instrument import stats


def _softmax(z, axis=-1):
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _causal_probs(rng, b, h, t, offset=0, sink_bias=None):
    """Causal softmax attention [B, H, T, T + offset]; sink_bias [H] is added to slot 0."""
    s = t + offset
    z = rng.normal(size=(b, h, t, s))
    if sink_bias is not None:
        z[..., 0] += np.asarray(sink_bias)[None, :, None]
    for i, j in itertools.product(range(t), range(s)):
        if j >= offset and j - offset > i:
            z[:, :, i, j] = -np.inf
    return _softmax(z)


# ----------------------------------------------------------------------------- massive


def test_massive_activation_planted(rng):
    h = rng.normal(size=(3, 16, 32))
    h[1, 5, 7] = 2000.0  # massive: > 100 and ~3000x the median of |h| (~0.67)
    h[2, 0, 3] = -150.0  # > 100 but only ~220x the median: not massive under the strict rule
    out = stats.massive_activations(h, k=3)
    median = np.median(np.abs(h))
    np.testing.assert_allclose(out["max_abs"], 2000.0)
    np.testing.assert_allclose(out["median_abs"], median, rtol=1e-6)
    np.testing.assert_allclose(out["ratio"], 2000.0 / median, rtol=1e-6)
    seq_ratios = [np.abs(h[b]).max() / np.median(np.abs(h[b])) for b in range(3)]
    np.testing.assert_allclose(out["ratio_seq_mean"], np.mean(seq_ratios), rtol=1e-6)
    assert (int(out["top_batch"][0]), int(out["top_position"][0]), int(out["top_dim"][0])) == (
        1,
        5,
        7,
    )
    assert (int(out["top_batch"][1]), int(out["top_position"][1]), int(out["top_dim"][1])) == (
        2,
        0,
        3,
    )
    np.testing.assert_allclose(out["top_value"][:2], [2000.0, -150.0])
    third = np.sort(np.abs(h).ravel())[-3]
    np.testing.assert_allclose(np.abs(out["top_value"][2]), third, rtol=1e-6)
    np.testing.assert_allclose(out["top_ratio"][1], 150.0 / median, rtol=1e-6)
    assert out["top_strict"].tolist() == [True, False, False]


def test_massive_activations_per_layer_matches_single_layer(rng):
    h = rng.normal(size=(2, 2, 8, 16))
    h[1, 0, 3, 4] = 500.0
    per_layer = stats.massive_activations_per_layer(h, k=2)
    for layer in range(2):
        single = stats.massive_activations(h[layer], k=2)
        for key, value in single.items():
            np.testing.assert_allclose(per_layer[key][layer], value, rtol=1e-6, err_msg=key)
    assert per_layer["ratio"].shape == (2,)
    assert per_layer["top_dim"].shape == (2, 2)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001, 4096])
def test_median_nonneg_equals_numpy_median(rng, n):
    # |N(0, 1)| with repeated values, exact zeros and a large outlier, for odd and even n
    a = np.abs(rng.normal(size=(5, n))).astype(np.float32)
    a[1] = np.round(a[1], 1)  # many ties
    a[2, : n // 2] = 0.0  # half zeros: the two middle values straddle 0
    a[3, 0] = 3e38
    got = np.asarray(stats.median_nonneg(a))
    want = np.median(a.astype(np.float64), axis=-1)
    # the two middle order statistics are exact, so only the mean's float32 rounding differs
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    # and jnp.median's value to the bit (row 3 left out: for n = 1, jnp.median of [3e38] is inf)
    rows = [0, 1, 2, 4]
    np.testing.assert_array_equal(got[rows], np.asarray(jax.numpy.median(a[rows], axis=-1)))


def test_median_nonneg_nan_and_inf():
    a = np.array([[1.0, np.inf, 2.0, 3.0], [1.0, np.nan, 2.0, 3.0], [np.inf] * 4], np.float32)
    np.testing.assert_array_equal(np.asarray(stats.median_nonneg(a)), [2.5, np.nan, np.inf])
    x64 = np.array([[3.0, 1.0, 2.0]])  # other dtypes: jnp.median
    np.testing.assert_allclose(np.asarray(stats.median_nonneg(x64)), [2.0])


def test_massive_activations_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="h_BxTxD must have 3 axes"):
        stats.massive_activations(rng.normal(size=(4, 8)))
    with pytest.raises(ValueError, match="k must be between 1"):
        stats.massive_activations(rng.normal(size=(1, 2, 2)), k=5)


# ----------------------------------------------------------------------------- attention


def _loop_max_logit(z, offset):
    b, h, t, s = z.shape
    best_abs, best = 0.0, -np.inf
    for bi, hi, i, j in itertools.product(range(b), range(h), range(t), range(s)):
        if j < offset or j - offset <= i:
            best_abs = max(best_abs, abs(z[bi, hi, i, j]))
            best = max(best, z[bi, hi, i, j])
    return best_abs, best


def test_max_attention_logit_causal_against_loop(rng):
    b, h, t, dh = 2, 3, 6, 4
    q, k = rng.normal(size=(b, h, t, dh)), rng.normal(size=(b, h, t, dh))
    z = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(dh)
    z[0, 1, 1, 4] = 1e6  # a masked (future) pair must never win
    z[1, 2, 0, 5] = -1e6
    out = stats.max_attention_logit(z)
    want_abs, want = _loop_max_logit(z, offset=0)
    np.testing.assert_allclose(out["max_abs"], want_abs, rtol=1e-6)
    np.testing.assert_allclose(out["max"], want, rtol=1e-6)
    assert want_abs < 1e3
    full = stats.max_attention_logit(z, causal=False)
    np.testing.assert_allclose(full["max_abs"], 1e6)


def test_max_attention_logit_with_attention_bias_slot(rng):
    b, h, t, dh = 2, 2, 5, 4
    q = rng.normal(size=(b, h, t, dh))
    k_bias = rng.normal(size=(h, dh)) * 4.0  # k' of the explicit attention bias, slot 0
    k = np.concatenate(
        [np.broadcast_to(k_bias[None, :, None], (b, h, 1, dh)), rng.normal(size=(b, h, t, dh))],
        axis=2,
    )
    z = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(dh)  # [B, H, T, T + 1]
    z[:, :, 0, 2] = 1e6  # key slot 2 = position 1, not visible to query 0
    z[:, :, 2, 4:] = -np.inf  # masked entries as a model might hand them over
    out = stats.max_attention_logit(z, offset=1)
    want_abs, want = _loop_max_logit(z, offset=1)
    np.testing.assert_allclose(out["max_abs"], want_abs, rtol=1e-6)
    np.testing.assert_allclose(out["max"], want, rtol=1e-6)
    inferred = stats.max_attention_logit(z)  # offset defaults to S - T = 1
    np.testing.assert_allclose(inferred["max_abs"], want_abs, rtol=1e-6)
    # slot 0 is visible to every query, including query 0
    z2 = z.copy()
    z2[1, 1, 0, 0] = 777.0
    np.testing.assert_allclose(stats.max_attention_logit(z2, offset=1)["max"], 777.0)


def test_max_attention_logit_per_layer(rng):
    z = rng.normal(size=(3, 2, 2, 4, 4))
    out = stats.max_attention_logit_per_layer(z)
    for layer in range(3):
        np.testing.assert_allclose(
            out["max_abs"][layer], _loop_max_logit(z[layer], 0)[0], rtol=1e-6
        )


def test_entropy_of_uniform_causal_rows_is_log_i_plus_1():
    b, h, t = 2, 3, 7
    probs = np.zeros((b, h, t, t))
    for i in range(t):
        probs[:, :, i, : i + 1] = 1.0 / (i + 1)
    out = stats.attention_entropy(probs)
    want = np.mean(np.log(np.arange(1, t + 1)))
    np.testing.assert_allclose(out["per_head"], np.full(h, want), rtol=1e-6)
    np.testing.assert_allclose(out["mean"], want, rtol=1e-6)


def test_entropy_against_loop_and_row_normalisation(rng):
    probs = _causal_probs(rng, 2, 3, 5)
    want = np.zeros(3)
    for hi in range(3):
        rows = [
            -sum(p * np.log(p) for p in probs[bi, hi, i] if p > 0)
            for bi in range(2)
            for i in range(5)
        ]
        want[hi] = np.mean(rows)
    np.testing.assert_allclose(stats.attention_entropy(probs)["per_head"], want, rtol=1e-5)
    # sigmoid-like rows with mass 0.3: the same entropy, and the mass is reported separately
    scaled = 0.3 * probs
    np.testing.assert_allclose(stats.attention_entropy(scaled)["per_head"], want, rtol=1e-5)
    np.testing.assert_allclose(
        stats.attention_row_mass(scaled)["per_head"], np.full(3, 0.3), rtol=1e-6
    )
    np.testing.assert_allclose(stats.attention_row_mass(probs)["mean"], 1.0, rtol=1e-6)


def test_entropy_and_row_mass_per_layer(rng):
    probs = np.stack([_causal_probs(rng, 1, 2, 4), 0.5 * _causal_probs(rng, 1, 2, 4)])
    ent = stats.attention_entropy_per_layer(probs)
    mass = stats.attention_row_mass_per_layer(probs)
    assert ent["per_head"].shape == (2, 2)
    np.testing.assert_allclose(ent["mean"][1], stats.attention_entropy(probs[1])["mean"], rtol=1e-6)
    np.testing.assert_allclose(mass["mean"], [1.0, 0.5], rtol=1e-6)


def _loop_sink(probs, key, offset):
    b, h, t, _ = probs.shape
    alpha = np.zeros(h)
    for hi in range(h):
        vals = [probs[bi, hi, i, key] for bi in range(b) for i in range(t) if i >= key - offset]
        alpha[hi] = np.mean(vals) if vals else 0.0
    return alpha


def test_sink_fraction_on_planted_attention(rng):
    # layer 0: heads 0, 2 strongly attend slot 0; layer 1: only head 1 does
    bias = np.array([[8.0, -8.0, 8.0, -8.0], [-8.0, 8.0, -8.0, -8.0]])
    probs = np.stack([_causal_probs(rng, 2, 4, 9, sink_bias=bias[layer]) for layer in range(2)])
    out = stats.sink_fraction(probs, eps=0.3)
    want_alpha = np.stack([_loop_sink(probs[layer], 0, 0) for layer in range(2)])
    np.testing.assert_allclose(out["alpha"], want_alpha, rtol=1e-5)
    assert out["is_sink"].tolist() == [[True, False, True, False], [False, True, False, False]]
    np.testing.assert_allclose(out["fraction"], 3 / 8)
    np.testing.assert_allclose(out["fraction_per_layer"], [0.5, 0.25])


def test_sink_mass_and_scores_with_offset(rng):
    probs = _causal_probs(rng, 2, 3, 6, offset=1)  # slot 0 = attention bias, slot 1 = BOS
    scores = stats.sink_scores(probs, offset=1)
    assert scores.shape == (3, 7)
    np.testing.assert_allclose(stats.sink_scores(probs), scores)  # offset defaults to S - T
    for key in range(7):
        np.testing.assert_allclose(scores[:, key], _loop_sink(probs, key, 1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            stats.sink_mass(probs, position=key, offset=1),
            _loop_sink(probs, key, 1),
            rtol=1e-5,
            atol=1e-7,
        )
    plain = _causal_probs(rng, 2, 3, 6)
    for key in range(6):
        np.testing.assert_allclose(
            stats.sink_scores(plain)[:, key], _loop_sink(plain, key, 0), rtol=1e-5
        )


# ----------------------------------------------------------------------------- activations


def test_relu_zero_fraction_exact():
    pre = np.array([[1.0, -2.0, 0.5, -0.1], [-1.0, -3.0, 2.0, 0.0], [4.0, -1.0, -2.0, 1.0]])
    act = np.maximum(pre, 0.0)
    np.testing.assert_allclose(stats.zero_fraction(act), 7 / 12, rtol=1e-6)
    np.testing.assert_allclose(
        stats.zero_fraction(act, axis=0), [1 / 3, 1.0, 1 / 3, 2 / 3], rtol=1e-6
    )


def test_rms_and_max_abs_against_numpy(rng):
    x = rng.normal(size=(4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(stats.rms(x), np.sqrt(np.mean(x**2)), rtol=1e-6)
    np.testing.assert_allclose(
        stats.rms(x, axis=(1, 2)), np.sqrt(np.mean(x**2, axis=(1, 2))), rtol=1e-6
    )
    np.testing.assert_allclose(stats.max_abs(x), np.abs(x).max())
    np.testing.assert_allclose(stats.inf_norm(x, axis=-1), np.abs(x).max(-1))


@pytest.mark.parametrize(
    "sample, expected",
    [("normal", 3.0), ("uniform", 1.8), ("laplace", 6.0)],
)
def test_kurtosis_matches_scipy_and_known_distributions(rng, sample, expected):
    x = getattr(rng, sample)(size=(64, 4096))
    got = stats.kurtosis(x, axis=-1)
    np.testing.assert_allclose(got, scipy.stats.kurtosis(x, axis=-1, fisher=False), rtol=1e-4)
    np.testing.assert_allclose(np.mean(got), expected, rtol=0.05)
    summary = stats.kurtosis_stats(x)
    np.testing.assert_allclose(summary["mean"], np.mean(got), rtol=1e-6)
    np.testing.assert_allclose(summary["max"], np.max(got), rtol=1e-6)


def test_kurtosis_of_an_outlier_channel():
    x = np.zeros((1, 1000))
    x[0, 0] = 1.0  # one outlier among n channels: m2 = (n-1)/n^2, m4 = (n-1)((n-1)^3+1)/n^5
    n = 1000
    want = n - 2 + 1 / (n - 1)  # m4 / m2^2, about n
    np.testing.assert_allclose(stats.kurtosis(x), [want], rtol=1e-5)


def test_rank_collapse_residual():
    x = np.array([1.0, -2.0, 3.0, 0.5])
    uniform = np.tile(x, (1, 6, 1))  # every token the same vector: rank 1, fully collapsed
    np.testing.assert_allclose(stats.rank_collapse_residual(uniform), 0.0, atol=1e-7)
    centred = np.array([[[1.0, 2.0], [-1.0, -2.0]]])  # token mean 0: residual is all of X
    np.testing.assert_allclose(stats.rank_collapse_residual(centred), 1.0, rtol=1e-6)
    u = np.array([1.0, 2.0, 3.0, 6.0])  # rank 1 but not token-uniform: ||u - mean u|| / ||u||
    outer = np.outer(u, x)[None]
    want = np.linalg.norm(u - u.mean()) / np.linalg.norm(u)
    np.testing.assert_allclose(stats.rank_collapse_residual(outer), want, rtol=1e-6)
    both = np.concatenate([np.tile(x, (1, 4, 1)), outer], axis=0)
    np.testing.assert_allclose(stats.rank_collapse_residual(both), want / 2, rtol=1e-6)
    per_layer = stats.rank_collapse_residual_per_layer(np.stack([uniform[:, :4], outer]))
    np.testing.assert_allclose(per_layer, [0.0, want], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- under jit


JIT_CASES = {
    "massive_activations": (functools.partial(stats.massive_activations, k=3), (2, 4, 8)),
    "massive_activations_per_layer": (
        functools.partial(stats.massive_activations_per_layer, k=3),
        (2, 2, 4, 8),
    ),
    "max_attention_logit": (functools.partial(stats.max_attention_logit, offset=1), (2, 2, 4, 5)),
    "max_attention_logit_per_layer": (stats.max_attention_logit_per_layer, (3, 2, 2, 4, 4)),
    "attention_entropy": (stats.attention_entropy, (2, 2, 4, 4)),
    "attention_entropy_per_layer": (stats.attention_entropy_per_layer, (3, 2, 2, 4, 4)),
    "attention_row_mass_per_layer": (stats.attention_row_mass_per_layer, (3, 2, 2, 4, 4)),
    "sink_scores": (stats.sink_scores, (2, 2, 4, 4)),
    "sink_mass": (functools.partial(stats.sink_mass, position=1, offset=1), (2, 2, 4, 5)),
    "sink_fraction": (stats.sink_fraction, (3, 2, 2, 4, 4)),
    "rms": (stats.rms, (3, 4)),
    "max_abs": (stats.max_abs, (3, 4)),
    "zero_fraction": (stats.zero_fraction, (3, 4)),
    "kurtosis": (stats.kurtosis, (3, 8)),
    "kurtosis_stats": (stats.kurtosis_stats, (3, 8)),
    "rank_collapse_residual": (stats.rank_collapse_residual, (2, 4, 3)),
    "rank_collapse_residual_per_layer": (stats.rank_collapse_residual_per_layer, (2, 2, 4, 3)),
}


@pytest.mark.parametrize("name", sorted(JIT_CASES))
def test_stat_runs_under_jit(rng, name):
    fn, shape = JIT_CASES[name]
    x = np.abs(rng.normal(size=shape)).astype(np.float32)
    x[x < 0.3] = 0.0
    with jax.disable_jit():  # the statistics are jitted functions: compare with their eager, op-by-op run
        eager = fn(x)
    jitted = jax.jit(fn)(x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)


def test_bf16_input_is_upcast(rng):
    h = rng.normal(size=(1, 4, 8)).astype(jax.numpy.bfloat16)
    out = stats.massive_activations(h, k=1)
    assert out["max_abs"].dtype == np.float32
