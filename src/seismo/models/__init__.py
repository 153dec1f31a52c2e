"""Model definitions: transformer, attention, norms, activations, MLPs.

    model = seismo.models.build(cfg.model)
    params = model.init(rng, tokens_BxT)
    logits_BxTxV, taps = model.apply(params, tokens_BxT, taps=False)
"""

from __future__ import annotations

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
           "stack_layers", "unstack_layers"]


def check_config(cfg: Config) -> None:
    """The model's registered names (activation, norm, attention) and the activation's
    arguments, checked before anything compiles. Raises seismo.config.ConfigError."""
    m = cfg.model
    for key, name, reg in [("model.activation", m.activation, activations.REGISTRY),
                           ("model.norm", m.norm, norms.NORMS), ("model.attention", m.attention, attention.ATTENTIONS)]:
        if name not in reg:
            raise ConfigError(f"{key}: {reg.unknown_message(name)}")
    try:
        activations.check_kwargs(m.activation, dict(m.activation_kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.activation_kwargs: {e}") from None
