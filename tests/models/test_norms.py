"""Norms against numpy, the registry, and the wiring of pre / post / hybrid placement and LayerScale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import models
from seismo.config import ModelConfig
from seismo.models.norms import NORMS, LayerNorm, RMSNorm
from seismo.registry import UnknownNameError


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def tokens() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)


def x_BxTxD(dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(1).normal(size=(2, 3, 16)) * 3 + 1).astype(dtype)


@pytest.mark.parametrize("use_bias", [False, True])
def test_layernorm_and_rmsnorm_match_numpy(use_bias):
    x = x_BxTxD()
    for cls, ref in [
        (LayerNorm, lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)),
        (RMSNorm, lambda x: x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)),
    ]:
        norm = cls(eps=1e-6, use_bias=use_bias)
        params = norm.init(jax.random.PRNGKey(0), x)["params"]
        assert set(params) == ({"scale", "bias"} if use_bias else {"scale"})
        params = jax.tree.map(lambda a: a + 0.5, params)  # a scale and bias that are not 1 and 0
        want = ref(x) * 1.5 + (0.5 if use_bias else 0.0)
        np.testing.assert_allclose(norm.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_norm_computes_in_float32_and_returns_the_input_dtype():
    x = jnp.asarray(x_BxTxD()) * 1e3
    norm = LayerNorm()
    params = norm.init(jax.random.PRNGKey(0), x)
    y = norm.apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), norm.apply(params, x), atol=0.05)


def test_registry_names_and_unknown_name():
    assert {"layernorm", "rmsnorm"} <= set(NORMS.names())
    with pytest.raises(UnknownNameError, match="rmsnorm"):
        NORMS.get("rmsnrom")


def _set_scales(params, names, value):
    blocks = dict(params["blocks"])
    for n in names:
        blocks[n] = jax.tree.map(lambda a: jnp.full_like(a, value), blocks[n])
    return {**params, "blocks": blocks}


def test_hybrid_has_the_extra_norms_and_they_gate_each_branch():
    # hybrid: x + N2(f(N1(x))). With the N2 scales at 0 every branch adds exactly 0, so the
    # residual stream after each block is the embedding; with use_bias False there is no offset.
    cfg = tiny(norm_placement="hybrid")
    model = models.build(cfg)
    params = model.init(jax.random.PRNGKey(0), tokens())
    assert {"attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"} <= set(params["blocks"])
    assert "final_norm" in params
    silent = _set_scales(params, ["attn_post_norm", "mlp_post_norm"], 0.0)
    _, taps = model.apply(silent, tokens(), taps=True)
    x0 = np.asarray(params["embed"]["embedding"])[np.asarray(tokens())]
    for layer in range(cfg.n_layers):
        np.testing.assert_array_equal(taps["resid"][layer], x0)
    # the branch output is normalised: attn_out is what N2 sees
    _, taps = model.apply(params, tokens(), taps=True)
    assert not np.allclose(taps["resid"][0], x0)


def test_layerscale_with_tiny_init_keeps_each_block_near_identity():
    cfg = tiny(layerscale=True, layerscale_init=1e-6)
    model = models.build(cfg)
    params = model.init(jax.random.PRNGKey(0), tokens())
    assert params["blocks"]["attn_scale"]["layerscale"].shape == (cfg.n_layers, cfg.d_model)
    np.testing.assert_allclose(params["blocks"]["mlp_scale"]["layerscale"], 1e-6)
    assert models.param_groups(params)["blocks"]["mlp_scale"]["layerscale"] == "layerscale"
    _, taps = model.apply(params, tokens(), taps=True)
    x0 = np.asarray(params["embed"]["embedding"])[np.asarray(tokens())]
    np.testing.assert_allclose(taps["resid"][-1], x0, atol=1e-4 * np.abs(x0).max())
    assert np.any(np.asarray(taps["resid"][-1]) != x0)  # the branches are there, only scaled


def test_post_norm_normalises_the_stream_and_has_no_final_norm():
    cfg = tiny(norm_placement="post")
    model = models.build(cfg)
    params = model.init(jax.random.PRNGKey(0), tokens())
    assert "final_norm" not in params and "attn_post_norm" not in params["blocks"]
    _, taps = model.apply(params, tokens(), taps=True)
    r = np.asarray(taps["resid"])  # LayerNorm output with unit scale: mean 0, variance 1
    np.testing.assert_allclose(r.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(r.var(-1), 1, rtol=1e-3)
