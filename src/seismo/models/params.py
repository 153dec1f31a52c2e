"""Parameter bookkeeping: groups (for weight decay and probes) and counts.

Groups (`seismo.config.DECAY_GROUPS`), decided by exact module and leaf names:
    activation  anything under a module named 'activation' (learnable activations)
    attn_bias   the explicit attention bias k', v' (module 'attn_bias')
    norm        scales and biases of every norm, qk-norm included
    layerscale  LayerScale gammas
    embedding   token and learned-position tables ('embedding')
    bias        biases of dense layers and of the attention gates
    kernel      dense kernels (the output head and the attention gates included)

Counts follow Kaplan et al. 2020 (the convention of Wortsman et al. 2023): the non-embedding
count leaves out the token embedding, the learned position table and the output head.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from seismo.models.norms import LAYERSCALE_MODULES, NORM_MODULES

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
                     "name it after a group in seismo.models.params")


def param_groups(params: Any) -> Any:
    """A tree shaped like `params` whose leaves are group names (module docstring).
    Works on arrays, ShapeDtypeStructs or anything with the params' structure."""
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path), params)


def param_count(params_or_cfg: Any, non_embedding: bool = False) -> int:
    """Number of parameters of a params tree or of a `ModelConfig` (computed from shapes,
    nothing initialised). `non_embedding` leaves out embeddings and the head."""
    if hasattr(params_or_cfg, "d_model"):
        from seismo.models.transformer import build

        model = build(params_or_cfg)
        tokens = jax.ShapeDtypeStruct((1, 1), "int32")
        params_or_cfg = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_or_cfg):
        if non_embedding and _keys(path)[0] in EMBEDDING_MODULES:
            continue
        total += math.prod(leaf.shape)
    return total
