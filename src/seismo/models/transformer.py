"""The decoder-only transformer: embeddings -> blocks -> final norm -> head, used functionally.

    model = build(cfg.model)
    params = model.init(rng, tokens_BxT)                 # plain float32 arrays
    logits_BxTxV, taps = model.apply(params, tokens_BxT)  # taps == {} unless taps=True
    axes = model.param_axes()                             # logical axis names, no real init

The defaults follow Wortsman et al. 2023 (arXiv 2309.14322, docs/methods.md §1.1): pre-LN, no
biases, RoPE, GELU MLP of width 4d, untied head, embedding N(0, 1/d), kernels truncated normal
1/sqrt(fan_in). muParam (full) (docs/methods.md §1.5) sets the head init std to
sqrt(base_fan_in) / fan_in (base_fan_in = `model.mup_base_width`), the attention scale to 1/d_h
and the initial query kernel to zero; its per-layer LRs live in the optimizer.

Blocks are stacked with `nn.scan` (`model.scan_layers`, compile time flat in depth; every
block parameter gets a leading 'layers' axis), `model.scan_unroll` layers per iteration of the
scan ('auto': all of them below 6 layers, where a loop buys no compile time and costs a CPU
step 20% more; one from 6 on; the layout and the numbers are the same), and optionally rematerialised (`model.remat`:
'full' saves nothing, 'dots' saves matmul outputs). With `scan_layers: false` the blocks are
a Python loop over modules 'block_0', 'block_1', ...; `unstack_layers` / `stack_layers` convert
parameters between the two layouts, and both give the same numbers.

Taps: `apply(..., taps=True)` returns a flat dict of float32 arrays, the blocks' stacked over layers:
    embed        [B, T, D]        the residual stream entering block 0 (embeddings + positions)
    resid        [L, B, T, D]     residual stream after each block
    attn_logits  [L, B, H, T, S]  q.k * scale (attention.py); S = T, or T + 1 with attn_bias
    attn_probs   [L, B, H, T, S]  attention weights, masked entries 0
    attn_out     [L, B, T, D]     attention sublayer output
    mlp_pre      [L, B, T, F]     activation input
    mlp_post     [L, B, T, F]     hidden activity read by W_down
    mlp_out      [L, B, T, D]     MLP output
    logits       [B, T, V]        the output logits (as returned)
With taps=False nothing is recorded, and the function is the plain forward pass.

Parameter groups (`param_groups`; the names of `seismo.config.DECAY_GROUPS`) are decided by
exact module and leaf names:
    activation  anything under a module named 'activation' (learnable activations)
    attn_bias   the explicit attention bias k', v' (module 'attn_bias')
    norm        scales and biases of every norm, qk-norm included
    layerscale  LayerScale gammas
    embedding   token and learned-position tables ('embedding')
    bias        biases of dense layers and of the attention gates
    kernel      dense kernels (the output head and the attention gates included)
`param_count` follows Kaplan et al. 2020 (the convention of Wortsman et al. 2023): the
non-embedding count leaves out the token embedding, the learned position table and the head.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seismo.config import ModelConfig, resolve_scan_unroll
from seismo.models.attention import ATTENTION_OUT, Attention
from seismo.models.linear import Dense
from seismo.models.mlp import MLP
from seismo.models.norms import LAYERSCALE_MODULES, NORM_MODULES, make_norm, residual
from seismo.models.taps import COLLECTION, STATS, tap

TAP_NAMES = ("embed", "resid", "attn_logits", "attn_probs", "attn_out", "mlp_pre", "mlp_post", "mlp_out", "logits")
# What the backward pass keeps of a block's forward pass (`model.remat`); the rest is recomputed.
_REMAT_POLICIES = {
    "full": None,  # nothing: the whole block is recomputed
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls, not q.k / p.v
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),  # the attention kernel's output
}


def shard_batch(x: jax.Array) -> jax.Array:
    """Pin the batch axis of an activation to the (data, fsdp) mesh axes when a mesh is in
    context (the trainer traces its steps under its mesh). Without it, under FSDP the
    partitioner may gather the batch instead of the weights and multiply activation memory
    (seen in the TPU AOT check: fsdp=4 needed 6.6 GiB where data=4 needed 2.8). A no-op
    without a mesh (vmapped sweeps, notebooks, checkpoint analysis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


class Block(nn.Module):
    """One transformer block on the residual stream x [B, T, D]. Returns (x, None) so that
    the same module serves as the body of `nn.scan`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, threshold: jax.Array | None = None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        x_BxTxD = residual(cfg, "attn", x_BxTxD, Attention(cfg, name="attn"))
        mlp = MLP(cfg, name="mlp")
        x_BxTxD = residual(cfg, "mlp", x_BxTxD, lambda h: mlp(h, threshold))
        tap(self, "resid", x_BxTxD)
        return shard_batch(x_BxTxD), None


class Embed(nn.Module):
    """A [num, features] table named 'embedding', init N(0, std^2)."""

    num: int
    features: int
    std: float
    axes: tuple[str | None, str | None]

    def setup(self) -> None:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
        self.embedding = self.param("embedding", init, (self.num, self.features), jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)


class _TopTaps(nn.Module):
    """Records the model-level taps ('embed', 'logits') under the scope 'top'."""

    @nn.compact
    def __call__(self, name: str, value: jax.Array) -> None:
        tap(self, name, value)


class Transformer(nn.Module):
    """tokens [B, T] int -> logits [B, T, V] float32. `thresholds_L`: per-layer neuron
    thresholds (mlp.py) or None."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, thresholds_L: jax.Array | None = None,
                 hidden: bool = False) -> jax.Array:
        """`hidden`: return the final hidden states [B, T, D] (after the final norm) instead of
        the logits, for a loss that applies the head in chunks (`Model.head`)."""
        cfg = self.cfg
        D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
        dtype = jnp.dtype(cfg.dtype)
        embed_std = cfg.embed_init_std if cfg.embed_init_std is not None else D**-0.5
        embed = Embed(V, D, embed_std, ("vocab", "embed"), name="embed")
        x_BxTxD = embed(tokens_BxT)
        if cfg.positions == "learned":
            T = tokens_BxT.shape[1]
            if T > cfg.max_seq_len:  # a table lookup past its end would silently clamp
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({cfg.max_seq_len}), the size "
                                 "of the learned position table; raise model.max_seq_len")
            pos = Embed(cfg.max_seq_len, D, embed_std, (None, "embed"), name="pos_embed")
            x_BxTxD = x_BxTxD + pos(jnp.arange(T))[None]
        x_BxTxD = shard_batch(x_BxTxD.astype(dtype))
        record = _TopTaps(name="top")  # a scope of its own: 'embed' is also the table's module name
        record("embed", x_BxTxD)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            unroll = resolve_scan_unroll(L) if cfg.scan_unroll == "auto" else cfg.scan_unroll
            blocks = nn.scan(block, variable_axes={"params": 0, COLLECTION: 0, STATS: 0}, split_rngs={"params": True},
                             in_axes=0, length=L, unroll=min(unroll, L),
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxTxD, _ = blocks(cfg, name="blocks")(x_BxTxD, thresholds_L)
        else:
            for i in range(L):
                thr = None if thresholds_L is None else thresholds_L[i]
                x_BxTxD, _ = block(cfg, name=f"block_{i}")(x_BxTxD, thr)

        if cfg.norm_placement in ("pre", "hybrid"):
            x_BxTxD = make_norm(cfg, "final_norm")(x_BxTxD)
        if hidden:
            return x_BxTxD
        if cfg.tie_embeddings:
            logits_BxTxV = jnp.dot(x_BxTxD, embed.embedding.T.astype(dtype), preferred_element_type=jnp.float32)
        else:
            head_std = (cfg.mup_base_width**0.5 / D) if cfg.mup == "full" else cfg.init_std
            head = Dense(D, V, ("embed", "vocab"), head_std, cfg.use_bias, dtype, out_dtype=jnp.float32, name="head")
            logits_BxTxV = head(x_BxTxD)
        logits_BxTxV = shard_batch(logits_BxTxV)
        record("logits", logits_BxTxV)
        return logits_BxTxV


# --------------------------------------------------------------------------- the functional model


class Model:
    """A built model: `init`, `apply` and `param_axes` (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        # Jitted once per model: eager Flax init and apply dispatch op by op and recompile the
        # layer scan on every call; inside an outer jit these inner jits are simply inlined.
        self._init = jax.jit(self._init_impl)
        self._apply = jax.jit(self._apply_impl, static_argnames=("taps", "hidden"))

    def init(self, rng: jax.Array, tokens_BxT: jax.Array) -> dict[str, Any]:
        """Fresh parameters: a nested dict of float32 arrays (logical names stripped)."""
        return self._init(rng, jnp.asarray(tokens_BxT))

    def apply(
        self,
        params: dict[str, Any],
        tokens_BxT: jax.Array,
        *,
        taps: bool | str = False,
        neuron_threshold: jax.typing.ArrayLike | None = None,
        hidden: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits [B, T, V] float32, taps). `taps`: False, 'full' (or True: every tap whole)
        or 'stats' (per-layer statistics reduced inside each layer, taps.py). `neuron_threshold`:
        a scalar or one value per layer [L]; MLP neurons whose output norm |h_i| ||W_down[i]||
        falls below it are zeroed. `hidden`: return the final hidden states [B, T, D] in place of
        the logits (apply the head with `head`, e.g. in chunks)."""
        thr = None
        if neuron_threshold is not None:
            thr = jnp.broadcast_to(jnp.asarray(neuron_threshold, jnp.float32), (self.cfg.n_layers,))
        mode = {False: None, True: "full", None: None}.get(taps, taps)
        if mode not in (None, "full", "stats"):
            raise ValueError(f"taps must be False, True, 'full' or 'stats', got {taps!r}")
        return self._apply(params, tokens_BxT, thr, taps=mode, hidden=bool(hidden))

    def head(self, params: dict[str, Any], x_BxTxD: jax.Array) -> jax.Array:
        """The output head on final hidden states: logits [B, T, V] float32, computed as the
        model computes them (compute dtype, float32 accumulation)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if cfg.tie_embeddings:
            w = params["embed"]["embedding"].T
        else:
            w = params["head"]["kernel"]
        y = jnp.dot(x_BxTxD.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        if not cfg.tie_embeddings and cfg.use_bias:
            y = y + params["head"]["bias"]
        return y

    def _init_impl(self, rng: jax.Array, tokens_BxT: jax.Array) -> dict[str, Any]:
        return nn.meta.unbox(Transformer(self.cfg).init(rng, tokens_BxT)["params"])

    def _apply_impl(self, params: Any, tokens_BxT: jax.Array, thr: jax.Array | None, *, taps: str | None,
                    hidden: bool):
        module = Transformer(self.cfg)
        if taps is None:
            return module.apply({"params": params}, tokens_BxT, thr, hidden), {}
        collection = COLLECTION if taps == "full" else STATS
        out, state = module.apply({"params": params}, tokens_BxT, thr, hidden, mutable=[collection])
        return out, flatten_taps(state.get(collection, {}), self.cfg)

    def param_axes(self) -> dict[str, Any]:
        """Logical axis names of every parameter: a tree shaped like the params whose leaves
        are tuples with one name (or None) per array dimension. Shapes only: nothing is
        initialised."""
        tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        boxed = jax.eval_shape(Transformer(self.cfg).init, jax.random.PRNGKey(0), tokens)["params"]

        def names(path: tuple[Any, ...], leaf: Any) -> tuple[str | None, ...]:
            if isinstance(leaf, nn.meta.AxisMetadata):
                return tuple(leaf.names)
            # unannotated parameters (learnable activations): replicated, except the layer axis
            stacked = self.cfg.scan_layers and getattr(path[0], "key", None) == "blocks"
            return (("layers",) if stacked else ()) + (None,) * (leaf.ndim - int(stacked))

        return jax.tree_util.tree_map_with_path(
            names, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

    def __repr__(self) -> str:
        c = self.cfg
        return f"Model(d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, attention={c.attention!r})"


def build(cfg: ModelConfig) -> Model:
    """The model of a `ModelConfig`."""
    return Model(cfg)


def flatten_taps(tree: dict[str, Any], cfg: ModelConfig) -> dict[str, jax.Array]:
    """{name: array} from the 'taps' collection: the model's own taps ('embed', 'logits') as
    they are, the blocks' taps stacked over layers [L, ...] (scanned or unrolled)."""

    def leaves(sub: Any) -> dict[str, jax.Array]:
        return {str(path[-1].key): v for path, v in jax.tree_util.tree_leaves_with_path(sub)}

    out = leaves(tree.get("top", {}))
    if cfg.scan_layers:
        return {**out, **leaves(tree.get("blocks", {}))}
    per_layer = [leaves(tree[f"block_{i}"]) for i in range(cfg.n_layers)]
    return {**out, **{name: jnp.stack([layer[name] for layer in per_layer]) for name in per_layer[0]}}


def unstack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned layout ('blocks' with a leading layer axis) -> unrolled ('block_0', ...)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(n_layers):
        out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def stack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Unrolled layout ('block_0', ...) -> scanned ('blocks' with a leading layer axis)."""
    blocks = [params[f"block_{i}"] for i in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


# --------------------------------------------------------------------------- groups and counts

EMBEDDING_MODULES = frozenset({"embed", "pos_embed", "head"})


def _keys(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def group_of(path: tuple[Any, ...]) -> str:
    """The parameter group of the leaf at `path` (a tree_util key path)."""
    keys = _keys(path)
    modules, leaf = set(keys[:-1]), keys[-1]
    if "activation" in modules:
        return "activation"
    if "attn_bias" in modules:
        return "attn_bias"
    if modules & NORM_MODULES:
        return "norm"
    if modules & LAYERSCALE_MODULES:
        return "layerscale"
    if leaf in ("embedding", "kernel", "bias"):
        return leaf
    raise ValueError(f"parameter {'/'.join(keys)} belongs to no parameter group; "
                     "give it a module or leaf name that group_of knows (seismo.models.transformer)")


def param_groups(params: Any) -> Any:
    """A tree shaped like `params` whose leaves are group names (module docstring).
    Works on arrays, ShapeDtypeStructs or anything with the params' structure."""
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path), params)


def param_count(params_or_cfg: Any, non_embedding: bool = False) -> int:
    """Number of parameters of a params tree or of a `ModelConfig` (computed from shapes,
    nothing initialised). `non_embedding` leaves out embeddings and the head."""
    if hasattr(params_or_cfg, "d_model"):
        tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        params_or_cfg = jax.eval_shape(build(params_or_cfg).init, jax.random.PRNGKey(0), tokens)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_or_cfg):
        if non_embedding and _keys(path)[0] in EMBEDDING_MODULES:
            continue
        total += math.prod(leaf.shape)
    return total
