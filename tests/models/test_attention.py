"""Attention kinds, qk-layernorm, the explicit attention bias, positions, and the logit taps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import models
from seismo.config import ModelConfig
from seismo.models.attention import (
    ATTENTIONS,
    attention_scale,
    causal_mask,
    clipped_softmax_weights,
    map_row_stats,
    sigmoid_weights,
    softmax_weights,
)
from seismo.models.positions import alibi_slopes
from seismo.registry import UnknownNameError


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def tokens(b: int = 2, t: int = 8, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 32, (b, t)), jnp.int32)


def build(cfg: ModelConfig, t: int = 8):
    model = models.build(cfg)
    return model, model.init(jax.random.PRNGKey(0), tokens(t=t))


def zero_qk(params):
    attn = params["blocks"]["attn"]
    return {**params, "blocks": {**params["blocks"], "attn": {
        **attn, "query": {"kernel": jnp.zeros_like(attn["query"]["kernel"])},
        "key": {"kernel": jnp.zeros_like(attn["key"]["kernel"])}}}}


def test_weight_functions_mask_exactly_and_softmax_rows_sum_to_one():
    cfg = tiny()
    z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 5, 5)) * 3, jnp.float32)
    mask = causal_mask(5, 5)[None, None]
    upper = ~np.asarray(mask[0, 0])
    for fn in (softmax_weights, sigmoid_weights, clipped_softmax_weights):
        w = np.asarray(fn(z, mask, cfg))
        assert np.all(w[..., upper] == 0), fn.__name__
        assert np.all((w >= 0) & (w <= 1)), fn.__name__
    np.testing.assert_allclose(np.asarray(softmax_weights(z, mask, cfg)).sum(-1), 1.0, rtol=1e-6)
    # slot 0 of an attention-bias map is seen by every query
    assert np.all(np.asarray(causal_mask(4, 5))[:, 0]) and not np.asarray(causal_mask(4, 5))[0, 2]


def test_sigmoid_row_mass_at_zero_logits_is_closed_form():
    # docs/methods.md §2.5: with zero logits every visible weight is sigma(b), so row i carries
    # (i + 1) sigma(b); with b = -log n and T = n the last row carries n / (n + 1).
    n = 16
    cfg = tiny(attention="sigmoid", max_seq_len=n)
    model, params = build(cfg, t=n)
    _, taps = model.apply(zero_qk(params), tokens(t=n), taps=True)
    probs = np.asarray(taps["attn_probs"][0])  # [B, H, T, T]
    assert np.all(taps["attn_logits"] == 0)
    sig_b = 1.0 / (1.0 + n)  # sigma(-log n)
    np.testing.assert_allclose(probs.sum(-1), np.broadcast_to((np.arange(n) + 1) * sig_b, probs.shape[:-1]),
                               rtol=1e-5)
    assert math.isclose(probs[0, 0, -1].sum(), n / (n + 1), rel_tol=1e-5)
    assert np.all(probs[..., ~np.asarray(causal_mask(n, n))] == 0)
    assert cfg.resolved_sigmoid_bias == pytest.approx(-math.log(n))


def test_clipped_softmax_reaches_exact_zero_and_one():
    cfg = tiny(clip_gamma=-0.025, clip_zeta=1.0)
    mask = causal_mask(3, 3)[None, None]
    z = jnp.asarray([[[[0, 0, 0], [30.0, 0, 0], [0, 30.0, 0]]]], jnp.float32)
    w = np.asarray(clipped_softmax_weights(z, mask, cfg))
    assert w[0, 0, 0, 0] == 1.0  # a lone visible key: softmax 1 -> exactly 1
    assert w[0, 0, 1, 0] == 1.0 and w[0, 0, 1, 1] == 0.0  # dominated key: exactly 0
    assert w[0, 0, 2, 1] == 1.0 and w[0, 0, 2, 0] == 0.0 and w[0, 0, 2, 2] == 0.0
    # with a wider stretch small weights are clipped to 0 while softmax keeps them positive
    cfg2 = tiny(clip_gamma=-0.3, clip_zeta=1.3)
    z2 = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 6, 6)), jnp.float32)
    w2 = np.asarray(clipped_softmax_weights(z2, causal_mask(6, 6)[None, None], cfg2))
    soft = np.asarray(softmax_weights(z2, causal_mask(6, 6)[None, None], cfg2))
    assert np.all((w2 >= 0) & (w2 <= 1))
    visible = np.asarray(causal_mask(6, 6))
    assert np.any((w2[0, 0] == 0) & visible & (soft[0, 0] > 0))


def test_qk_layernorm_bounds_the_logits():
    # After LayerNorm with unit scale ||q|| = ||k|| = sqrt(d_h) (up to eps), and rope keeps
    # norms, so |q.k| / sqrt(d_h) <= sqrt(d_h) whatever the weights.
    big = dict(init_std=3.0, embed_init_std=3.0)
    cfg = tiny(qk_norm=True, **big)
    model, params = build(cfg)
    _, taps = model.apply(params, tokens(), taps=True)
    dh = cfg.resolved_head_dim
    assert float(jnp.max(jnp.abs(taps["attn_logits"]))) <= math.sqrt(dh) * (1 + 1e-5)
    assert params["blocks"]["attn"]["q_norm"]["scale"].shape == (1, dh)  # shared across heads, no bias
    assert set(params["blocks"]["attn"]["q_norm"]) == {"scale"}
    plain, p2 = build(tiny(**big))
    _, taps2 = plain.apply(p2, tokens(), taps=True)
    assert float(jnp.max(jnp.abs(taps2["attn_logits"]))) > math.sqrt(dh)


def test_attention_bias_slot_shapes_visibility_and_effect():
    cfg = tiny(attn_bias=True)
    model, params = build(cfg)
    L, H, dh = cfg.n_layers, cfg.n_heads, cfg.resolved_head_dim
    ab = params["blocks"]["attn"]["attn_bias"]
    assert ab["k"].shape == ab["v"].shape == (L, H, dh)
    assert 0.01 < float(jnp.std(jnp.concatenate([ab["k"].ravel(), ab["v"].ravel()]))) < 0.04  # N(0, 0.02)
    logits, taps = model.apply(params, tokens(), taps=True)
    T = tokens().shape[1]
    assert taps["attn_logits"].shape == (L, 2, H, T, T + 1)
    probs = np.asarray(taps["attn_probs"])
    assert np.all(probs[..., 0] > 0)  # every query sees the slot
    assert np.all(probs[..., 1:][..., ~np.asarray(causal_mask(T, T))] == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    for name in ("k", "v"):
        changed = jax.tree.map(lambda a: a, params)
        changed["blocks"]["attn"]["attn_bias"][name] = ab[name] + 1.0
        other, _ = model.apply(changed, tokens())
        assert float(jnp.max(jnp.abs(other - logits))) > 1e-3, f"{name}' does not reach the output"


def _layer_norm(x, scale, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale


def _rope(x_TxHxK, base):
    T, _, dh = x_TxHxK.shape
    out = np.empty_like(x_TxHxK)
    for t in range(T):
        for i in range(dh // 2):
            theta = t * base ** (-2 * i / dh)
            a, b = x_TxHxK[t, :, i], x_TxHxK[t, :, i + dh // 2]
            out[t, :, i] = a * np.cos(theta) - b * np.sin(theta)
            out[t, :, i + dh // 2] = b * np.cos(theta) + a * np.sin(theta)
    return out


@pytest.mark.parametrize("kw", [dict(positions="none"), dict(positions="rope", qk_norm=True, mup="full")])
def test_logit_tap_matches_an_explicit_loop(kw):
    cfg = tiny(d_model=8, n_heads=2, vocab_size=32, **kw)
    model, params = build(cfg, t=5)
    if cfg.mup == "full":  # the query kernel starts at zero there; give it weights
        q = params["blocks"]["attn"]["query"]["kernel"]
        params["blocks"]["attn"]["query"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), q.shape) * 0.5
    toks = tokens(b=1, t=5)
    _, taps = model.apply(params, toks, taps=True)
    p = jax.tree.map(np.asarray, params)
    a = p["blocks"]["attn"]
    H, dh = cfg.n_heads, cfg.resolved_head_dim
    x = _layer_norm(p["embed"]["embedding"][np.asarray(toks[0])], p["blocks"]["attn_norm"]["scale"][0])
    q = (x @ a["query"]["kernel"][0]).reshape(5, H, dh)
    k = (x @ a["key"]["kernel"][0]).reshape(5, H, dh)
    if cfg.qk_norm:
        q, k = _layer_norm(q, a["q_norm"]["scale"][0]), _layer_norm(k, a["k_norm"]["scale"][0])
    if cfg.positions == "rope":
        q, k = _rope(q, cfg.rope_base), _rope(k, cfg.rope_base)
    scale = 1 / dh if cfg.mup == "full" else 1 / math.sqrt(dh)
    best = 0.0
    for h in range(H):
        for i in range(5):
            for j in range(5):
                z = sum(q[i, h, c] * k[j, h, c] for c in range(dh)) * scale
                assert abs(taps["attn_logits"][0, 0, h, i, j] - z) < 1e-4 * max(1.0, abs(z))
                if j <= i:
                    best = max(best, abs(z))
    tap = np.asarray(taps["attn_logits"][0, 0])
    assert abs(np.max(np.abs(np.where(np.asarray(causal_mask(5, 5)), tap, 0))) - best) < 1e-4 * max(1.0, best)
    assert attention_scale(cfg) == pytest.approx(scale)


def test_gated_attention_is_softmax_times_the_head_gate():
    cfg = tiny(attention="gated")
    model, params = build(cfg)
    gate = params["blocks"]["attn"]["gate"]
    H = cfg.n_heads
    assert gate["kernel"].shape == (1, H, cfg.d_model // H) and gate["bias"].shape == (1, H)
    np.testing.assert_allclose(gate["bias"], cfg.gate_bias_init)
    zeroed = jax.tree.map(lambda a: a, params)
    zeroed["blocks"]["attn"]["gate"]["kernel"] = jnp.zeros_like(gate["kernel"])
    _, gated_taps = model.apply(zeroed, tokens(), taps=True)
    soft = models.build(tiny(attention="softmax"))
    plain = jax.tree.map(lambda a: a, params)
    del plain["blocks"]["attn"]["gate"]
    _, soft_taps = soft.apply(plain, tokens(), taps=True)
    # with a zero gate kernel each gate is sigmoid(logit(0.25)) = 0.25
    np.testing.assert_allclose(gated_taps["attn_out"][0], 0.25 * soft_taps["attn_out"][0], rtol=1e-5, atol=1e-6)


def test_alibi_slopes_and_bias():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(0, 4)]
    np.testing.assert_allclose(alibi_slopes(12), twelve, rtol=1e-6)
    # zero q.k: softmax weights follow exp(-m (i - j)) along each row
    cfg = tiny(positions="alibi", n_heads=2)
    model, params = build(cfg)
    _, taps = model.apply(zero_qk(params), tokens(), taps=True)
    row = np.asarray(taps["attn_probs"][0, 0, 1, 7])  # head 1 (slope 2^-8), last query
    want = np.exp(-alibi_slopes(2)[1] * (7 - np.arange(8)))
    np.testing.assert_allclose(row, want / want.sum(), rtol=1e-5)


def test_unknown_attention_lists_the_registered_ones():
    with pytest.raises(UnknownNameError, match="softmax"):
        ATTENTIONS.get("sigmod")
    assert {"softmax", "sigmoid", "clipped_softmax", "gated"} <= set(ATTENTIONS.names())


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_softmax_row_stats_without_per_entry_logs_match_float64(scale):
    """`map_row_stats(..., softmax=True)` takes log Z and the entropy from the row's largest
    weight (exactly 1/Z) instead of a log per entry: against float64 numpy, also at logits of
    1e3-1e4 (where lse - sum p z would cancel), with an always-visible slot column 0."""
    B, H, T = 2, 3, 6
    S = T + 1
    rng = np.random.default_rng(0)
    z = rng.normal(size=(B, H, T, S)) * scale
    mask = causal_mask(T, S)
    probs = softmax_weights(jnp.asarray(z, jnp.float32), mask[None, None], ModelConfig())
    got = map_row_stats(jnp.asarray(z, jnp.float32), jnp.asarray(z, jnp.float32), probs, mask, 1, softmax=True)
    vis = np.asarray(mask)[None, None]
    zm = np.where(vis, z, -np.inf)
    lse = np.log(np.sum(np.exp(zm - zm.max(-1, keepdims=True)), -1)) + zm.max(-1)
    p = np.where(vis, np.exp(zm - lse[..., None]), 0.0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
    np.testing.assert_allclose(got["attn_logz_mean"], lse.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["attn_logz_max"], lse.max(), rtol=1e-5)
    np.testing.assert_allclose(got["attn_entropy"], ent.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["attn_sink_mass"], p[..., 1].mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["attn_row_mass"], 1.0, rtol=1e-5)
    generic = map_row_stats(jnp.asarray(z, jnp.float32), jnp.asarray(z, jnp.float32), probs, mask, 1)
    for k in got:
        np.testing.assert_allclose(got[k], generic[k], rtol=1e-4, atol=1e-5, err_msg=k)
