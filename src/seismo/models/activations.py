"""Activation functions, fixed and learnable, registered by name.

A config names an activation (`model.activation: pau`) and its arguments
(`model.activation_kwargs: {version: A}`); `make(name, **kwargs)` returns a Flax module that
maps an array to an array of the same shape. Fixed activations are plain functions wrapped in
a parameter-free module; learnable ones are small modules whose float32 parameters the model
stores under the name `activation` (so the optimizer's `activation` group can exclude them from
weight decay and the probes can find them).

Papers (formulas and defaults in docs/methods.md §6):
  GELU      Hendrycks & Gimpel, arXiv 1606.08415 (tanh approximation by default, as Flax and
            Wortsman et al. 2023 use it)
  SELU      Klambauer et al., arXiv 1706.02515
  Swish     Ramachandran et al., arXiv 1710.05941 (learnable beta: `swish_beta`)
  Mish      Misra, arXiv 1908.08681
  ReLU^2    So et al. (Primer), arXiv 2109.08668
  GLU       Shazeer, arXiv 2002.05202 (`swiglu`, `geglu`: gated=True, the MLP builds the gate)
  PAU       Molina et al., arXiv 1907.06732 (safe Pade activation unit)
  APA/AGLU  Alexandridis et al., ECCV 2024, arXiv 2407.08567
  PolyCom   Zhuo et al., arXiv 2411.03884 (PolyNorm, PolyReLU)

Adding an activation is one function plus one decorator (see docs/activations.md):

    @register("softsign2")
    def softsign2(x, *, scale: float = 1.0):
        "x / (1 + |x|), scaled."
        return scale * x / (1 + jnp.abs(x))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from seismo import typecheck
from seismo.registry import Registry, UnknownNameError, nearest

__all__ = [
    "REGISTRY", "ActivationSpec", "UnknownNameError", "check_kwargs", "describe", "is_gated",
    "is_learnable", "make", "names", "register",
]


@dataclass(frozen=True)
class ActivationSpec:
    """What the registry stores for one name."""

    fn: Callable[..., Any]  # a function x -> y (keyword arguments allowed) or a Module class
    learnable: bool  # True for Module classes: it has parameters
    gated: bool  # True: the MLP computes act(x W_gate) * (x W_up) (Shazeer 2020)
    description: str  # one line, for docs and --help


REGISTRY: Registry[ActivationSpec] = Registry("activation")


class Elementwise(nn.Module):
    """A parameter-free activation: applies `fn` (a function with its kwargs bound) to x."""

    fn: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def register(
    name: str,
    fn: Callable[..., Any] | None = None,
    *,
    learnable: bool = False,
    gated: bool = False,
    description: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Register an activation, as a decorator (`@register("relu2")`) or a call.

    `fn` is either a function `x -> y` (keyword-only arguments become activation kwargs) or a
    Flax Module class whose dataclass fields are the kwargs; a Module class is learnable.
    `description` defaults to the first line of `fn`'s docstring. Returns `fn` unchanged.
    """

    def add(obj: Callable[..., Any]) -> Callable[..., Any]:
        doc = description or (inspect.getdoc(obj) or name).strip().splitlines()[0]
        spec = ActivationSpec(obj, learnable or _is_module_class(obj), gated, doc)
        REGISTRY.register(name, spec, overwrite=overwrite)
        return obj

    return add if fn is None else add(fn)


def names() -> list[str]:
    """Registered activation names, sorted."""
    return REGISTRY.names()


def is_gated(name: str) -> bool:
    """True when the MLP should build a gated (GLU) block around this activation."""
    return REGISTRY.get(name).gated


def is_learnable(name: str) -> bool:
    """True when the activation has parameters (stored under the module named `activation`)."""
    return REGISTRY.get(name).learnable


def describe(name: str) -> str:
    """One-line description of an activation, for docs and `--help`."""
    return REGISTRY.get(name).description


# --------------------------------------------------------------------------- kwargs checks


