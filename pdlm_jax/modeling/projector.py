"""Pixel shuffle and the `mlp2x_gelu` vision→LM projector (SPEC §3.4, §3.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdlm_jax.modeling.common import init


def pixel_shuffle(x: jax.Array) -> jax.Array:
    """(T, g*g, C) -> (T, (g/2)^2, 4C), channels [top-left, top-right, bottom-left, bottom-right] per 2x2 block."""
    T, n, C = x.shape
    g = int(round(n**0.5))
    x = x.reshape(T, g // 2, 2, g // 2, 2, C)  # [t, Y, dy, X, dx, ch]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [t, Y, X, dy, dx, ch]
    return x.reshape(T, (g // 2) ** 2, 4 * C)


class Projector(nnx.Module):
    """z = fc2(GELU(fc1(x))) with exact (erf) GELU."""

    def __init__(self, in_features: int, hidden_size: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kernel, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
        self.fc1 = nnx.Linear(in_features, hidden_size, kernel_init=init(kernel, "embed", "mlp"),
                              bias_init=init(zeros, "mlp"), **kw)
        self.fc2 = nnx.Linear(hidden_size, hidden_size, kernel_init=init(kernel, "mlp", "embed"),
                              bias_init=init(zeros, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)
        return self.fc2(h)
