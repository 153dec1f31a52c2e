"""In-step probes: the cheap statistics computed inside the instrumented train step.

The instrumented step is the plain step with taps on and this probe function applied
inside the same jit, so full activations never leave the device; it is compiled beside the
plain step and called every `run.probe_every` steps (the plain step pays nothing). What it
returns becomes one `probe` row of metrics.jsonl (per-layer values are lists by layer):

- per layer, reduced inside each layer so that no activation or attention map outlives it
  (seismo.models.taps; any attention implementation): `resid_rms`, `resid_max` (residual
  stream after the block); `attn_logit_max` (max |q.k|/sqrt(d_h) over causal pairs, batch
  and heads: Wortsman et al. 2023, arXiv 2309.14322, section 3.1); `attn_logz_mean`,
  `attn_logz_max` (log-sum-exp of each attention row's scores, the softmax log Z);
  `attn_entropy` (Zhai et al. 2023, arXiv 2303.06296);
  `attn_sink_mass` (attention to the first token, averaged over queries and heads; Sun et
  al. 2024, arXiv 2402.17762); `attn_row_mass` (1 for softmax; sigmoid attention,
  Ramapuram et al. 2024, arXiv 2409.04431); `mlp_rms`, `mlp_zero_frac` (post-activation);
- head: `logz_mean`, `logz_max`, `logit_mean` (output-logit divergence, Wortsman 3.2);
- per parameter tensor (per layer for scanned blocks): `grad_rms/<path>`, `param_rms/<path>`,
  `update_rms/<path>` of the unscaled AdamW update v/(sqrt(u)+eps) (Wortsman 3.4);
- learnable activation parameters: `act/<path>` (PAU coefficients, APA lambda and kappa,
  swish beta, PolyNorm weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from seismo.config import Config
from seismo.instrument import stats
from seismo.instrument.trend import LogitTrend
from seismo.models.attention import key_slots


def path_name(path: tuple) -> str:
    """'blocks/mlp/fc1/kernel' from a jax key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def _layered(axes: Any) -> bool:
    return isinstance(axes, tuple) and len(axes) > 0 and axes[0] == "layers"


def tensor_rms(tree: Any, axes_tree: Any) -> dict[str, jax.Array]:
    """RMS of every leaf; leaves stacked over layers (first logical axis 'layers') get one
    value per layer."""
    out = {}
    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))
    flat_axes = dict((path_name(p), a) for p, a in jax.tree_util.tree_leaves_with_path(axes_tree, is_leaf=is_axes))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = path_name(path)
        x = leaf.astype(jnp.float32)
        if _layered(flat_axes.get(name)) and x.ndim > 1:
            out[name] = jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim))))
        else:
            out[name] = jnp.sqrt(jnp.mean(jnp.square(x)))
    return out


def activation_params(params: Any) -> dict[str, jax.Array]:
    """Every leaf under a module named 'activation' (learnable activations), by path."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        if "activation" in name.split("/"):
            out[name] = leaf.astype(jnp.float32)
    return out


# The per-layer statistics the model reduces inside each layer (`Model.apply(taps="stats")`).
LAYER_STATS = ("resid_rms", "resid_max", "attn_logit_max", "attn_logz_mean", "attn_logz_max", "attn_entropy",
               "attn_row_mass", "attn_sink_mass", "mlp_rms", "mlp_zero_frac")


def layer_stats(taps: dict[str, jax.Array], offset: int) -> dict[str, jax.Array]:
    """Per-layer statistics [L]: as the model reduced them inside each layer (statistics
    taps), or computed here from whole stacked taps (full taps, leading axis: layer)."""
    if "resid_rms" in taps:
        return {k: taps[k] for k in LAYER_STATS if k in taps}
    out: dict[str, jax.Array] = {}
    if "resid" in taps:
        r = taps["resid"]
        red = tuple(range(1, r.ndim))  # everything but the layer axis
        out["resid_rms"] = stats.rms(r, axis=red)
        out["resid_max"] = stats.max_abs(r, axis=red)
    if "attn_logits" in taps:
        out["attn_logit_max"] = stats.max_attention_logit_per_layer(taps["attn_logits"], offset=offset)["max_abs"]
    if "attn_probs" in taps:
        p = taps["attn_probs"]
        out["attn_entropy"] = stats.attention_entropy_per_layer(p)["mean"]
        out["attn_row_mass"] = stats.attention_row_mass_per_layer(p)["mean"]
        out["attn_sink_mass"] = jnp.mean(
            jax.vmap(lambda q: stats.sink_mass(q, position=offset, offset=offset))(p), axis=-1)
    if "mlp_post" in taps:
        m = taps["mlp_post"]
        red = tuple(range(1, m.ndim))
        out["mlp_rms"] = stats.rms(m, axis=red)
        out["mlp_zero_frac"] = stats.zero_fraction(m, axis=red).astype(jnp.float32)
    return out


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the train step hands a probe, inside jit: the taps of the forward pass, the
    params before and after the update, the gradients, the new optimizer state, the loss
    statistics and the unscaled Adam direction of this update (seismo.train.optimizer)."""

    taps: dict[str, jax.Array]
    params: Any
    grads: Any
    new_params: Any
    new_opt_state: Any
    loss_stats: dict[str, jax.Array]
    update: Any


