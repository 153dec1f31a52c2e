"""Activations against independent numpy formulas, golden values of docs/methods.md §9.4-9.5, the
registry's errors, and the ten-line extension path of docs/activations.md."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from seismo.models import activations as act
from seismo.registry import UnknownNameError

XS = np.concatenate([np.linspace(-5, 5, 401), np.random.default_rng(0).normal(0, 3, 200)]).astype(np.float32)
LEARNABLE = ["swish_beta", "pau", "apa", "aglu", "polynorm", "polyrelu"]


def run(name, x, params=None, seed=0, **kwargs):
    """Apply activation `name` to x; `params` replace the initial parameters (float64 is fine)."""
    module = act.make(name, **kwargs)
    x = jnp.asarray(x)
    variables = module.init(jax.random.PRNGKey(seed), x)
    if params is not None:
        variables = {"params": {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}}
    return np.asarray(module.apply(variables, x), np.float64), variables


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ----------------------------------------------------------------------------- fixed

SELU_SCALE, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772
FIXED = {
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
    "silu": lambda x: x * sigmoid(x),
    "selu": lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * (np.exp(x) - 1)),
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "tanh": np.tanh,
    "identity": lambda x: x,
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_activation_matches_numpy(name):
    y, variables = run(name, XS)
    np.testing.assert_allclose(y, FIXED[name](XS.astype(np.float64)), rtol=2e-6, atol=2e-6, err_msg=name)
    assert variables == {} and not act.is_learnable(name) and not act.is_gated(name)


def test_gelu_exact_on_request():
    y, _ = run("gelu", XS, approximate=False)
    x = XS.astype(np.float64)
    np.testing.assert_allclose(y, 0.5 * x * (1 + erf(x / math.sqrt(2))), rtol=2e-6, atol=2e-6)
    assert np.abs(y - FIXED["gelu"](x)).max() > 1e-4  # the two variants are distinguishable


@pytest.mark.parametrize("gated, base", [("swiglu", "silu"), ("geglu", "gelu")])
def test_gated_aliases(gated, base):
    assert act.is_gated(gated) and not act.is_gated(base)
    np.testing.assert_array_equal(run(gated, XS)[0], run(base, XS)[0])


# ----------------------------------------------------------------------------- PAU


def pau_numpy(x, a, b, version):
    x = np.asarray(x, np.float64)
    p = sum(a_j * x**j for j, a_j in enumerate(a))
    terms = [b_k * x ** (k + 1) for k, b_k in enumerate(b)]
    if version == "B":
        q = 1 + np.abs(sum(terms))
    elif version == "A":
        q = 1 + sum(np.abs(t) for t in terms)
    else:
        q = 1 + sum(abs(b_k) * np.abs(x) ** (k + 1) for k, b_k in enumerate(b))
    return p / q


def test_pau_golden_values_at_init():
    y, variables = run("pau", np.array([0.0, 1.0, -1.0], np.float32))
    msg = "PAU init moved: check PAU_A_INIT/PAU_B_INIT against docs/methods.md §6.1 (pau Pade.py)"
    np.testing.assert_allclose(y, [0.0335584, 1.00081, -0.00919], atol=1e-5, err_msg=msg)
    assert variables["params"]["a"].dtype == jnp.float32 and variables["params"]["a"].shape == (6,)
    assert variables["params"]["b"].shape == (4,)
    grid = np.linspace(-3, 3, 6001).astype(np.float32)
    err = np.abs(run("pau", grid)[0] - np.where(grid > 0, grid, 0.01 * grid))
    assert abs(err.max() - 0.03356) < 1e-5, msg  # docs/methods.md §9.5
    assert abs(grid[err.argmax()]) < 1e-3  # the worst point is x = 0, where F(0) = a0


@pytest.mark.parametrize("version", ["B", "A", "abs"])
def test_pau_matches_numpy(version, rng):
    x = XS.clip(-3, 3)
    y0, _ = run("pau", x, version=version)
    np.testing.assert_allclose(y0, pau_numpy(x, act.PAU_A_INIT, act.PAU_B_INIT, version), rtol=1e-5, atol=1e-6)
    a, b = rng.normal(0, 0.5, 6), rng.normal(0, 0.5, 4)
    y1, _ = run("pau", x, params={"a": a, "b": b}, version=version)
    np.testing.assert_allclose(y1, pau_numpy(x, a, b, version), rtol=1e-4, atol=1e-5)


def test_pau_versions_agree_at_init_and_differ_once_b_moves():
    x = np.linspace(-3, 3, 601).astype(np.float32)
    at_init = {v: run("pau", x, version=v)[0] for v in ("B", "A", "abs")}
    assert np.abs(at_init["B"] - at_init["A"]).max() < 1e-6
    assert np.abs(at_init["abs"] - at_init["A"]).max() < 1e-6
    b = np.array(act.PAU_B_INIT) + np.array([0.3, 0.0, -0.2, 0.0])  # move b1 and b3
    moved = {v: run("pau", x, params={"a": act.PAU_A_INIT, "b": b}, version=v)[0] for v in ("B", "A", "abs")}
    assert np.abs(moved["B"] - moved["A"]).max() > 1e-2
    # |b_k x^k| = |b_k| |x|^k: version A and the original pau form are the same function.
    np.testing.assert_allclose(moved["A"], moved["abs"], rtol=1e-6, atol=1e-7)


def test_pau_bad_version_fails_before_init():
    with pytest.raises(ValueError, match="'version' is 'Z'.*one of 'B', 'A', 'abs'"):
        act.make("pau", version="Z")


# ----------------------------------------------------------------------------- APA / AGLU


def test_apa_at_one_one_is_sigmoid_and_aglu_is_silu():
    params = {"lambda_": 1.0, "kappa": 1.0}
    np.testing.assert_allclose(run("apa", XS, params)[0], sigmoid(XS.astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(run("aglu", XS, params)[0], FIXED["silu"](XS.astype(np.float64)), atol=2e-6)
    np.testing.assert_allclose(run("aglu", XS, init_scheme="sigmoid")[0], run("silu", XS)[0], atol=2e-6)


def test_apa_small_lambda_is_gumbel_cdf():
    z = np.linspace(-5, 5, 1001).astype(np.float32)
    y, _ = run("apa", z, {"lambda_": 1e-4, "kappa": 1.0})
    err = np.abs(y - np.exp(-np.exp(-z.astype(np.float64)))).max()
    # With u = e^-z, log APA = -log(1 + lambda u) / lambda = -u + lambda u^2 / 2 + O(lambda^2), so
    # the error is about lambda u^2 e^-u / 2, largest at u = 2: 2 lambda e^-2 = 2.707e-5 (at
    # z = -log 2), the value docs/methods.md §9.4 gives.
    bound = 2 * 1e-4 * math.exp(-2)
    assert abs(err - bound) < 1e-6, f"APA(lambda=1e-4) vs Gumbel CDF: {err:.4g}, expected {bound:.4g}"
    y0, _ = run("apa", z, {"lambda_": 0.0, "kappa": 1.0})  # clamped to 1e-4
    np.testing.assert_array_equal(y0, y)


@pytest.mark.parametrize("lam, kappa", [(0.05, 1.0), (0.3, 0.2), (0.7, 2.5), (1.5, 1.0), (3.0, 0.7)])
def test_apa_stable_form_equals_direct_form(lam, kappa):
    z = XS.clip(-5, 5)
    direct = (lam * np.exp(-kappa * z.astype(np.float64)) + 1) ** (-1 / lam)
    np.testing.assert_allclose(run("apa", z, {"lambda_": lam, "kappa": kappa})[0], direct, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run("aglu", z, {"lambda_": lam, "kappa": kappa})[0], z * direct, rtol=1e-4, atol=5e-6)


def test_apa_initialisation():
    params = [run("apa", XS, seed=s)[1]["params"] for s in (0, 1)]
    values = [float(p[k]) for p in params for k in ("lambda_", "kappa")]
    assert all(0 <= v < 1 for v in values) and len(set(values)) == 4  # U(0, 1) from the rng
    fixed = run("aglu", XS, lambda_init=0.5, kappa_init=2.0)[1]["params"]
    assert float(fixed["lambda_"]) == 0.5 and float(fixed["kappa"]) == 2.0
    assert fixed["lambda_"].shape == () and fixed["lambda_"].dtype == jnp.float32


# ----------------------------------------------------------------------------- PolyCom, Swish


def rms_normalise(y, eps=1e-6):
    return y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + eps)


def polynorm_numpy(x, w, bias):
    return w[0] * rms_normalise(x**3) + w[1] * rms_normalise(x**2) + w[2] * rms_normalise(x) + bias


def polyrelu_numpy(x, w, bias):
    r = np.maximum(x, 0)
    return w[0] * r + w[1] * r**2 + w[2] * r**3 + bias


@pytest.mark.parametrize("name, reference", [("polynorm", polynorm_numpy), ("polyrelu", polyrelu_numpy)])
def test_polycom_matches_numpy(name, reference, rng):
    x = rng.normal(0, 1.5, (4, 3, 32)).astype(np.float32)
    y0, variables = run(name, x)
    np.testing.assert_allclose(y0, reference(x.astype(np.float64), [1 / 3] * 3, 0.0), rtol=1e-5, atol=1e-5)
    assert variables["params"]["w"].shape == (3,) and variables["params"]["bias"].shape == ()
    w, bias = rng.normal(0, 1, 3), rng.normal()
    y1, _ = run(name, x, params={"w": w, "bias": bias})
    np.testing.assert_allclose(y1, reference(x.astype(np.float64), w, bias), rtol=1e-5, atol=1e-4)


def test_swish_beta():
    x = XS.astype(np.float64)
    np.testing.assert_allclose(run("swish_beta", XS)[0], x * sigmoid(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run("swish_beta", XS, beta_init=2.0)[0], x * sigmoid(2 * x), rtol=1e-5, atol=1e-6)
    beta = np.linspace(0.5, 3, 8)
    xc = XS[:400].reshape(50, 8)
    y, v = run("swish_beta", xc, params={"beta": beta}, per_channel=True)
    assert act.make("swish_beta", per_channel=True).init(jax.random.PRNGKey(0), xc)["params"]["beta"].shape == (8,)
    np.testing.assert_allclose(y, xc * sigmoid(beta * xc), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- all activations


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_gradients_are_finite(name):
    module = act.make(name)
    x = jnp.asarray([[0.0, 1e-6, -1e-6, 1e-3, -1e-3, 30.0, -30.0, 300.0, -300.0]], jnp.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    assert act.is_learnable(name) and jax.tree.leaves(variables)
    grads = jax.grad(lambda v, x: module.apply(v, x).sum(), argnums=(0, 1))(variables, x)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g))), f"{name}: non-finite gradient {g}"


@pytest.mark.parametrize("name", act.names())
def test_bf16_in_bf16_out_params_float32(name):
    x = jnp.asarray(XS[:600].reshape(-1, 8), jnp.bfloat16)
    module = act.make(name)
    variables = module.init(jax.random.PRNGKey(0), x)
    y = module.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    y32 = module.apply(variables, x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=2e-2, atol=2e-2)


def test_params_live_under_the_given_module_name():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return act.make("pau", name="activation", version="A")(nn.Dense(4)(x))

    variables = Block().init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
    assert set(variables["params"]["activation"]) == {"a", "b"}


# ----------------------------------------------------------------------------- registry


def test_unknown_name_lists_names_and_suggests_nearest():
    for call in (lambda: act.make("gelo"), lambda: act.is_gated("gelo"), lambda: act.check_kwargs("gelo", {})):
        with pytest.raises(UnknownNameError) as info:
            call()
        text = str(info.value)
        assert "Did you mean 'gelu'?" in text and all(n in text for n in act.names())


def test_check_kwargs_errors_speak_plainly():
    with pytest.raises(TypeError, match=r"no argument 'verison'\. Did you mean 'version'\? Its arguments: version"):
        act.check_kwargs("pau", {"verison": "A"})
    with pytest.raises(TypeError, match="no argument 'beta'.*Its arguments: none"):
        act.check_kwargs("relu", {"beta": 1.0})
    with pytest.raises(ValueError, match="'approximate' is 'yes'.*must be bool"):
        act.check_kwargs("gelu", {"approximate": "yes"})
    with pytest.raises(ValueError, match="'lambda_init' is True"):
        act.check_kwargs("aglu", {"lambda_init": True})
    act.check_kwargs("aglu", {"lambda_init": 1, "kappa_init": None, "init_scheme": "sigmoid"})
    act.check_kwargs("geglu", {"approximate": False})


def test_names_and_descriptions():
    expected = {"gelu", "relu", "relu2", "silu", "selu", "mish", "tanh", "identity", "swiglu", "geglu", *LEARNABLE}
    assert expected <= set(act.names()) and act.names() == sorted(act.names())
    assert all(act.describe(n) and "\n" not in act.describe(n) for n in act.names())
    with pytest.raises(ValueError, match="already registered"):
        act.register("relu", lambda x: x)


def test_extension_in_ten_lines():
    # The example of docs/activations.md: one decorated function, then usable by name.
    @act.register("softsign_scaled")
    def softsign_scaled(x, *, scale: float = 1.0):
        """Softsign x / (1 + |x|), times `scale`."""
        return scale * x / (1 + jnp.abs(x))

    try:
        assert "softsign_scaled" in act.names() and not act.is_learnable("softsign_scaled")
        assert act.describe("softsign_scaled") == "Softsign x / (1 + |x|), times `scale`."
        y, _ = run("softsign_scaled", XS, scale=2.0)
        np.testing.assert_allclose(y, 2 * XS / (1 + np.abs(XS)), rtol=1e-6)
        with pytest.raises(TypeError, match="Did you mean 'scale'"):
            act.check_kwargs("softsign_scaled", {"scal": 2.0})
    finally:
        act.REGISTRY.unregister("softsign_scaled")


def test_extension_with_a_learnable_module():
    @act.register("scaled_tanh")
    class ScaledTanh(nn.Module):
        """alpha * tanh(x), alpha learnable."""

        @nn.compact
        def __call__(self, x):
            return self.param("alpha", nn.initializers.ones, ()) * jnp.tanh(x)

    try:
        assert act.is_learnable("scaled_tanh")
        y, variables = run("scaled_tanh", XS, params={"alpha": 3.0})
        np.testing.assert_allclose(y, 3 * np.tanh(XS), rtol=1e-6)
    finally:
        act.REGISTRY.unregister("scaled_tanh")
