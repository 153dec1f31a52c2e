"""Per-checkpoint statistics of one parameter set on one batch, as tidy tables.

`stats_fn(model, groups, top_k, sink_eps)` is the single compiled function that
`seismo analyze` calls for every checkpoint (params are an argument, so it compiles once per
model and batch shape): one forward pass with taps, and every statistic of the chosen groups
computed on the taps inside the same jit, so full activations never leave the device. Only
the CETT-PPL search (Sparsing Law Algorithm 1) loops on the host, around a second compiled
function, the eval loss with per-layer neuron thresholds. `frames` turns the small fetched
results into one tidy DataFrame per group: one row per (layer, head, metric) with the columns
of `columns(group)`. Definitions, formulas and sources: docs/analysis.md.

Sources (docs/methods.md sections): massive activations, Sun et al. 2024, arXiv 2402.17762 (3)
and Gallego-Feliciano et al. 2025, arXiv 2508.03616 (4); CETT-PPL-p%, Luo et al. 2024,
arXiv 2411.02335 (5.2); zero fraction, Li et al. 2022, arXiv 2210.06313 (5.1); dead neurons,
Voita et al. 2023, arXiv 2309.04827 (7.7); kurtosis and infinity norms, Bondarenko et al.
2023, arXiv 2306.12929 (7.3); attention entropy, Zhai et al. 2023, arXiv 2303.06296 (7.2);
sink scores, Gu et al. 2024, arXiv 2410.10781 (7.5); condition number, Ludwig 2025, arXiv
2506.16289 (7.1); rank collapse, Dong et al. 2021, arXiv 2103.03404 (7.6).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from seismo.config import ConfigError
from seismo.instrument import sparsity, stats, weights
from seismo.instrument.probes import activation_params, path_name
from seismo.models.loss import lm_loss
from seismo.models.transformer import group_of
from seismo.registry import Registry

BASE_COLUMNS = ("step", "layer", "head", "metric", "value")
INT_COLUMNS = frozenset({"step", "layer", "head", "rank", "batch", "position", "dim", "index"})
STR_COLUMNS = frozenset({"metric", "param"})
_OUTLIER_TAPS = ("resid", "attn_out", "mlp_out")
_WEIGHT_GROUPS = ("kernel", "embedding")  # parameter groups that are linear maps or tables
_BLOCK = re.compile(r"^block_(\d+)/")


@dataclass(frozen=True)
class Context:
    """What a group's statistics see inside the compiled function."""

    params: Any
    taps: Mapping[str, jax.Array]  # empty when no chosen group needs taps
    layered: Mapping[str, bool]  # parameter path -> stacked over layers
    top_k: int
    sink_eps: float


@dataclass(frozen=True)
class TableGroup:
    """One table of the checkpoint analysis: what it holds (`description`, also the text of
    `seismo analyze --help`), its columns beyond BASE_COLUMNS, whether it needs the forward
    pass's taps, `compute(ctx) -> {name: array}` inside the compiled function, and
    `rows(rows, result, layered)` on the host, turning the fetched result into table rows."""

    name: str
    description: str
    compute: Callable[[Context], dict[str, Any]]
    rows: Callable[[_Rows, Mapping[str, Any], Mapping[str, bool]], None]
    extra_columns: tuple[str, ...] = ()
    needs_taps: bool = True


GROUPS: Registry[TableGroup] = Registry("analysis")  # in table order (registration order)


def register_group(group: TableGroup) -> TableGroup:
    return GROUPS.register(group.name, group)


def columns(group: str) -> tuple[str, ...]:
    """The columns of a group's table: step, layer, head, metric, value, then its extras."""
    return BASE_COLUMNS + GROUPS.get(group).extra_columns


def check_groups(probes: Iterable[str] | str | None) -> tuple[str, ...]:
    """The chosen groups in table order; None (or empty) means all. Unknown names raise."""
    order = GROUPS.ordered()
    if probes is None:
        return order
    names = [probes] if isinstance(probes, str) else list(probes)
    if not names:
        return order
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ConfigError(f"unknown analysis {', '.join(map(repr, unknown))}; valid analyses: "
                          f"{', '.join(order)}")
    return tuple(g for g in order if g in names)


# --------------------------------------------------------------------------- the compiled function


