"""The MLP against numpy (dense and gated), learnable activations, and neuron thresholds."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import models
from seismo.config import ModelConfig
from seismo.models.mlp import MLP, neuron_output_norms


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=24)
    return ModelConfig(**{**base, **kw})


def x_BxTxD() -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("kw,gated,act", [
    (dict(), False, gelu_tanh),
    (dict(mlp="gated"), True, gelu_tanh),
    (dict(activation="swiglu"), True, silu),
    (dict(activation="relu", use_bias=True), False, lambda x: np.maximum(x, 0)),
])
def test_mlp_matches_numpy(kw, gated, act):
    cfg = tiny(**kw)
    mlp = MLP(cfg)
    x = x_BxTxD()
    params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(0), x)["params"])
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # nonzero biases
    p = jax.tree.map(np.asarray, params)
    assert ("gate" in p) == gated
    assert p["up"]["kernel"].shape == (16, 24) and p["down"]["kernel"].shape == (24, 16)
    xn = np.asarray(x)
    bias = lambda name: p[name]["bias"] if cfg.use_bias else 0.0
    up = xn @ p["up"]["kernel"] + bias("up")
    h = act(xn @ p["gate"]["kernel"] + bias("gate")) * up if gated else act(up)
    want = h @ p["down"]["kernel"] + bias("down")
    np.testing.assert_allclose(mlp.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_learnable_activation_parameters_sit_under_activation():
    cfg = tiny(activation="swish_beta", activation_kwargs={"per_channel": True})
    params = nn.meta.unbox(MLP(cfg).init(jax.random.PRNGKey(0), x_BxTxD())["params"])
    assert params["activation"]["beta"].shape == (24,)
    model = models.build(cfg)
    full = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert full["blocks"]["mlp"]["activation"]["beta"].shape == (2, 24)
    assert models.param_groups(full)["blocks"]["mlp"]["activation"]["beta"] == "activation"


def test_neuron_threshold_zeroes_exactly_the_weak_neurons():
    # Neuron i's output is n_i = h_i W_down[i, :]; a threshold eps zeroes h_i where
    # |h_i| ||W_down[i, :]|| < eps (Sparsing Law, CETT). Layer 0 sees the same input with and
    # without thresholds, so its hidden activity must be the numpy-masked dense one.
    cfg = tiny(activation="swiglu")
    model = models.build(cfg)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 6)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), toks)
    _, dense = model.apply(params, toks, taps=True)
    h = np.asarray(dense["mlp_post"][0])
    w_down = np.asarray(params["blocks"]["mlp"]["down"]["kernel"][0])
    norms = np.abs(h) * np.linalg.norm(w_down, axis=-1)
    np.testing.assert_allclose(neuron_output_norms(h, w_down), norms, rtol=1e-6)
    eps = float(np.median(norms))
    _, sparse = model.apply(params, toks, taps=True, neuron_threshold=jnp.asarray([eps, 0.0]))
    got = np.asarray(sparse["mlp_post"][0])
    np.testing.assert_array_equal(got, np.where(norms >= eps, h, 0.0))
    assert 0.3 < np.mean(got == 0) < 0.7
    # the layer's output is the dense output less the removed neurons' contributions
    np.testing.assert_allclose(sparse["mlp_out"][0], np.where(norms >= eps, h, 0.0) @ w_down, rtol=1e-4, atol=1e-5)
    # a zero threshold changes nothing; a scalar applies to every layer
    np.testing.assert_array_equal(model.apply(params, toks, neuron_threshold=0.0)[0], model.apply(params, toks)[0])
    _, both = model.apply(params, toks, taps=True, neuron_threshold=eps)
    assert np.mean(np.asarray(both["mlp_post"][1]) == 0) > 0.1


def test_neuron_threshold_same_in_unrolled_model():
    cfg = tiny()
    scanned = models.build(cfg)
    toks = jnp.zeros((1, 4), jnp.int32).at[0, 1].set(3)
    params = scanned.init(jax.random.PRNGKey(0), toks)
    unrolled = models.build(dataclasses.replace(cfg, scan_layers=False))
    thr = jnp.asarray([0.05, 0.1])
    a, _ = scanned.apply(params, toks, neuron_threshold=thr)
    b, _ = unrolled.apply(models.unstack_layers(params, cfg.n_layers), toks, neuron_threshold=thr)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
