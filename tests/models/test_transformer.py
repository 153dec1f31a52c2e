"""The transformer: causality, scanned == unrolled, taps, dtypes, init, parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import models
from seismo.config import DECAY_GROUPS, ModelConfig, resolve_scan_unroll
from seismo.models.transformer import TAP_NAMES

B, T = 2, 8


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def tokens(seed: int = 0, b: int = B, t: int = T, vocab: int = 64) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


_BUILT: dict[str, tuple] = {}


def init(cfg: ModelConfig, seed: int = 0):
    """(model, params), built once per config: compiling is most of a tiny test's time."""
    key = f"{cfg!r}/{seed}"
    if key not in _BUILT:
        model = models.build(cfg)
        _BUILT[key] = model, model.init(jax.random.PRNGKey(seed), tokens())
    return _BUILT[key]


VARIANTS = [
    {},
    dict(attention="sigmoid", positions="alibi", attn_bias=True),
    dict(attention="gated", qk_norm=True, positions="learned", norm_placement="hybrid", layerscale=True),
    dict(attention="clipped_softmax", norm_placement="post", norm="rmsnorm", activation="swiglu"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_causal_through_gradients(kw):
    # Every position holds a different token, so the gradient of logits[t] with respect to
    # the embedding row of the token at position t' is that of position t' alone: it must be
    # zero for every t' > t (and nonzero for t' = t).
    cfg = tiny(**kw)
    model, params = init(cfg)
    toks = jnp.asarray(np.random.default_rng(1).permutation(cfg.vocab_size)[:T][None], jnp.int32)

    def logit_sums(p):  # [T]: the sum of each position's logits
        return jnp.sum(model.apply(p, toks)[0][0], axis=-1)

    jac = jax.jit(jax.jacrev(logit_sums))(params)
    rows_TxTxD = np.asarray(jac["embed"]["embedding"])[:, np.asarray(toks[0])]
    for t in range(T):
        assert np.all(rows_TxTxD[t, t + 1:] == 0), f"logits at {t} depend on later tokens"
        assert np.any(rows_TxTxD[t, t] != 0)
    if cfg.positions == "learned":
        pos_TxPxD = np.asarray(jac["pos_embed"]["embedding"])
        assert all(np.all(pos_TxPxD[t, t + 1:] == 0) for t in range(T))


@pytest.mark.parametrize("kw", [{}, dict(attention="gated", attn_bias=True, qk_norm=True, positions="learned",
                                         activation="swish_beta", norm_placement="hybrid", layerscale=True)])
def test_scanned_equals_unrolled_on_same_weights(kw):
    cfg = tiny(**kw)
    scanned, params = init(cfg)
    unrolled = models.build(dataclasses.replace(cfg, scan_layers=False))
    flat = models.unstack_layers(params, cfg.n_layers)
    own = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), tokens())
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(jnp.shape, flat)
    x = tokens(3)
    a, ta = scanned.apply(params, x, taps=True)
    b, tb = unrolled.apply(flat, x, taps=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for name in TAP_NAMES:
        np.testing.assert_allclose(ta[name], tb[name], rtol=1e-5, atol=1e-5, err_msg=name)
    restacked = models.stack_layers(flat, cfg.n_layers)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), restacked, params))


def test_scan_unroll_keeps_the_layout_numbers_and_gradients():
    """`model.scan_unroll` changes how many layers one scan iteration runs, nothing else: the
    same parameter tree, the same logits, taps and gradients as one layer per iteration."""
    assert [resolve_scan_unroll(n) for n in (1, 2, 5, 6, 12)] == [1, 2, 5, 1, 1]  # 'auto', by depth
    cfg = tiny(n_layers=3, attn_bias=True, scan_unroll=1)
    rolled, params = init(cfg)
    x, y = tokens(4), tokens(5)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: models.lm_loss(m.apply(p, x)[0], y)[0]))
    l0, g0 = loss(rolled)(params)
    _, t0 = rolled.apply(params, x, taps=True)
    for unroll in (2, 3):
        model = models.build(dataclasses.replace(cfg, scan_unroll=unroll))
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens())
        assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(jnp.shape, params)
        l1, g1 = loss(model)(params)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), g0, g1)
        _, t1 = model.apply(params, x, taps=True)
        for name in TAP_NAMES:
            np.testing.assert_allclose(t0[name], t1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_remat_gives_same_numbers_and_gradients():
    cfg = tiny()
    model, params = init(cfg)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: models.lm_loss(m.apply(p, tokens(1))[0], tokens(2))[0]))
    l0, g0 = loss(model)(params)
    for remat in ("full", "dots"):
        l1, g1 = loss(models.build(dataclasses.replace(cfg, remat=remat)))(params)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), g0, g1)


