"""Model definitions: transformer, attention, norms, activations, MLPs.

    model = seismo.models.build(cfg.model)
    params = model.init(rng, tokens_BxT)
    logits_BxTxV, taps = model.apply(params, tokens_BxT, taps=False)
"""

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

__all__ = ["TAP_NAMES", "Model", "build", "lm_loss", "param_count", "param_groups", "stack_layers",
           "unstack_layers"]
