"""The transformer MLP: dense (d -> f -> d) or gated GLU, around a registered activation.

    dense   y = act(x W_up) W_down                         GPT-2; Wortsman et al. 2023 use
                                                           GELU with f = 4d (arXiv 2309.14322)
    gated   y = (act(x W_gate) * (x W_up)) W_down          Shazeer 2020 (arXiv 2002.05202);
                                                           chosen by `model.mlp: gated` or by a
                                                           gated activation (swiglu, geglu)

The activation comes from `seismo.models.activations.make(model.activation,
**model.activation_kwargs)` as the submodule named 'activation', so learnable activation
parameters sit under 'activation' (parameter group 'activation').

Neuron thresholds (sparsity studies; Luo et al. 2024, "Sparsing Law", arXiv 2411.02335,
docs/methods.md §5.2): neuron i of the hidden layer contributes n_i = h_i W_down[i, :] to the
output, so ||n_i||_2 = |h_i| ||W_down[i, :]||_2. Given a threshold eps for this layer, the
neurons with ||n_i||_2 < eps (per token) are set to 0: the CETT construction, whose eps the
analysis finds by binary search. With no threshold nothing is computed for it.

Taps: 'mlp_pre' [B, T, F] the activation's input (the gate branch for a gated MLP),
'mlp_post' [B, T, F] the hidden activity h that W_down reads (after the gate product and any
neuron threshold), 'mlp_out' [B, T, D] the MLP output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seismo.config import ModelConfig
from seismo.models import activations
from seismo.models.linear import Dense
from seismo.models.taps import tap


def is_gated(cfg: ModelConfig) -> bool:
    """True when the MLP is a GLU: `model.mlp == 'gated'` or a gated activation."""
    return cfg.mlp == "gated" or activations.is_gated(cfg.activation)


def neuron_output_norms(h_BxTxF: jax.Array, w_down_FxD: jax.Array) -> jax.Array:
    """||n_i||_2 = |h_i| * ||W_down[i, :]||_2 per token, float32 [B, T, F]."""
    row_norms_F = jnp.linalg.norm(w_down_FxD.astype(jnp.float32), axis=-1)
    return jnp.abs(h_BxTxF.astype(jnp.float32)) * row_norms_F


class MLP(nn.Module):
    """x [B, T, D] -> [B, T, D]; `threshold` (a float32 scalar or None) zeroes weak neurons."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, threshold: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        D, F = x_BxTxD.shape[-1], cfg.resolved_d_ff
        dtype = jnp.dtype(cfg.dtype)
        act = activations.make(cfg.activation, **dict(cfg.activation_kwargs), name="activation")
        up = Dense(D, F, ("embed", "mlp"), cfg.init_std, cfg.use_bias, dtype, name="up")
        if is_gated(cfg):
            gate = Dense(D, F, ("embed", "mlp"), cfg.init_std, cfg.use_bias, dtype, name="gate")
            pre_BxTxF = gate(x_BxTxD)
            h_BxTxF = act(pre_BxTxF) * up(x_BxTxD)
        else:
            pre_BxTxF = up(x_BxTxD)
            h_BxTxF = act(pre_BxTxF)
        down = Dense(F, D, ("mlp", "embed"), cfg.init_std, cfg.use_bias, dtype, name="down")
        if threshold is not None:
            keep = neuron_output_norms(h_BxTxF, down.kernel) >= threshold
            h_BxTxF = jnp.where(keep, h_BxTxF, jnp.zeros_like(h_BxTxF))
        y_BxTxD = down(h_BxTxF)
        tap(self, "mlp_pre", pre_BxTxF)
        tap(self, "mlp_post", h_BxTxF)
        tap(self, "mlp_out", y_BxTxD)
        return y_BxTxD
