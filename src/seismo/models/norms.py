"""Normalisation layers, their placement around a sublayer, and LayerScale.

Norms are registered by name in `NORMS` (config `model.norm`); each is a small Flax module
with a float32 `scale` (and a `bias` when `model.use_bias`), computing in float32 whatever
the input dtype and casting back, so bfloat16 activations keep their norm statistics exact
enough.

Placement (config `model.norm_placement`) of a sublayer f (attention or MLP) on the residual
stream x:

    pre      x + LS(f(N1(x)))                 GPT-2, Wortsman et al. 2023 (arXiv 2309.14322)
    post     N1(x + LS(f(x)))                 the original Transformer
    hybrid   x + LS(N2(f(N1(x))))             "hybrid norm", Ramapuram et al. 2024 (arXiv
                                              2409.04431, docs/methods.md §2.2): stabilises
                                              sigmoid attention's large initial outputs

LS is LayerScale (config `model.layerscale`): a learnable per-channel gamma, init
`model.layerscale_init` (1e-4 as in the sigmoid-attention simulator; Touvron et al. 2021,
arXiv 2103.17239), in parameter group 'layerscale'.

A new norm is one module plus one registry line:

    @NORMS.register("scalenorm")
    class ScaleNorm(nn.Module): ...
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seismo.config import ModelConfig
from seismo.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


def _ones_param(module: nn.Module, name: str, size: int, axis: str | None) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,))
    return module.param(name, init, (size,), jnp.float32)


def _zeros_param(module: nn.Module, name: str, size: int, axis: str | None) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,))
    return module.param(name, init, (size,), jnp.float32)


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale (+ bias), over the last axis (Ba et al. 2016).

    The variance is one pass, var = max(E[x^2] - E[x]^2, 0), in float32, computed in the
    order of flax.linen.LayerNorm's default (x^2 first, both means, then rsqrt(var + eps) *
    scale applied once). XLA:CPU fuses this order best: on proxy_256 (8 x 128 tokens) the
    forward and backward read and write 629 MB, as flax's own LayerNorm does, against 688 MB
    for the two-pass E[(x - E[x])^2] (XLA's cost analysis; benchmarks/RESULTS.md)."""

    eps: float = 1e-6
    use_bias: bool = False
    axis_name: str | None = "embed"  # logical axis of the normalised dimension

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        z = x.astype(jnp.float32)
        z2 = jax.lax.square(z)
        mean, mean2 = jnp.mean(z, axis=-1), jnp.mean(z2, axis=-1)
        var = jnp.maximum(0.0, mean2 - jax.lax.square(mean))
        mul = jax.lax.rsqrt(var[..., None] + self.eps) * _ones_param(self, "scale", x.shape[-1], self.axis_name)
        y = (z - mean[..., None]) * mul
        if self.use_bias:
            y = y + _zeros_param(self, "bias", x.shape[-1], self.axis_name)
        return y.astype(x.dtype)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale (+ bias), over the last axis (Zhang & Sennrich 2019,
    arXiv 1910.07467)."""

    eps: float = 1e-6
    use_bias: bool = False
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        z = x.astype(jnp.float32)
        y = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + self.eps)
        y = y * _ones_param(self, "scale", x.shape[-1], self.axis_name)
        if self.use_bias:
            y = y + _zeros_param(self, "bias", x.shape[-1], self.axis_name)
        return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, name: str, *, axis_name: str | None = "embed") -> nn.Module:
    """The norm `cfg.norm` (eps `cfg.norm_eps`, bias iff `cfg.use_bias`) as a module `name`."""
    return NORMS.get(cfg.norm)(eps=cfg.norm_eps, use_bias=cfg.use_bias, axis_name=axis_name, name=name)


class LayerScale(nn.Module):
    """x * gamma, gamma per channel, init `init` (float32 parameter named 'layerscale')."""

    init: float = 1e-4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.constant(self.init), ("embed",))
        gamma = self.param("layerscale", init, (x.shape[-1],), jnp.float32)
        return x * gamma.astype(x.dtype)


def residual(cfg: ModelConfig, prefix: str, x: jax.Array, sublayer: Any) -> jax.Array:
    """One sublayer on the residual stream, with the configured norm placement and LayerScale.

    Call it inside a compact method: the norms it makes (`{prefix}_norm`, `{prefix}_post_norm`
    for hybrid, LayerScale `{prefix}_scale`) become submodules of the calling module.
    `sublayer` maps the normed input (pre, hybrid) or x itself (post) to the branch output.
    """
    placement = cfg.norm_placement
    h = make_norm(cfg, f"{prefix}_norm")(x) if placement in ("pre", "hybrid") else x
    h = sublayer(h)
    if placement == "hybrid":
        h = make_norm(cfg, f"{prefix}_post_norm")(h)
    if cfg.layerscale:
        h = LayerScale(cfg.layerscale_init, name=f"{prefix}_scale")(h)
    y = x + h
    if placement == "post":
        y = make_norm(cfg, f"{prefix}_norm")(y)
    return y


# Module names whose parameters form the 'norm' group (seismo.models.param_groups).
NORM_MODULES = frozenset({"attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "final_norm",
                          "q_norm", "k_norm"})
LAYERSCALE_MODULES = frozenset({"attn_scale", "mlp_scale"})
