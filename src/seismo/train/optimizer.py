"""The AdamW recipe of Wortsman et al. 2023 as an optax chain.

Sources:
* Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
  instabilities", arXiv 2309.14322: the default recipe (section 2.1: AdamW b1 0.9, b2 0.95,
  eps 1e-8, global-norm clipping at 1, linear warmup then cosine decay to 1e-5, independent
  weight decay 1e-4), independent weight decay (section 3.2.2) and the role of eps and of the
  unscaled update's RMS (section 3.4). docs/methods.md §1.1, 1.4, 1.5, 1.8.
* Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv 1711.05101.
* Yang et al. 2022, "Tensor Programs V" (muP), arXiv 2203.03466; Wortsman et al.'s "muParam
  (simple)" is its per-layer LR scaling for Adam (docs/methods.md §1.5, 9.7).

The update rule. With Delta_t the unscaled Adam direction mhat/(sqrt(vhat) + eps), eta the
peak LR (`lr`), s_t = schedule(t) / eta the schedule multiplier, lambda the weight decay and
m_p the muParam LR multiplier of parameter p (1 when muParam is off):

    independent (default):  theta <- theta - s_t * (eta * m_p * Delta_t + lambda * theta)
    coupled (optax.adamw):  theta <- theta - s_t * eta * m_p * (Delta_t + lambda * theta)

The independent form is the corrected sign of the paper's text (docs/methods.md §0.1 item 2):
decay shrinks the weights and is not multiplied by the peak LR, so the decay strength does
not change when an LR sweep changes eta (the paper uses lambda = 1e-4). muParam multiplies
only the Adam direction there: it is an LR rule, and the decay is not an LR-scaled term in
that form. The coupled form is PyTorch/optax AdamW, where the decay rides on the LR, muParam
multiplier included; the paper uses lambda = 0.1 for it (set `optimizer.weight_decay: 0.1`).
Leaves whose parameter group (`seismo.models.param_groups`) is in
`optimizer.decay_exclude` get no decay in either form.

Conventions:
* Schedule indexing. `schedule(t)` is the LR of the update with 0-based index t, i.e. the
  update that takes the params from t applied updates to t + 1 (optax's `count`, and
  `TrainState.step` before the update). It is the 1-based schedule evaluated at t + 1, so the
  first update already moves (LR eta / warmup_steps, not 0), update warmup_steps - 1 is the
  first at the peak, and the last of `total_steps` updates runs at exactly `min_lr`.
* Gradient accumulation is the trainer's (`seismo.train.step.grads_and_stats` averages
  microbatch gradients and calls `update` once), not `optax.MultiSteps`: every `update` here
  is one optimizer step, and every count above counts optimizer steps.
* `build` needs only the shapes and paths of `params`: `jax.ShapeDtypeStruct` leaves work, so
  the optimizer state can be created with `jax.eval_shape(tx.init, abstract_params)` and
  sharded before it exists.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from seismo.config import DECAY_GROUPS, ModelConfig, OptimizerConfig

PyTree = Any

SCHEDULES = ("cosine", "linear", "constant")


# --------------------------------------------------------------------------- schedule


def schedule(opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate of the update with 0-based index t (see the module docstring).

    Update k = t + 1 (1-based) gets `lr * k / warmup_steps` for k <= warmup_steps, then decays
    from `lr` at k = warmup_steps to `min_lr` at k = total_steps ('cosine': half a cosine
    period; 'linear': a straight line; 'constant': stays at `lr`), and stays at `min_lr`
    after. With no room left for a decay (total_steps <= warmup_steps) it stays at `lr`.
    """
    lr, warmup = opt_cfg.lr, opt_cfg.warmup_steps
    decay_steps = total_steps - warmup
    if opt_cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule {opt_cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if opt_cfg.schedule == "constant" or decay_steps <= 0:
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_cfg.min_lr / lr)
    else:
        after = optax.linear_schedule(lr, opt_cfg.min_lr, decay_steps)
    if warmup > 0:
        by_update = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
    else:
        by_update = after

    def lr_at(step: jax.typing.ArrayLike) -> jax.Array:
        return by_update(step + 1)  # 1-based: update 0 is schedule step 1, never the LR-0 point

    return lr_at


