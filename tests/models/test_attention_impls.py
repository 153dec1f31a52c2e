"""Every attention implementation against the explicit path: values, gradients and the
in-layer probe statistics, for softmax, gated and sigmoid attention with and without
qk-norm, ALiBi, RoPE, the attention-bias slot and grouped-query attention; the blockwise
kernel against a plain numpy reference; the chunked cross-entropy against the whole one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import models
from seismo.config import ConfigError, ModelConfig, load
from seismo.models import attention, blockwise
from seismo.models.loss import lm_loss, lm_loss_chunked
from seismo.models.positions import alibi_slopes

T = 24  # three blocks of 8, and a last block that is only partly visible


def cfg_of(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4, max_seq_len=T, attention_block=8)
    return ModelConfig(**{**base, **kw})


def tokens(b: int = 2, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 32, (b, T)), jnp.int32)


# Each option appears with both kinds; few variants, since each compiles five programs.
VARIANTS = {
    "softmax-qknorm-gqa": dict(qk_norm=True, n_kv_heads=2),
    "softmax-alibi-mqa-bias-slot": dict(positions="alibi", n_kv_heads=1, attn_bias=True),
    "gated-learned": dict(attention="gated", positions="learned"),
    "sigmoid-alibi-qknorm-gqa": dict(attention="sigmoid", positions="alibi", qk_norm=True, n_kv_heads=2),
    "sigmoid-rope-bias-slot": dict(attention="sigmoid", attn_bias=True),
}


def outputs(cfg: ModelConfig, params, toks):
    """Logits, gradients of a loss of them, and the in-layer statistics: one compiled program."""
    model = models.build(cfg)

    def loss(p):
        logits, _ = model.apply(p, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    def run(p):
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return logits, grads, model.apply(p, toks, taps="stats")[1]

    return jax.jit(run)(params)


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def compare_to_explicit(cfg: ModelConfig, impl: str, rtol: float = 2e-5, atol: float = 2e-6, grad_rel: float = 0.0):
    explicit = dataclasses.replace(cfg, attention_impl="explicit")
    fused = dataclasses.replace(cfg, attention_impl=impl)
    toks = tokens()
    params = models.build(explicit).init(jax.random.PRNGKey(1), toks)
    logits_e, grads_e, stats_e = outputs(explicit, params, toks)
    logits_f, grads_f, stats_f = outputs(fused, params, toks)
    # float32 sums of T terms in another order: a few ulps of the largest term
    np.testing.assert_allclose(np.asarray(logits_f), np.asarray(logits_e), rtol=rtol, atol=atol)
    if grad_rel:  # low precision: each gradient as a whole within grad_rel of the explicit one
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_e)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= grad_rel * np.linalg.norm(b) + 1e-8, jax.tree_util.keystr(path)
    else:
        assert_trees_close(grads_f, grads_e, rtol=1e-4, atol=1e-6)
    assert set(stats_f) == set(stats_e)
    for k in stats_e:
        assert stats_e[k].shape == (cfg.n_layers,), k
        np.testing.assert_allclose(np.asarray(stats_f[k]), np.asarray(stats_e[k]), rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_blockwise_equals_explicit(variant):
    compare_to_explicit(cfg_of(**VARIANTS[variant]), "blockwise")


@pytest.mark.parametrize("variant", ["softmax-qknorm-gqa", "gated-learned"])
def test_dot_product_equals_explicit(variant):
    compare_to_explicit(cfg_of(**VARIANTS[variant]), "dot_product")


@pytest.mark.parametrize("variant", ["softmax-qknorm-gqa", "sigmoid-alibi-qknorm-gqa", "sigmoid-rope-bias-slot"])
def test_pallas_equals_explicit_in_interpret_mode(variant):
    pytest.importorskip("seismo.models.kernels.flash_sigmoid")
    compare_to_explicit(cfg_of(**VARIANTS[variant]), "pallas")


def test_blockwise_with_bfloat16_compute_stays_close_to_explicit():
    cfg = cfg_of(dtype="bfloat16", attention="sigmoid")
    compare_to_explicit(cfg, "blockwise", rtol=3e-2, atol=3e-2, grad_rel=3e-2)


# --------------------------------------------------------------------------- statistics


def numpy_attention_stats(q, k, scale, kind, bias, slopes):
    """The per-layer attention statistics of one layer, in float64 numpy from whole maps."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T_, H, _ = q.shape
    k = np.repeat(k, H // k.shape[2], axis=2)
    z = np.einsum("bthd,bshd->bhts", q, k) * scale
    i, j = np.arange(T_)[:, None], np.arange(T_)[None]
    s = z if slopes is None else z - np.asarray(slopes, np.float64)[:, None, None] * (i - j)
    vis = j <= i
    s_m = np.where(vis, s, -np.inf)
    lse = np.log(np.sum(np.exp(s_m - s_m.max(-1, keepdims=True)), -1)) + s_m.max(-1)
    if kind == "softmax":
        w = np.where(vis, np.exp(s_m - lse[..., None]), 0.0)
    else:
        w = np.where(vis, 1 / (1 + np.exp(-(s + bias))), 0.0)
    mass = w.sum(-1)
    p = w / mass[..., None]
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    return {"attn_logit_max": np.max(np.where(vis, np.abs(z), 0)), "attn_logz_mean": lse.mean(),
            "attn_logz_max": lse.max(), "attn_entropy": ent.mean(), "attn_row_mass": mass.mean(),
            "attn_sink_mass": w[..., 0].mean()}


@pytest.mark.parametrize("kind,Hk,alibi", [("softmax", 4, False), ("softmax", 2, True), ("sigmoid", 1, True),
                                           ("sigmoid", 4, False)])
def test_blockwise_row_statistics_match_numpy(kind, Hk, alibi):
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)) * 2, jnp.float32)  # T = 20: the last block is padded
    k = jnp.asarray(rng.normal(size=(2, 20, Hk, 8)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 20, Hk, 8)), jnp.float32)
    slopes = alibi_slopes(4) if alibi else None
    _, lse, rows = blockwise.blockwise_attention(q, k, v, kind=kind, scale=0.35, bias=-2.0, alibi_slopes=slopes,
                                                 block=8, stats=True)
    got = blockwise.finish_row_stats(kind, rows, bias=-2.0)
    want = numpy_attention_stats(q, k, 0.35, kind, -2.0, slopes)
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_in_layer_logz_and_max_logit_match_numpy_over_full_taps():
    cfg = cfg_of(positions="alibi", attention_impl="blockwise", n_layers=2)
    model = models.build(cfg)
    toks = tokens()
    params = model.init(jax.random.PRNGKey(0), toks)
    full = jax.device_get(models.build(dataclasses.replace(cfg, attention_impl="explicit")).apply(
        params, toks, taps=True)[1])
    stats = jax.device_get(model.apply(params, toks, taps="stats")[1])
    z = np.asarray(full["attn_logits"], np.float64)  # [L, B, H, T, T], before ALiBi
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    s = z - alibi_slopes(4).astype(np.float64)[None, None, :, None, None] * (i - j)
    s = np.where(j <= i, s, -np.inf)
    top = s.max(-1, keepdims=True)
    lse = (np.log(np.exp(s - top).sum(-1)) + top[..., 0]).reshape(cfg.n_layers, -1)
    np.testing.assert_allclose(stats["attn_logz_mean"], lse.mean(1), rtol=1e-5)
    np.testing.assert_allclose(stats["attn_logz_max"], lse.max(1), rtol=1e-5)
    np.testing.assert_allclose(stats["attn_logit_max"],
                               np.where(j <= i, np.abs(z), 0).reshape(cfg.n_layers, -1).max(1), rtol=1e-5)