def _per_head(fn: Callable[[jax.Array], jax.Array], x_LxBxHxTxS: jax.Array) -> jax.Array:
    """fn over [B, 1, T, S] slices of each layer and head -> [L, H]."""
    one_head = lambda z_BxTxS: fn(z_BxTxS[:, None])
    return jax.vmap(jax.vmap(one_head, in_axes=1))(x_LxBxHxTxS)


def _attention(taps: Mapping[str, jax.Array], sink_eps: float) -> dict[str, jax.Array]:
    probs = taps["attn_probs"]
    t, s = probs.shape[-2], probs.shape[-1]
    offset = s - t  # 1 with the explicit attention bias: key slot 0 is k', slot 1 the first token
    ent = stats.attention_entropy_per_layer(probs)
    sinks = stats.sink_fraction(probs, eps=sink_eps, position=offset, offset=offset)
    out = {
        "entropy": ent["per_head"], "entropy_layer": ent["mean"],
        "row_mass": stats.attention_row_mass_per_layer(probs)["per_head"],
        "logit_max": _per_head(lambda z: stats.max_attention_logit(z, offset=offset)["max_abs"],
                               taps["attn_logits"]),
        "sink_score": sinks["alpha"], "is_sink": sinks["is_sink"],
        "sink_fraction_layer": sinks["fraction_per_layer"], "sink_fraction": sinks["fraction"],
    }
    scores_LxHxS = jax.vmap(lambda p: stats.sink_scores(p, offset=offset))(probs)
    if offset > 0:
        out["bias_slot_score"] = scores_LxHxS[..., 0]
    # Secondary sinks: token positions 1 <= k < ceil(T/2), keys seen by at least half the
    # queries (a late key's score averages over few queries and is mostly self-attention).
    hi = (t + 1) // 2
    if hi > 1:
        cand = scores_LxHxS[..., offset + 1: offset + hi]
        out["secondary_sink_score"] = jnp.max(cand, axis=-1)
        out["secondary_sink_position"] = jnp.argmax(cand, axis=-1) + 1
    return out