def _kwarg_types(fn: Callable[..., Any]) -> dict[str, Any]:
    """Accepted kwargs of a registered activation -> their annotation (Any if unknown)."""
    if _is_module_class(fn):
        own = {f.name for f in dataclasses.fields(fn)} - {"parent", "name"}
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotation: accept any value, still check the names
            hints = {}
        return {k: hints.get(k, Any) for k in own}
    params = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]  # skip x
    return {p.name: (Any if p.annotation is inspect.Parameter.empty else p.annotation)
            for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _hint_words(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check `kwargs` for activation `name` before anything compiles; returns them converted
    where lossless (seismo.typecheck: '1e-3' -> 0.001).

    Raises UnknownNameError for an unknown activation, TypeError for an argument the activation
    does not take (naming the valid ones and the nearest), ValueError for a value of the wrong
    kind (e.g. PAU `version: Z`).
    """
    spec = REGISTRY.get(name)
    accepted = _kwarg_types(spec.fn)
    valid = ", ".join(sorted(accepted)) or "none"
    out = {}
    for key, value in kwargs.items():
        if key not in accepted:
            hint = nearest(key, sorted(accepted))
            raise TypeError(
                f"activation {name!r} has no argument {key!r}."
                + (f" Did you mean {hint!r}?" if hint else "")
                + f" Its arguments: {valid}.")
        try:
            out[key] = typecheck.coerce(value, accepted[key], key)
        except typecheck.TypeMismatch:
            raise ValueError(
                f"activation {name!r}: argument {key!r} is {value!r}, but it must be "
                f"{_hint_words(accepted[key])}.") from None
    return out


def make(name: str, /, **kwargs: Any) -> nn.Module:
    """The activation module registered as `name`, with its `kwargs` checked first.

    `name=` among the kwargs is the Flax module name (the model uses `name="activation"`).
    """
    module_name = kwargs.pop("name", None)
    kwargs = check_kwargs(name, kwargs)
    spec = REGISTRY.get(name)
    if _is_module_class(spec.fn):
        return spec.fn(**kwargs, name=module_name)
    return Elementwise(functools.partial(spec.fn, **kwargs), name=module_name)


# --------------------------------------------------------------------------- fixed


@register("gelu")
def gelu(x: jax.Array, *, approximate: bool = True) -> jax.Array:
    """GELU, tanh approximation by default (Flax's and Wortsman et al.'s); approximate=False is exact."""
    return jax.nn.gelu(x, approximate=approximate)


@register("relu")
def relu(x: jax.Array) -> jax.Array:
    """ReLU: max(x, 0)."""
    return jax.nn.relu(x)


@register("relu2")
def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU: max(x, 0)^2 (So et al., Primer, arXiv 2109.08668)."""
    return jnp.square(jax.nn.relu(x))


@register("silu")
def silu(x: jax.Array) -> jax.Array:
    """SiLU / Swish-1: x * sigmoid(x) (arXiv 1710.05941)."""
    return jax.nn.silu(x)


@register("selu")
def selu(x: jax.Array) -> jax.Array:
    """SELU: scale * (x if x > 0 else alpha * (e^x - 1)) (arXiv 1706.02515); wants LeCun-normal init."""
    return jax.nn.selu(x)


@register("mish")
def mish(x: jax.Array) -> jax.Array:
    """Mish: x * tanh(softplus(x)) (arXiv 1908.08681)."""
    return x * jnp.tanh(jax.nn.softplus(x))


@register("tanh")
def tanh(x: jax.Array) -> jax.Array:
    """tanh(x)."""
    return jnp.tanh(x)


@register("identity")
def identity(x: jax.Array) -> jax.Array:
    """Identity: x (a linear MLP; a baseline for probes)."""
    return x


register("swiglu", silu, gated=True,
         description="SwiGLU: the MLP computes silu(x W) * (x V) (Shazeer, arXiv 2002.05202).")
register("geglu", gelu, gated=True,
         description="GeGLU: the MLP computes gelu(x W) * (x V) (Shazeer, arXiv 2002.05202); "
                     "takes gelu's `approximate`.")


# --------------------------------------------------------------------------- learnable
# Parameters are float32 whatever the input dtype; each module computes in float32 and casts
# back, so a bf16 model keeps bf16 activations while the activation's own arithmetic (powers,
# divisions, exponentials) does not lose precision or overflow.


def _scalar(value: float) -> Callable[..., jax.Array]:
    return lambda _key, shape=(): jnp.full(shape, value, jnp.float32)


@register("swish_beta")
class SwishBeta(nn.Module):
    """Swish with learnable beta: x * sigmoid(beta * x), beta init 1 (arXiv 1710.05941)."""

    per_channel: bool = False  # one beta per feature (last axis) instead of one per layer
    beta_init: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],) if self.per_channel else ()
        beta = self.param("beta", _scalar(self.beta_init), shape)
        z = x.astype(jnp.float32)
        return (z * jax.nn.sigmoid(beta * z)).astype(x.dtype)


# Pade approximation of LeakyReLU(0.01), degrees (5, 4): `pau/cuda/python_imp/Pade.py`
# (docs/methods.md §6.1). F(0) = a0 = 0.0336 is the largest error against LeakyReLU on [-3, 3].
PAU_A_INIT = (0.0335583603, 0.505000375, 1.65343934, 2.01001052, 0.931901999, 0.152424124)
PAU_B_INIT = (3.30847488e-6, 3.98021568, 5.12471206e-7, 0.301830109)


