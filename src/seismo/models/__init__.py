"""Model definitions: transformer, attention, norms, activations, MLPs.

    model = seismo.models.build(cfg.model)
    params = model.init(rng, tokens_BxT)
    logits_BxTxV, taps = model.apply(params, tokens_BxT, taps=False)
"""

from __future__ import annotations

import dataclasses

from seismo.config import Config, ConfigError
from seismo.models import activations, attention, norms
from seismo.models.loss import lm_loss
from seismo.models.transformer import (
    TAP_NAMES,
    Model,
    build,
    param_count,
    param_groups,
    stack_layers,
    unstack_layers,
)

__all__ = ["TAP_NAMES", "Model", "build", "check_config", "lm_loss", "param_count", "param_groups",
           "resolve_attention", "stack_layers", "unstack_layers"]


def resolve_attention(cfg: Config, platform: str | None = None) -> Config:
    """`cfg` with `model.attention_impl: auto` replaced by the implementation it means on
    `platform` ('cpu', 'gpu', 'tpu'; default: JAX's default backend) at data.seq_len."""
    if cfg.model.attention_impl != "auto":
        return cfg
    impl = attention.resolve_impl(cfg.model, cfg.data.seq_len, platform)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))


def check_config(cfg: Config) -> None:
    """The model's registered names (activation, norm, attention), the activation's
    arguments and whether the chosen attention implementation covers the config, checked
    before anything compiles. Raises seismo.config.ConfigError."""
    m = cfg.model
    for key, name, reg in [("model.activation", m.activation, activations.REGISTRY),
                           ("model.norm", m.norm, norms.NORMS), ("model.attention", m.attention, attention.ATTENTIONS)]:
        if name not in reg:
            raise ConfigError(f"{key}: {reg.unknown_message(name)}")
    try:
        activations.check_kwargs(m.activation, dict(m.activation_kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.activation_kwargs: {e}") from None
    if m.attention_impl != "auto":
        reason = attention.impl_unsupported(m, m.attention_impl)
        if reason is not None:
            raise ConfigError(f"model.attention_impl: {m.attention_impl} cannot run model.attention={m.attention} "
                              f"here: {reason}; use auto, or explicit (every kind)")
