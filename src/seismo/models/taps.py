"""Taps: the model's named intermediate points, recorded only when they are asked for.

A module calls `tap(self, name, value)` where the forward pass produces something worth
measuring. The value is recorded (as float32) in the 'taps' collection only when the model is
applied with that collection mutable (`Model.apply(..., taps=True)` does this); otherwise the
call does nothing and the traced program is the plain forward pass. There is no second switch:
whether taps are on is decided once, by the collection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "taps"


def tap(module: nn.Module, name: str, value: jax.Array) -> None:
    """Record `value` under `name`, replacing an earlier value of that name in the module."""
    if module.is_mutable_collection(COLLECTION):
        module.sow(COLLECTION, name, value.astype(jnp.float32), init_fn=lambda: None, reduce_fn=lambda _, v: v)
