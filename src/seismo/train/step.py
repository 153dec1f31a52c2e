"""The jitted train and eval steps.

`train_step(state, batch) -> (state, metrics)` returns a flat dict of float32 scalars; the
host fetches it one step late so the device never waits (nanodo, big_vision). The
instrumented step is the same function with taps switched on and a probe's `inside_step`
applied to a `StepInfo` (taps, grads, params, new optimizer state) inside the same jit, so full activations
never leave the device; it is compiled beside the plain step and called every
`run.probe_every` steps, and with probes off the plain step is all that compiles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seismo.config import Config
from seismo.instrument.probes import StepInfo, StepProbe
from seismo.models.loss import lm_loss, lm_loss_chunked
from seismo.train import optimizer as opt_lib

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any
    opt_state: Any


def _chunked(cfg: Config, batch: Batch) -> bool:
    """Whether the head and cross-entropy run in chunks of `loss.chunk` positions."""
    return 0 < cfg.loss.chunk < batch["inputs"].shape[1]


def _loss(model: Any, cfg: Config, params: Any, batch: Batch, with_taps: bool | str):
    mask = batch.get("loss_mask")
    if _chunked(cfg, batch) and with_taps != "full":  # full taps record the whole logits
        hidden, taps = model.apply(params, batch["inputs"], taps=with_taps, hidden=True)
        loss, stats = lm_loss_chunked(lambda x: model.head(params, x), hidden, batch["targets"],
                                      chunk=cfg.loss.chunk, z_loss=cfg.loss.z_loss, mask=mask)
        return loss, (stats, taps)
    logits, taps = model.apply(params, batch["inputs"], taps=with_taps)
    loss, stats = lm_loss(logits, batch["targets"], z_loss=cfg.loss.z_loss, mask=mask)
    return loss, (stats, taps)


def _microbatches(batch: Batch, n: int) -> Batch:
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def grads_and_stats(model: Any, cfg: Config, params: Any, batch: Batch, with_taps: bool | str = False):
    """Mean gradient and loss statistics over `optimizer.grad_accum_steps` microbatches
    (a `lax.scan`, so memory is that of one microbatch). Taps come from the last one."""
    grad_fn = jax.grad(lambda p, b: _loss(model, cfg, p, b, with_taps), has_aux=True)
    n = cfg.optimizer.grad_accum_steps
    if n == 1:
        grads, (stats, taps) = grad_fn(params, batch)
        return grads, stats, taps
    micro = _microbatches(batch, n)
    first = jax.tree.map(lambda v: v[0], micro)
    _, (stats_shape, taps_shape) = jax.eval_shape(lambda p, b: _loss(model, cfg, p, b, with_taps), params, first)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

    def body(carry, mb):
        g_acc, s_acc, _ = carry
        g, (s, t) = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s), t), None

    init = (jax.tree.map(jnp.zeros_like, params), zeros(stats_shape), zeros(taps_shape))
    (g_sum, s_sum, taps), _ = jax.lax.scan(body, init, micro)
    mean = lambda tree: jax.tree.map(lambda x: x / n, tree)
    # logz_max is a max, not a mean; the mean of per-microbatch maxima is a lower bound of it.
    return mean(g_sum), mean(s_sum), taps


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    cfg: Config,
    schedule: optax.Schedule,
    probe: StepProbe | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The (un-jitted) train step; with `probe` it is the instrumented step and returns
    `(state, metrics, probe.inside_step(info))`."""

    def step(state: TrainState, batch: Batch):
        taps_mode = False if probe is None else getattr(probe, "taps", "stats")
        grads, stats, taps = grads_and_stats(model, cfg, state.params, batch, with_taps=taps_mode)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": stats["ce"] + stats["z_loss"],
            **stats,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        if probe is None:
            return new_state, metrics
        info = StepInfo(taps=taps, params=state.params, grads=grads, new_params=params, new_opt_state=opt_state,
                        loss_stats=stats, update=opt_lib.unscaled_update(opt_state))
        return new_state, metrics, probe.inside_step(info)

    return step


def padded_chunks(batch: Mapping[str, Any], chunk: int):
    """Split an evaluation set into rows of `chunk` (the last padded with zeros) and yield
    (part, row_weights) with weight 0 on padding, so one compiled shape serves any size."""
    n = len(next(iter(batch.values())))
    for start in range(0, n, chunk):
        part = {k: np.asarray(v[start:start + chunk]) for k, v in batch.items()}
        m = len(part["inputs"])
        weights = np.zeros(chunk, np.float32)
        weights[:m] = 1.0
        yield {k: np.concatenate([v, np.zeros((chunk - m, *v.shape[1:]), v.dtype)]) for k, v in part.items()}, weights


def under_mesh(fn: Callable[..., Any], mesh: Any) -> Callable[..., Any]:
    """`fn` traced with `mesh` as the abstract mesh in context, so the model can pin its
    activations' batch axis to (data, fsdp) (seismo.models.transformer.shard_batch)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def make_eval_step(model: Any, cfg: Config) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]:
    """Summed token cross-entropy and token count over a batch whose rows carry weights
    (0 for padding rows), so any eval-set size runs with one compiled shape."""

    def eval_step(params: Any, batch: Batch, row_weights_B: jax.Array):
        w_BxT = row_weights_B[:, None] * jnp.ones(batch["targets"].shape, jnp.float32)
        if "loss_mask" in batch:
            w_BxT = w_BxT * batch["loss_mask"]
        if _chunked(cfg, batch):
            hidden, _ = model.apply(params, batch["inputs"], hidden=True)
            _, stats = lm_loss_chunked(lambda x: model.head(params, x), hidden, batch["targets"],
                                       chunk=cfg.loss.chunk, mask=w_BxT)
            return stats["ce"] * jnp.maximum(jnp.sum(w_BxT), 1.0), jnp.sum(w_BxT)
        logits, _ = model.apply(params, batch["inputs"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll_BxT = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll_BxT * w_BxT), jnp.sum(w_BxT)

    return eval_step
