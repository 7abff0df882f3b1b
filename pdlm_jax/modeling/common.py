"""Small NNX helpers shared by the model files: annotated initialisers and stacked, scanned layers."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

# Logical axis names of parameters ('embed', 'heads', 'mlp', 'vocab', 'norm' for norm scales and biases, 'layers'
# for stacked layers); `sharding.DEFAULT_RULES` maps them to mesh axes (data, fsdp, tensor).
LAYERS_AXIS = "layers"


def init(initializer, *names: str | None):
    """`initializer` annotated with one logical axis name per parameter dimension.

    Eager sharding is off: the model is built without a mesh; sharding is applied later from the names.
    """
    return nnx.with_partitioning(initializer, names, eager_sharding=False)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build `num_layers` copies of `make(rngs)` with every parameter stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


def scan_layers(layers: nnx.Module, h: jax.Array, *args, remat: bool = False) -> jax.Array:
    """Apply stacked `layers` in order, `h = layer(h, *args)`, as one `lax.scan` (compile time flat in depth).

    remat: recompute each layer's activations in the backward pass (training memory ~ one layer).
    """
    graphdef, state = nnx.split(layers)

    def body(carry, layer_state):
        return nnx.merge(graphdef, layer_state)(carry, *args), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    h, _ = jax.lax.scan(body, h, state)
    return h
