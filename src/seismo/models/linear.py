"""Dense layers and the initialisers of the Wortsman et al. 2023 recipe (arXiv 2309.14322).

Every dense kernel is a 2-D float32 parameter [fan_in, fan_out] named 'kernel' (stacked to
[layers, fan_in, fan_out] by the layer scan), with logical axis names for sharding. Defaults
(docs/methods.md §1.1): truncated normal with standard deviation 1/sqrt(fan_in) (the truncation at
two standard deviations is compensated, as in `variance_scaling`, so the std is exact);
`model.init_std` replaces it by one fixed std; biases (only with `model.use_bias`) start at 0.
The matmul runs in the compute dtype (`model.dtype`); the parameters stay float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# std of a standard normal truncated to [-2, 2]: dividing by it makes the std exact.
_TRUNC_STD = 0.87962566103423978

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def truncated_normal(std: float) -> Initializer:
    """Truncated normal on [-2 std, 2 std] with standard deviation exactly `std`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return (std / _TRUNC_STD) * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


class Dense(nn.Module):
    """y = x @ kernel (+ bias). kernel [fan_in, fan_out] with logical axes `axes`.

    `fan_in` is explicit so that the kernel exists before the first call (`self.kernel`):
    the MLP reads the down-projection's row norms for neuron thresholds (mlp.py).
    """

    fan_in: int
    features: int
    axes: tuple[str | None, str | None]
    std: float | None = None  # None: 1/sqrt(fan_in); 0.0 gives a zero kernel (muParam query)
    use_bias: bool = False
    dtype: Any = jnp.float32  # compute dtype of the matmul
    out_dtype: Any = None  # None: `dtype`; float32 for the output logits

    def setup(self) -> None:
        std = self.fan_in**-0.5 if self.std is None else self.std
        init = nn.initializers.zeros_init() if std == 0.0 else truncated_normal(std)
        self.kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                                 (self.fan_in, self.features), jnp.float32)
        if self.use_bias:
            self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]),
                                   (self.features,), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.out_dtype or self.dtype
        y = jnp.dot(x.astype(self.dtype), self.kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.bias
        return y.astype(out_dtype)