# --------------------------------------------------------------------------- choice and errors


def test_auto_picks_per_backend_and_kind():
    assert attention.resolve_impl(cfg_of(), 128, "cpu") == "explicit"  # short sequences on the CPU
    assert attention.resolve_impl(cfg_of(), 256, "cpu") == "blockwise"
    assert attention.resolve_impl(cfg_of(), 128, "tpu") == "blockwise"
    assert attention.resolve_impl(cfg_of(attention="sigmoid"), 128, "gpu") == "blockwise"  # until run on a GPU
    assert attention.resolve_impl(cfg_of(dtype="bfloat16"), 128, "gpu") == "dot_product"
    assert attention.resolve_impl(cfg_of(), 4096) == "blockwise"
    assert attention.resolve_impl(cfg_of(attention="clipped_softmax"), 4096) == "explicit"  # no kernel has it
    assert attention.resolve_impl(cfg_of(attention_impl="blockwise"), 16) == "blockwise"


@pytest.mark.parametrize("override,words", [
    ("model.attention_impl=blockwise model.attention=clipped_softmax", "softmax and sigmoid attention, not clipped"),
    ("model.attention_impl=dot_product model.positions=alibi", "ALiBi"),
    ("model.attention_impl=dot_product model.attention=sigmoid", "softmax attention, not sigmoid"),
    ("model.n_kv_heads=3", "must divide model.n_heads"),
])
def test_impls_refuse_what_they_cannot_compute(override, words):
    with pytest.raises(ConfigError, match=words):
        cfg = load("tiny", overrides=override.split())
        models.check_config(cfg)


# --------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("chunk", [5, 8, 24])
def test_chunked_cross_entropy_equals_whole(chunk):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, T, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 40)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 40, (2, T)), jnp.int32)
    mask = jnp.asarray(rng.random((2, T)) > 0.2, jnp.float32)

    def whole(h, w):
        return lm_loss(h @ w, y, z_loss=1e-2, mask=mask)

    def chunked(h, w):
        return lm_loss_chunked(lambda x: x @ w, h, y, chunk=chunk, z_loss=1e-2, mask=mask)

    (l1, s1), g1 = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(h, w)
    (l2, s2), g2 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for k in s1:
        np.testing.assert_allclose(float(s2[k]), float(s1[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_model_head_matches_the_logits_it_returns():
    for tie in (False, True):
        cfg = cfg_of(tie_embeddings=tie, use_bias=True)
        model = models.build(cfg)
        toks = tokens()
        params = model.init(jax.random.PRNGKey(0), toks)
        logits, _ = model.apply(params, toks)
        hidden, _ = model.apply(params, toks, hidden=True)
        np.testing.assert_array_equal(np.asarray(model.head(params, hidden)), np.asarray(logits))