# --------------------------------------------------------------------------- parameter groups


def _groups(params: PyTree, groups: PyTree | None) -> PyTree:
    """The parameter-group tree (leaves: names in DECAY_GROUPS), checked against `params`."""
    if groups is None:
        from seismo.models import param_groups  # lazy: keeps flax out of `import seismo.train`

        groups = param_groups(params)
    if jax.tree.structure(groups) != jax.tree.structure(params):
        raise ValueError(
            "parameter groups do not have the structure of the params: "
            f"{jax.tree.structure(groups)} vs {jax.tree.structure(params)}"
        )
    for path, name in jax.tree_util.tree_leaves_with_path(groups):
        if name not in DECAY_GROUPS:
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} is in unknown group {name!r}; "
                f"groups are {', '.join(DECAY_GROUPS)} (seismo.models.param_groups assigns them)"
            )
    return groups


def decay_mask(opt_cfg: OptimizerConfig, params: PyTree, *, groups: PyTree | None = None) -> PyTree:
    """True for the leaves that get weight decay: those whose group is not in `decay_exclude`."""
    exclude = set(opt_cfg.decay_exclude)
    return jax.tree.map(lambda g: g not in exclude, _groups(params, groups))


def lr_multipliers(params: PyTree, model_cfg: ModelConfig, *, groups: PyTree | None = None) -> PyTree:
    """The muParam (simple) per-tensor LR multiplier m_p of every leaf (floats, like `params`).

    Every 'kernel' leaf (linear layers, including the head) gets base_fan_in / fan_in, where
    base_fan_in is the fan-in the same matrix has in the model of width `mup_base_width`
    (Wortsman et al. 2023, "muParam (simple)"; docs/methods.md §1.5). A width family scales every
    fan-in with d_model (d for the projections and the head, 4d for the MLP down-projection),
    so base_fan_in = fan_in * mup_base_width / d_model and the multiplier is
    mup_base_width / d_model for every kernel: 0.5, 0.25, 0.125 at widths 512, 1024, 2048 with
    base 256 (the down-projection's base fan-in is 1024: the same ratio). One caveat: the
    per-head gate of gated attention (kernel [n_heads, d_model / n_heads]) has fan-in
    d_model / n_heads, which scales with width only when n_heads is held fixed; in a family
    that holds head_dim fixed its multiplier should be 1 and is not.
    Embeddings, norms, biases and the other groups get 1. 'full' muParam uses the same
    multipliers (its init and attention-scale parts live in the model); 'off' gives 1.
    """
    groups = _groups(params, groups)
    if model_cfg.mup == "off":
        return jax.tree.map(lambda _: 1.0, groups)
    kernel = model_cfg.mup_base_width / model_cfg.d_model  # = base_fan_in / fan_in
    return jax.tree.map(lambda g: kernel if g == "kernel" else 1.0, groups)


def _scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
    """Multiply each update leaf by its own constant (the muParam LR multiplier)."""
    return optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers))


# --------------------------------------------------------------------------- the chain


