"""Taps: the model's named intermediate points, recorded only when they are asked for.

A module calls `tap(self, name, value)` where the forward pass produces something worth
measuring. What is recorded depends on which collection the model is applied with mutable
(`Model.apply(..., taps=...)` chooses); with neither, the call does nothing and the traced
program is the plain forward pass. There is no second switch.

* 'taps' (`taps="full"`, or True): the whole value, as float32. The checkpoint analysis reads
  these, attention maps included, one forward pass at a time.
* 'tap_stats' (`taps="stats"`): per-layer statistics reduced inside the layer (`REDUCTIONS`,
  and the attention's own `tap_stats`), so a scan over layers carries scalars, never
  activations or [B, H, T, S] maps. The in-step probes read these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "taps"
STATS = "tap_stats"


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _max_abs(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _zero_frac(x: jax.Array) -> jax.Array:
    return jnp.mean((x == 0).astype(jnp.float32))


# tap name -> {statistic name: reduction of the layer's whole value to a scalar}
REDUCTIONS: dict[str, dict[str, Callable[[jax.Array], jax.Array]]] = {
    "resid": {"resid_rms": _rms, "resid_max": _max_abs},
    "mlp_post": {"mlp_rms": _rms, "mlp_zero_frac": _zero_frac},
}


def taps_mode(module: nn.Module) -> str | None:
    """'full', 'stats' or None: what this application of the model records."""
    if module.is_mutable_collection(COLLECTION):
        return "full"
    if module.is_mutable_collection(STATS):
        return "stats"
    return None


def _sow(module: nn.Module, collection: str, name: str, value: jax.Array) -> None:
    module.sow(collection, name, value.astype(jnp.float32), init_fn=lambda: None, reduce_fn=lambda _, v: v)


def tap(module: nn.Module, name: str, value: jax.Array) -> None:
    """Record `value` under `name` (full taps), or its `REDUCTIONS` (stats), replacing an
    earlier value of that name in the module."""
    mode = taps_mode(module)
    if mode == "full":
        _sow(module, COLLECTION, name, value)
    elif mode == "stats":
        for stat, reduce in REDUCTIONS.get(name, {}).items():
            _sow(module, STATS, stat, reduce(value))


def tap_stats(module: nn.Module, values: Mapping[str, jax.Array]) -> None:
    """Record statistics a module computed itself (scalars) when stats are being taken."""
    if taps_mode(module) == "stats":
        for name, value in values.items():
            _sow(module, STATS, name, jax.lax.stop_gradient(value))
