"""Instrumentation: statistics of activations, attention maps, FFN sparsity and weights.

The functions here are plain functions on arrays (numpy or jax), traceable by `jax.jit`, so
the same call works in a notebook on a saved activation and inside the jitted step on the
model's taps. Definitions and where each metric is logged: docs/metrics.md.

The tables over saved checkpoints are built from these functions by seismo.analysis.checkpoints
(`seismo.analysis.analyze_run`, docs/analysis.md); the in-step probes are in
seismo.instrument.probes.
"""

from seismo.instrument.dynamics_fit import (
    DynamicsFit,
    fit_massive_dynamics,
    massive_dynamics,
    peak_time,
)
from seismo.instrument.sparsing_law import SparsingLawFit, fit_sparsing_law
from seismo.instrument.sparsity import (
    CettSearch,
    EverActive,
    activation_ratio,
    cett,
    cett_ppl_search,
    cett_threshold,
    dead_fraction,
    ever_active_init,
    ever_active_update,
    neuron_output_norms,
)
from seismo.instrument.stats import (
    attention_entropy,
    attention_entropy_per_layer,
    attention_row_mass,
    attention_row_mass_per_layer,
    inf_norm,
    kurtosis,
    kurtosis_stats,
    massive_activations,
    massive_activations_per_layer,
    max_abs,
    max_attention_logit,
    max_attention_logit_per_layer,
    rank_collapse_residual,
    rank_collapse_residual_per_layer,
    rms,
    sink_fraction,
    sink_mass,
    sink_scores,
    visible_TxS,
    zero_fraction,
)
from seismo.instrument.weights import condition_number, effective_rank, singular_values

__all__ = [
    "CettSearch",
    "DynamicsFit",
    "SparsingLawFit",
    "EverActive",
    "activation_ratio",
    "attention_entropy",
    "attention_entropy_per_layer",
    "attention_row_mass",
    "attention_row_mass_per_layer",
    "cett",
    "cett_ppl_search",
    "cett_threshold",
    "condition_number",
    "dead_fraction",
    "effective_rank",
    "ever_active_init",
    "ever_active_update",
    "fit_massive_dynamics",
    "fit_sparsing_law",
    "inf_norm",
    "kurtosis",
    "kurtosis_stats",
    "massive_activations",
    "massive_activations_per_layer",
    "massive_dynamics",
    "max_abs",
    "max_attention_logit",
    "max_attention_logit_per_layer",
    "neuron_output_norms",
    "peak_time",
    "rank_collapse_residual",
    "rank_collapse_residual_per_layer",
    "rms",
    "singular_values",
    "sink_fraction",
    "sink_mass",
    "sink_scores",
    "visible_TxS",
    "zero_fraction",
]
