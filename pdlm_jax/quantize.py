"""Weight-only int8 inference with qwix post-training quantization (PTQ).

`quantize_model(model, "int8")` replaces the kernel of every `nnx.Linear` (LLaDA and SigLIP projections,
the projector, lm_head) by an int8 array with one float scale per output channel (symmetric absmax, per
layer of a stack); activations, embeddings, norms and the vision patch embedding stay in the compute
dtype. It returns a wrapper under which the model's programs must be traced: qwix's `PtqProvider`
intercepts those layers' dot_general and multiplies with the int8 kernel (dequantized on the fly, fused
by XLA).
Weights take about a quarter of their float32 size (half of bfloat16).

We quantize the kernels ourselves instead of by qwix's quantize-on-first-call for the reason given in
pdlm_jax/lora.py: our layers are stacked and scanned, so every quantized leaf keeps its layer axis.
"""

from __future__ import annotations

from typing import Callable

import re

import jax
import jax.numpy as jnp
from flax import nnx

from pdlm_jax.errors import PDLMError
from pdlm_jax.lora import tag_paths, under

MODES = {"int8": jnp.int8}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PDLMError(f"quantize must be one of {', '.join(MODES)} (or none), got {mode!r}")


def quantize_model(model: nnx.Module, mode: str = "int8") -> tuple[nnx.Module, Callable[[Callable], Callable]]:
    """Quantize every linear kernel of `model` in place; returns (model, tracer): wrap the functions that
    trace the model's programs with `tracer` (`lora.under`). Needs concrete weights: for an abstract plan
    see `abstract`."""
    import qwix
    from qwix._src.core.qarray import HowToQuantize  # qwix's PTQ weight container and its recipe
    from qwix._src.providers.ptq import WithAux

    check_mode(mode)
    qtype = MODES[mode]
    # A Linear contracts the kernel's input axis: one scale per output channel (the last axis).
    how = HowToQuantize(qtype=qtype, channelwise_axes=(1,))

    def one(kernel):
        return qwix.quantize(kernel, qtype, channelwise_axes=(1,))

    paths = []
    for path, module in tag_paths(model):
        if isinstance(module, nnx.Linear) and getattr(module, "called_as_linear", True):  # qwix intercepts the call
            kernel = module.kernel.get_value()
            fn = one
            for _ in kernel.shape[:-2]:  # stacked layers: a scale per layer and output channel
                fn = jax.vmap(fn)
            module.kernel = WithAux(jax.jit(fn)(kernel), how)
            paths.append(path)
    # the rule names exactly the quantized layers, so no other dot_general is touched
    rule = qwix.QuantizationRule(module_path="|".join(map(re.escape, paths)), op_names=("dot_general",),
                                 weight_qtype=qtype)
    return model, under(qwix.PtqProvider([rule]))


def abstract(make_model: Callable[[], nnx.Module], mode: str = "int8"):
    """(graphdef, abstract state, tracer) of the quantized model `make_model()` builds, without allocating
    it (ahead-of-time plans: `jax.jit(tracer(fn)).lower(state, ...)`). An nnx.eval_shape model cannot be
    quantized directly: qwix's weight container holds no arrays there, so nnx keeps it out of the state."""
    out = {}

    def build():
        model, out["tracer"] = quantize_model(make_model(), mode)
        out["graphdef"], state = nnx.split(model)
        return state

    state = jax.eval_shape(build)
    return out["graphdef"], state, out["tracer"]


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array in the model's state (parameters and quantization scales)."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "nbytes"))