def test_taps_names_shapes_and_off_by_default():
    cfg = tiny(attn_bias=True)
    model, params = init(cfg)
    logits, taps = model.apply(params, tokens())
    assert taps == {} and logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    _, taps = model.apply(params, tokens(), taps=True)
    L, H, D, F = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.resolved_d_ff
    want = {"resid": (L, B, T, D), "attn_logits": (L, B, H, T, T + 1), "attn_probs": (L, B, H, T, T + 1),
            "attn_out": (L, B, T, D), "mlp_pre": (L, B, T, F), "mlp_post": (L, B, T, F), "mlp_out": (L, B, T, D),
            "embed": (B, T, D), "logits": (B, T, cfg.vocab_size)}
    assert {k: v.shape for k, v in taps.items()} == want
    assert all(v.dtype == jnp.float32 for v in taps.values())
    np.testing.assert_array_equal(taps["logits"], logits)
    np.testing.assert_array_equal(taps["embed"], np.asarray(params["embed"]["embedding"])[np.asarray(tokens())])


def test_taps_do_not_change_logits_and_jit():
    cfg = tiny()
    model, params = init(cfg)
    plain = jax.jit(lambda p, x: model.apply(p, x)[0])(params, tokens())
    with_taps, _ = jax.jit(lambda p, x: model.apply(p, x, taps=True))(params, tokens())
    np.testing.assert_allclose(plain, with_taps, rtol=1e-6)


def test_bfloat16_path_finite_and_close_to_float32():
    cfg = tiny(qk_norm=True)
    model, params = init(cfg)
    bf = models.build(dataclasses.replace(cfg, dtype="bfloat16"))
    a, _ = model.apply(params, tokens())
    b, taps = bf.apply(params, tokens(), taps=True)
    assert b.dtype == jnp.float32 and taps["attn_logits"].dtype == jnp.float32
    assert np.all(np.isfinite(b))
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 0.1 * np.max(np.abs(np.asarray(a)))
    grads = jax.jit(jax.grad(lambda p: models.lm_loss(bf.apply(p, tokens())[0], tokens(5))[0]))(params)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_init_scales_follow_the_recipe():
    cfg = tiny(d_model=128, n_heads=4, vocab_size=512, n_layers=1)
    _, p = init(cfg)
    std = lambda a: float(np.std(np.asarray(a)))
    assert abs(std(p["embed"]["embedding"]) - 128**-0.5) < 0.05 * 128**-0.5
    assert abs(std(p["blocks"]["mlp"]["up"]["kernel"]) - 128**-0.5) < 0.05 * 128**-0.5
    assert abs(std(p["blocks"]["mlp"]["down"]["kernel"]) - 512**-0.5) < 0.05 * 512**-0.5
    assert np.max(np.abs(p["blocks"]["mlp"]["down"]["kernel"])) <= 2 * 512**-0.5 / 0.8796 + 1e-6  # truncated
    _, q = init(dataclasses.replace(cfg, init_std=0.02, embed_init_std=1.0))
    assert abs(std(q["blocks"]["attn"]["key"]["kernel"]) - 0.02) < 0.002
    assert abs(std(q["embed"]["embedding"]) - 1.0) < 0.05
    _, m = init(dataclasses.replace(cfg, mup="full", mup_base_width=256))
    assert not np.any(m["blocks"]["attn"]["query"]["kernel"])
    assert abs(std(m["head"]["kernel"]) - 256**0.5 / 128) < 0.05 * 256**0.5 / 128