def build(
    opt_cfg: OptimizerConfig,
    model_cfg: ModelConfig,
    params: PyTree,
    total_steps: int,
    *,
    groups: PyTree | None = None,
) -> optax.GradientTransformation:
    """The AdamW chain (module docstring for the update rule and conventions).

    `params` fixes the tree structure, the decay mask and the muParam multipliers (shapes
    suffice: ShapeDtypeStruct leaves work). `groups` is the parameter-group tree; None asks
    `seismo.models.param_groups(params)`. `total_steps` is the number of optimizer updates
    of the run (the end of the LR decay).

    `lr` and `weight_decay` may be traced values (a sweep vmapped over them).

    Chain: clip_by_global_norm (when clip_norm > 0) -> scale_by_adam(b1, b2, eps) ->
    independent: muParam multipliers -> add_decayed_weights(lambda / eta, mask)
    coupled:     add_decayed_weights(lambda, mask) -> muParam multipliers
    -> scale_by_schedule(-schedule(t)). The recipe of docs/methods.md §1.8 with the muParam
    multiplier placed per the decay form.
    """
    if opt_cfg.weight_decay_form not in ("independent", "coupled"):
        raise ValueError(
            f"optimizer.weight_decay_form {opt_cfg.weight_decay_form!r} is not 'independent' or 'coupled'"
        )
    groups = _groups(params, groups)
    lr_fn = schedule(opt_cfg, total_steps)
    lam = opt_cfg.weight_decay
    mask = decay_mask(opt_cfg, params, groups=groups)
    scale_mup = [] if model_cfg.mup == "off" else [_scale_by_tree(lr_multipliers(params, model_cfg, groups=groups))]

    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    # b1, b2, eps are recorded in the state (inject_hyperparams), so `unscaled_update` needs
    # nothing but the state and stays right in eps sweeps (1e-15 vs 1e-8, section 3.4).
    parts.append(optax.inject_hyperparams(optax.scale_by_adam)(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps))
    if opt_cfg.weight_decay_form == "independent":
        # s_t * eta * (m_p Delta + (lambda / eta) theta) = s_t * (eta m_p Delta + lambda theta)
        parts += scale_mup + [optax.add_decayed_weights(lam / opt_cfg.lr, mask)]
    else:
        parts += [optax.add_decayed_weights(lam, mask)] + scale_mup
    parts.append(optax.scale_by_schedule(lambda t: -lr_fn(t)))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- for logs and probes


def unscaled_update(opt_state: PyTree, opt_cfg: OptimizerConfig | None = None) -> PyTree:
    """The unscaled Adam direction Delta = mhat / (sqrt(vhat) + eps) of the last update.

    Recomputed from the optimizer state after `tx.update` (the moments and count of its
    `ScaleByAdamState`, and b1, b2, eps as `build` recorded them beside it) exactly as
    `optax.scale_by_adam` computed it, before the LR, the muParam multiplier and the decay:
    the "update RMS" of Wortsman et al. 2023 section 3.4 is the RMS of this (docs/methods.md §1.4).
    `opt_cfg` is needed only for a state that does not record b1, b2, eps (an Adam state not
    made by `build`); when given, its values are used. Before any update it is zero.
    """
    adam = optax.tree_utils.tree_get(opt_state, "ScaleByAdamState")
    if adam is None:
        raise ValueError("the optimizer state holds no ScaleByAdamState; was it built by seismo.train.optimizer.build?")
    if opt_cfg is not None:
        b1, b2, eps = opt_cfg.b1, opt_cfg.b2, opt_cfg.eps
    else:
        hyper = optax.tree_utils.tree_get(opt_state, "hyperparams")
        if hyper is None:
            raise ValueError("the optimizer state does not record b1, b2, eps; pass the run's opt_cfg")
        b1, b2, eps = hyper["b1"], hyper["b2"], hyper["eps"]
    count = jnp.maximum(adam.count, 1)  # count 0: mu = nu = 0, so Delta = 0 instead of 0/0
    mu_hat = optax.tree.bias_correction(adam.mu, b1, count)
    nu_hat = optax.tree.bias_correction(adam.nu, b2, count)
    return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)


def describe(opt_cfg: OptimizerConfig) -> str:
    """A one-line summary for logs."""
    o = opt_cfg
    if o.schedule == "constant":
        sched = f"lr {o.lr:g}, warmup {o.warmup_steps}, then constant"
    else:
        sched = f"lr {o.lr:g}, warmup {o.warmup_steps}, {o.schedule} decay to {o.min_lr:g}"
    if o.weight_decay > 0:
        excluded = ", ".join(o.decay_exclude) or "nothing"
        decay = f"{o.weight_decay_form} weight decay {o.weight_decay:g} (not on {excluded})"
    else:
        decay = "no weight decay"
    clip = f"clip global norm {o.clip_norm:g}" if o.clip_norm > 0 else "no clipping"
    return f"AdamW(b1={o.b1:g}, b2={o.b2:g}, eps={o.eps:g}); {sched}; {decay}; {clip}"