@register("pau")
class PAU(nn.Module):
    """Safe Pade activation unit P(x)/Q(x), degrees (5, 4), LeakyReLU init (arXiv 1907.06732).

    Denominator `version` (docs/methods.md §0.1 item 3):
      "B"   1 + |sum_k b_k x^k|     the paper's safe PAU (default)
      "A"   1 + sum_k |b_k x^k|     `rational_activations` default
      "abs" 1 + sum_k |b_k| |x|^k   the original `pau` implementation
    "A" and "abs" are the same function (|b x^k| = |b| |x|^k); both names are accepted so a
    config can say which code base it follows. All three agree at init (b1, b3 ~ 1e-6).
    """

    version: Literal["B", "A", "abs"] = "B"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.param("a", lambda _key: jnp.asarray(PAU_A_INIT, jnp.float32))
        b = self.param("b", lambda _key: jnp.asarray(PAU_B_INIT, jnp.float32))
        z = x.astype(jnp.float32)  # Horner in float32: x^5 in bf16 loses the small terms
        p = a[-1]
        for coef in a[-2::-1]:
            p = p * z + coef
        if self.version == "B":
            s = b[-1]
            for coef in b[-2::-1]:
                s = s * z + coef
            q = 1.0 + jnp.abs(s * z)
        else:
            za, ba = jnp.abs(z), jnp.abs(b)
            s = ba[-1]
            for coef in ba[-2::-1]:
                s = s * za + coef
            q = 1.0 + s * za
        return (p / q).astype(x.dtype)


APA_LAMBDA_MIN = 1e-4  # the authors' clamp (kostas1515/AGLU); lambda -> 0 is the Gumbel CDF


def apa(z: jax.Array, lambda_: jax.Array, kappa: jax.Array) -> jax.Array:
    """APA(z) = (lambda * exp(-kappa z) + 1)^(-1/lambda), in a form that cannot overflow.

    lambda * exp(-kappa z) = exp(-(kappa z - log lambda)), so
    APA = exp(-(1/lambda) * log(1 + exp(-(kappa z - log lambda))))
        = exp(-(1/lambda) * softplus(-(kappa z - log lambda))).
    """
    lam = jnp.maximum(lambda_, APA_LAMBDA_MIN)
    return jnp.exp(-jax.nn.softplus(jnp.log(lam) - kappa * z) / lam)


class _APABase(nn.Module):
    """Shared parameters of APA and AGLU: scalars lambda_ and kappa."""

    # U(0, 1) as the authors, or lambda = kappa = 1 (APA = sigmoid, AGLU = SiLU). Not called
    # `init`: that would shadow Module.init.
    init_scheme: Literal["uniform", "sigmoid"] = "uniform"
    lambda_init: float | None = None  # a float overrides `init_scheme` for lambda
    kappa_init: float | None = None  # a float overrides `init_scheme` for kappa

    def _params(self) -> tuple[jax.Array, jax.Array]:
        def init(value: float | None) -> Callable[..., jax.Array]:
            if value is not None:
                return _scalar(value)
            if self.init_scheme == "sigmoid":
                return _scalar(1.0)
            return lambda key: jax.random.uniform(key, (), jnp.float32)

        return self.param("lambda_", init(self.lambda_init)), self.param("kappa", init(self.kappa_init))


@register("apa")
class APA(_APABase):
    """Adaptive parametric activation (lambda e^(-kappa z) + 1)^(-1/lambda) (arXiv 2407.08567)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lam, kappa = self._params()
        return apa(x.astype(jnp.float32), lam, kappa).astype(x.dtype)


@register("aglu")
class AGLU(_APABase):
    """AGLU: z * APA(z); lambda = kappa = 1 is SiLU (Alexandridis et al., arXiv 2407.08567)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lam, kappa = self._params()
        z = x.astype(jnp.float32)
        return (z * apa(z, lam, kappa)).astype(x.dtype)


@register("polynorm")
class PolyNorm(nn.Module):
    """PolyNorm: w0 N(x^3) + w1 N(x^2) + w2 N(x) + bias, N = RMS-normalise the last axis (arXiv 2411.03884)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("w", _scalar(1.0 / 3.0), (3,))
        bias = self.param("bias", _scalar(0.0))
        z = x.astype(jnp.float32)

        def norm(y: jax.Array) -> jax.Array:
            return y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)

        y = w[0] * norm(z**3) + w[1] * norm(z**2) + w[2] * norm(z) + bias
        return y.astype(x.dtype)


@register("polyrelu")
class PolyReLU(nn.Module):
    """PolyReLU: w0 relu(x) + w1 relu(x)^2 + w2 relu(x)^3 + bias, w init 1/3 (arXiv 2411.03884)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("w", _scalar(1.0 / 3.0), (3,))
        bias = self.param("bias", _scalar(0.0))
        r = jax.nn.relu(x.astype(jnp.float32))
        return (r * (w[0] + r * (w[1] + r * w[2])) + bias).astype(x.dtype)