def _weights(params: Any, layered: Mapping[str, bool]) -> dict[str, dict[str, jax.Array]]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if group_of(path) not in _WEIGHT_GROUPS:
            continue
        name = path_name(path)
        w = jnp.asarray(leaf, jnp.float32)
        lead = 1 if layered[name] else 0
        if w.ndim - lead < 2:
            continue
        w = w.reshape(*w.shape[:lead], w.shape[lead], -1)  # fan_in first, the rest flattened
        s = weights.singular_values(w)
        half = max(1, s.shape[-1] // 2)
        out[name] = {
            "condition_number": weights.condition_number(w),
            "condition_number_top_half": weights.condition_number(w, top_r=half),
            "effective_rank": weights.effective_rank(w),
            "sigma_max": s[..., 0], "sigma_min": s[..., -1],
        }
    return out


def make_stats_fn(model: Any, groups: Iterable[str], top_k: int = 5,
                  sink_eps: float = stats.SINK_EPS) -> Callable[[Any, jax.Array], dict[str, Any]]:
    """The (un-jitted) statistics function `fn(params, inputs_BxT) -> {group: {name: array}}`.

    With 'sparsity' it also returns '_acts' (the MLP post-activations [L, N, F]) for the host
    CETT search: a device array that the caller must not fetch.
    """
    groups = tuple(groups)
    axes = flat_axes(model)
    layered = {k: bool(a) and a[0] == "layers" for k, a in axes.items()}

    chosen = [GROUPS.get(g) for g in groups]

    def fn(params: Any, inputs_BxT: jax.Array) -> dict[str, Any]:
        taps: Mapping[str, jax.Array] = {}
        if any(g.needs_taps for g in chosen):
            _, taps = model.apply(params, inputs_BxT, taps=True)
        ctx = Context(params=params, taps=taps, layered=layered, top_k=top_k, sink_eps=sink_eps)
        out: dict[str, Any] = {g.name: g.compute(ctx) for g in chosen}
        if "sparsity" in out:  # the CETT search runs on the host around these, on the device
            out["_acts"] = out["sparsity"].pop("_acts")
        return out

    return fn


_CACHE: dict[tuple, Callable] = {}


def _model_key(model: Any) -> str:
    return repr(getattr(model, "cfg", model))


def stats_fn(model: Any, groups: Iterable[str], top_k: int = 5, sink_eps: float = stats.SINK_EPS) -> Callable:
    """`make_stats_fn` jitted, cached per (model config, groups, top_k, sink_eps): every
    checkpoint of a run (and every `probe` call with the same shapes) reuses one compilation."""
    key = ("stats", _model_key(model), tuple(groups), int(top_k), float(sink_eps))
    if key not in _CACHE:
        _CACHE[key] = jax.jit(make_stats_fn(model, groups, top_k, sink_eps))
    return _CACHE[key]


def loss_fn(model: Any) -> Callable:
    """Jitted `loss(params, inputs, targets, mask, thresholds_L) -> mean CE` with the MLP
    neurons below the per-layer CETT thresholds zeroed (thresholds 0: the dense loss)."""
    key = ("loss", _model_key(model))
    if key not in _CACHE:
        def loss(params, inputs_BxT, targets_BxT, mask_BxT, thresholds_L):
            logits, _ = model.apply(params, inputs_BxT, neuron_threshold=thresholds_L)
            return lm_loss(logits, targets_BxT, mask=mask_BxT)[0]

        _CACHE[key] = jax.jit(loss)
    return _CACHE[key]


def flat_axes(model: Any) -> dict[str, tuple]:
    """{param path: logical axis names} of the model (shapes only, cached)."""
    key = ("axes", _model_key(model))
    if key not in _CACHE:
        is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
        leaves = jax.tree_util.tree_leaves_with_path(model.param_axes(), is_leaf=is_axes)
        _CACHE[key] = {path_name(p): a for p, a in leaves}
    return _CACHE[key]


def down_kernels(params: Any, n_layers: int) -> jax.Array:
    """The MLP down-projection kernels stacked by layer, [L, F, D] (scanned or unrolled)."""
    if "blocks" in params:
        return params["blocks"]["mlp"]["down"]["kernel"]
    return jnp.stack([params[f"block_{i}"]["mlp"]["down"]["kernel"] for i in range(n_layers)])


@jax.jit
def _cett_dead_fraction(acts_LxNxF: jax.Array, w_outs_LxFxD: jax.Array, eps_L: jax.Array) -> jax.Array:
    """Fraction of neurons whose output norm never exceeds the layer's CETT threshold."""
    def one(acts, w, eps):
        norms = sparsity.neuron_output_norms(acts, w)
        return sparsity.dead_fraction(sparsity.ever_active_update(sparsity.ever_active_init(acts.shape[-1]), norms, eps))

    return jax.vmap(one)(acts_LxNxF, w_outs_LxFxD, eps_L)


def cett_stats(model: Any, params: Any, batch: Mapping[str, Any], acts_LxNxF: jax.Array,
               p: float = 0.01) -> dict[str, Any]:
    """CETT-PPL-p% on `batch` (Sparsing Law Algorithm 1, `sparsity.cett_ppl_search`): a host
    bisection over the shared CETT target, each step one call of the compiled `loss_fn`
    (about 12 calls at the default tolerance 1e-3) at thresholds looked up in the layers' CETT
    curves, computed once from `acts`. Returns per-layer arrays and scalars."""
    loss = loss_fn(model)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    w_outs = down_kernels(params, model.cfg.n_layers)
    search = sparsity.cett_ppl_search(
        lambda thr: loss(params, inputs, targets, mask, jnp.asarray(thr, jnp.float32)), acts_LxNxF, w_outs, p=p)
    dead = _cett_dead_fraction(acts_LxNxF, w_outs, jnp.asarray(search.thresholds, jnp.float32))
    return {"cett_threshold": search.thresholds, "cett_activation_ratio": search.activation_ratio,
            "cett_dead_fraction": np.asarray(dead), "cett_target": search.target_cett,
            "cett_ppl_ratio": search.ppl_ratio, "cett_loss_dense": search.loss_dense,
            "cett_loss_sparse": search.loss_sparse, "cett_n_evals": search.n_evals}


# --------------------------------------------------------------------------- tidy tables


class _Rows:
    """Column lists of one table, filled row by row."""

    def __init__(self, group: str):
        self.cols = columns(group)[1:]  # no step: the caller adds it
        self.data: dict[str, list] = {c: [] for c in self.cols}

    def add(self, metric: str, value: Any, **extra: Any) -> None:
        extra.update(metric=metric, value=float(value))
        for c in self.cols:
            self.data[c].append(extra.get(c))

    def per_layer(self, metric: str, values_L: Any, **extra: Any) -> None:
        for layer, v in enumerate(np.asarray(values_L).reshape(-1)):
            self.add(metric, v, layer=layer, **extra)

    def per_head(self, metric: str, values_LxH: Any, **extra: Any) -> None:
        for (layer, head), v in np.ndenumerate(np.asarray(values_LxH)):
            self.add(metric, v, layer=layer, head=head, **extra)

    def frame(self) -> pd.DataFrame:
        """The table, its columns typed as `typed` types them, built from typed columns at once
        (per checkpoint and table: converting the columns of a built frame cost more than
        computing them)."""
        return pd.DataFrame({c: _column(c, self.data[c]) for c in self.cols}, columns=list(self.cols))


def _int_array(values: list) -> pd.api.extensions.ExtensionArray:
    """Python ints and None -> a nullable Int64 array (None: an empty cell)."""
    n = len(values)
    mask = np.fromiter((v is None for v in values), bool, n)
    data = np.fromiter((0 if v is None else v for v in values), np.int64, n)
    return pd.arrays.IntegerArray(data, mask)


def _column(name: str, values: list) -> Any:
    if name in INT_COLUMNS:
        return _int_array(values)
    if name == "value":
        return np.asarray(values, np.float64)
    if name in STR_COLUMNS:
        return pd.Series(values, dtype=object)  # not pandas' inferred string dtype: as `typed` gives
    return values


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Nullable integers for index-like columns (empty cells where a column does not apply),
    float64 values, strings for names. Columns already of their type are left as they are."""
    for c in df.columns:
        if c in INT_COLUMNS:
            if df[c].dtype != "Int64":
                df[c] = pd.array(df[c], dtype="Int64") if len(df) else df[c].astype("Int64")
        elif c == "value":
            if df[c].dtype != np.float64:
                df[c] = df[c].astype("float64")
        elif c in STR_COLUMNS:
            if df[c].dtype != object:
                df[c] = df[c].astype(object)
    return df


def _param_layer(name: str) -> tuple[str, int | None]:
    """'block_3/mlp/up/kernel' -> ('blocks/mlp/up/kernel', 3): unrolled names read like scanned ones."""
    m = _BLOCK.match(name)
    return (f"blocks/{name[m.end():]}", int(m.group(1))) if m else (name, None)


def frames(host: Mapping[str, Any], groups: Iterable[str], model: Any,
           cett: Mapping[str, Any] | None = None) -> dict[str, pd.DataFrame]:
    """One tidy DataFrame per group (columns `columns(group)` without 'step') from the fetched
    output of the stats function (and of `cett_stats` for 'sparsity')."""
    out = {}
    layered = {k: bool(a) and a[0] == "layers" for k, a in flat_axes(model).items()}
    for group in groups:
        rows, r = _Rows(group), dict(host.get(group, {}))
        if group == "sparsity" and cett is not None:
            r.update(cett)
        GROUPS.get(group).rows(rows, r, layered)
        out[group] = rows.frame()
    return out


# --------------------------------------------------------------------------- the groups


def _massive(ctx: Context) -> dict[str, Any]:
    return stats.massive_activations_per_layer(ctx.taps["resid"], k=ctx.top_k)


def _massive_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    for m in ("max_abs", "median_abs", "ratio", "ratio_seq_mean"):
        rows.per_layer(m, r[m])
    rows.per_layer("strict_any", np.any(r["top_strict"], axis=-1))
    for (layer, rank), v in np.ndenumerate(r["top_value"]):
        where = dict(layer=layer, rank=rank, batch=int(r["top_batch"][layer, rank]),
                     position=int(r["top_position"][layer, rank]), dim=int(r["top_dim"][layer, rank]))
        rows.add("top_value", v, **where)
        rows.add("top_ratio", r["top_ratio"][layer, rank], **where)
        rows.add("top_strict", r["top_strict"][layer, rank], **where)


def _sparsity(ctx: Context) -> dict[str, Any]:
    m = ctx.taps["mlp_post"]
    acts_LxNxF = m.reshape(m.shape[0], -1, m.shape[-1])
    ever = sparsity.ever_active_update(sparsity.ever_active_init((m.shape[0], m.shape[-1])), acts_LxNxF)
    return {"zero_fraction": stats.zero_fraction(acts_LxNxF, axis=(1, 2)),
            "dead_fraction": sparsity.dead_fraction(ever), "eval_tokens": ever.n_tokens, "_acts": acts_LxNxF}


def _sparsity_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    rows.per_layer("zero_fraction", r["zero_fraction"])
    rows.per_layer("dead_fraction", r["dead_fraction"])
    rows.add("eval_tokens", r["eval_tokens"])
    if "cett_threshold" in r:  # the host search's results (cett_stats)
        for m in ("cett_threshold", "cett_activation_ratio", "cett_dead_fraction"):
            rows.per_layer(m, r[m])
        for m in ("cett_target", "cett_ppl_ratio", "cett_loss_dense", "cett_loss_sparse", "cett_n_evals"):
            rows.add(m, r[m])


def _outliers(ctx: Context) -> dict[str, Any]:
    o = {}
    for name in _OUTLIER_TAPS:
        x = ctx.taps[name]
        x_LxNxD = x.reshape(x.shape[0], -1, x.shape[-1])
        k = jax.vmap(stats.kurtosis_stats)(x_LxNxD)
        o[f"{name}_kurtosis_mean"], o[f"{name}_kurtosis_max"] = k["mean"], k["max"]
        o[f"{name}_inf_norm"] = jax.vmap(stats.inf_norm)(x_LxNxD)
    return o


def _per_layer_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    for m, v in r.items():
        rows.per_layer(m, v)


def _attention_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    for m in ("entropy", "row_mass", "logit_max", "sink_score", "is_sink", "bias_slot_score"):
        if m in r:
            rows.per_head(m, r[m])
    if "secondary_sink_score" in r:
        for (layer, head), v in np.ndenumerate(r["secondary_sink_score"]):
            rows.add("secondary_sink_score", v, layer=layer, head=head,
                     position=int(r["secondary_sink_position"][layer, head]))
    rows.per_layer("entropy", r["entropy_layer"])
    rows.per_layer("sink_fraction", r["sink_fraction_layer"])
    rows.add("sink_fraction", r["sink_fraction"])


def _rank(ctx: Context) -> dict[str, Any]:
    h = ctx.taps["resid"]
    return {"rank_collapse_residual": stats.rank_collapse_residual_per_layer(h),
            "effective_rank": jnp.mean(weights.effective_rank(h), axis=1)}


def _weights_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    for name, ms in r.items():
        param, layer = _param_layer(name)
        for m, v in ms.items():
            if layered.get(name):
                rows.per_layer(m, v, param=param)
            else:
                rows.add(m, v, layer=layer, param=param)


def _activation_rows(rows: _Rows, r: Mapping[str, Any], layered: Mapping[str, bool]) -> None:
    for name, v in r.items():
        param, layer = _param_layer(name)
        metric = name.rsplit("/", 1)[-1]
        v = np.asarray(v)
        per_layer = v.reshape(v.shape[0], -1) if layered.get(name) else v.reshape(1, -1)
        for i, row in enumerate(per_layer):
            for index, x in enumerate(row):
                rows.add(metric, x, layer=i if layered.get(name) else layer, index=index, param=param)


for _group in (
    TableGroup("massive", "massive activations of the residual stream per layer: max|h|, median|h|, ratios, "
               "top-k, strict flag", _massive, _massive_rows, ("rank", "batch", "position", "dim")),
    TableGroup("sparsity", "MLP zero fraction, dead neurons, CETT-PPL-p% activation ratio per layer",
               _sparsity, _sparsity_rows),
    TableGroup("outliers", "kurtosis (mean, max over tokens) and infinity norm of block, attention and MLP outputs",
               _outliers, _per_layer_rows),
    TableGroup("attention", "attention entropy, row mass, max logit, sink scores and sink heads per layer and head",
               lambda ctx: _attention(ctx.taps, ctx.sink_eps), _attention_rows, ("position",)),
    TableGroup("weights", "condition number, effective rank and extreme singular values of every 2-D weight",
               lambda ctx: _weights(ctx.params, ctx.layered), _weights_rows, ("param",), needs_taps=False),
    TableGroup("rank", "rank-collapse residual and effective rank of the residual stream per layer",
               _rank, _per_layer_rows),
    TableGroup("activation", "learnable activation parameters (leaves under 'activation')",
               lambda ctx: activation_params(ctx.params), _activation_rows, ("param", "index"), needs_taps=False),
):
    register_group(_group)