def test_tied_head_uses_the_embedding():
    cfg = tiny(tie_embeddings=True, norm_placement="pre")
    model, params = init(cfg)
    assert "head" not in params
    _, taps = model.apply(params, tokens(), taps=True)
    logits, _ = model.apply(params, tokens())
    x = np.asarray(taps["resid"][-1])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)  # final norm, scale 1
    np.testing.assert_allclose(logits, x @ np.asarray(params["embed"]["embedding"]).T, rtol=1e-4, atol=1e-4)


def expected_count(cfg: ModelConfig) -> tuple[int, int]:
    """(non-embedding, total) by hand: per layer q, k, v, o = 4 d H dh; MLP 2 d f (3 d f
    gated); per norm d; qk-norm 2 dh; attn bias 2 H dh; gates H (d/H) + H; LayerScale 2 d."""
    d, L, H, dh, f, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.resolved_head_dim, cfg.resolved_d_ff, cfg.vocab_size
    gated_mlp = cfg.mlp == "gated" or cfg.activation in ("swiglu", "geglu")
    norms = {"pre": 2, "post": 2, "hybrid": 4}[cfg.norm_placement]
    layer = 4 * d * H * dh + (3 if gated_mlp else 2) * d * f + norms * d
    layer += 2 * dh * cfg.qk_norm + 2 * H * dh * cfg.attn_bias + 2 * d * cfg.layerscale
    layer += (d + H) * (cfg.attention == "gated")
    final = d if cfg.norm_placement != "post" else 0
    non_embedding = L * layer + final
    embedding = V * d + (cfg.max_seq_len * d if cfg.positions == "learned" else 0)
    head = 0 if cfg.tie_embeddings else d * V
    return non_embedding, non_embedding + embedding + head


@pytest.mark.parametrize("kw", [
    {}, dict(tie_embeddings=True, positions="learned"), dict(mlp="gated", qk_norm=True),
    dict(attn_bias=True, attention="gated", norm_placement="hybrid", layerscale=True),
    dict(norm_placement="post", d_ff=96, head_dim=16),
])
def test_param_count_matches_closed_form(kw):
    cfg = tiny(**kw)
    params = jax.eval_shape(models.build(cfg).init, jax.random.PRNGKey(0), tokens())  # shapes suffice
    non_emb, total = expected_count(cfg)
    assert models.param_count(params, non_embedding=True) == non_emb
    assert models.param_count(params, non_embedding=False) == total
    assert models.param_count(cfg, non_embedding=False) == total  # from the config, shapes only


def test_param_groups_and_axes_cover_every_leaf():
    cfg = tiny(attention="gated", attn_bias=True, qk_norm=True, positions="learned", norm_placement="hybrid",
               layerscale=True, use_bias=True, activation="swish_beta", activation_kwargs={"per_channel": True})
    model = models.build(cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens())
    groups = models.param_groups(params)
    assert jax.tree.structure(groups) == jax.tree.structure(params)
    assert set(jax.tree.leaves(groups)) == set(DECAY_GROUPS)
    is_axes = lambda x: isinstance(x, tuple)
    axes = model.param_axes()
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    known = {"layers", "embed", "mlp", "heads", "kv", "vocab", None}
    for a, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
        assert len(a) == leaf.ndim and set(a) <= known
    assert axes["blocks"]["attn"]["query"]["kernel"] == ("layers", "embed", "heads")
    assert axes["blocks"]["mlp"]["activation"]["beta"] == ("layers", None)
    assert groups["blocks"]["attn"]["attn_bias"]["k"] == "attn_bias"
    assert groups["blocks"]["attn_scale"]["layerscale"] == "layerscale"
    unrolled = models.build(dataclasses.replace(cfg, scan_layers=False)).param_axes()
    assert unrolled["block_1"]["mlp"]["down"]["kernel"] == ("mlp", "embed")