class RunLog(Protocol):
    """The host side of one run, as a probe sees it."""

    def write(self, row: Mapping[str, Any]) -> None: ...

    def warn(self, step: int, message: str, **fields: Any) -> None:
        """A `warning` row with `message` (and any `fields`), and one plain line for people."""


@runtime_checkable
class StepProbe(Protocol):
    """A probe may set `taps = "full"` to receive whole activations and attention maps in
    `info.taps` (the explicit attention path, memory quadratic in T); the default, "stats",
    gives the per-layer statistics of `LAYER_STATS` reduced inside each layer.

    The two halves of an in-step probe (the shape of Levanter's JitCallback):
    `inside_step(info)` runs inside the jitted step and returns a flat dict of arrays;
    `on_step(step, summary, log)` runs on the host with that dict fetched (numpy), one step
    late, and records what it wants in the run's log. The trainer makes one probe per run
    (`ProbeFactory`), so host-side state is per run; a vmapped group traces point 0's
    `inside_step` once for all points. A probe with host-side state may also define
    `resume(rows)`: a resumed run calls it once with the rows it kept up to the restored
    step (dicts, as in metrics.jsonl), before its first step."""

    def inside_step(self, info: StepInfo) -> dict[str, jax.Array]: ...

    def on_step(self, step: int, summary: Mapping[str, Any], log: RunLog) -> None: ...


ProbeFactory = Callable[[Any, Config], StepProbe]  # (model, config) -> probe


class InstabilityProbes:
    """seismo's default probe: the statistics of the module docstring inside the step; on
    the host, a `probe` row, and a `warning` row when the layer-0 max attention logit trend
    predicts crossing run.logit_warning_threshold before the run ends, and another when it
    crosses (seismo.instrument.trend: at most one of each per run)."""

    taps = "stats"  # per-layer statistics reduced inside the layers: no maps leave a layer

    def __init__(self, model: Any, cfg: Config):
        self.axes = model.param_axes()
        self.offset = key_slots(cfg.model)
        self.trend = LogitTrend(cfg.run.steps, cfg.run.logit_warning_threshold)

    def inside_step(self, info: StepInfo) -> dict[str, jax.Array]:
        out = dict(layer_stats(info.taps, self.offset))
        for k in ("logz_mean", "logz_max", "logit_mean"):
            if k in info.loss_stats:
                out[k] = info.loss_stats[k]
        for prefix, tree in (("grad_rms", info.grads), ("param_rms", info.new_params), ("update_rms", info.update)):
            for name, v in tensor_rms(tree, self.axes).items():
                out[f"{prefix}/{name}"] = v
        for name, v in activation_params(info.new_params).items():
            out[f"act/{name}"] = v
        return out

    def resume(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """A resumed run: the logit trend continues from the kept probe and warning rows."""
        self.trend.restore(rows)

    def on_step(self, step: int, summary: Mapping[str, Any], log: RunLog) -> None:
        log.write({"step": step, "kind": "probe", **summary})
        logits = summary.get("attn_logit_max")
        if logits is not None:
            event = self.trend.update(step, float(np.asarray(logits).reshape(-1)[0]))
            if event is not None:
                log.warn(step, event.message, **event.fields())


def make_step_probes(model: Any, cfg: Config) -> InstabilityProbes:
    """The default probe of a run (a `ProbeFactory`)."""
    return InstabilityProbes(model, cfg)
