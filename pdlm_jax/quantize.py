"""Weight-only int8 and int4 inference with qwix post-training quantization (PTQ).

`quantize_model(model, mode)` replaces the kernel of every `nnx.Linear` (LLaDA and SigLIP projections, the
projector, lm_head) by an integer array with float scales (symmetric absmax, per layer of a stack);
activations, embeddings, norms, the vision patch embedding and SigLIP's attention output projection (not an
nnx.Linear) stay in the compute dtype. It returns a wrapper under which the model's programs must be traced:
qwix's `PtqProvider` intercepts those layers' dot_general and multiplies with the quantized kernel
(dequantized on the fly, fused by XLA).

- int8: one scale per output channel. Weights take about a quarter of their float32 size.
- int4: one scale per output channel and per group of `INT4_GROUP` = 128 consecutive input rows (blockwise,
  as GPTQ/AWQ). A single scale per 4096-long input column gives 4-bit rounding steps sized by the column's
  largest weight; groups of 128 keep outliers local at 1/128 scale overhead (0.125 bit per weight with bf16
  scales), and 128 divides LLaDA's and most of SigLIP's input widths. A width it does not divide (SigLIP's
  MLP input, 4304 = 16 · 269) uses its largest divisor below 128 instead. docs/TRAINING.md has the measured
  accuracy of 32, 64 and 128 on the demo model.

We quantize the kernels ourselves instead of by qwix's quantize-on-first-call for the reason given in
pdlm_jax/lora.py: our layers are stacked and scanned, so every quantized leaf keeps its layer axis.
`quantize_params` does the same to a plain parameter tree (LoRA's frozen base, pdlm_jax/lora.py).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from pdlm_jax.errors import PDLMError
from pdlm_jax.qwix_tracing import ptq_weight, tag_paths, under
from pdlm_jax.trees import flatten, nest

MODES = {"int8": jnp.int8, "int4": jnp.int4}
INT4_GROUP = 128


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PDLMError(f"quantize must be one of {', '.join(MODES)} (or none), got {mode!r}")


def group_size(rows: int, mode: str) -> int | None:
    """Input rows sharing one scale: None (the whole column) for int8; for int4 the largest divisor of
    `rows` up to INT4_GROUP."""
    if mode != "int4":
        return None
    return max(g for g in range(1, min(rows, INT4_GROUP) + 1) if rows % g == 0)


def _recipe(mode: str, group: int | None) -> dict:
    """qwix.quantize's arguments for an (in, out) kernel: scales per output channel and, with `group`, per
    `group` input rows."""
    return dict(qtype=MODES[mode], channelwise_axes=(1,), tiled_axes={0: group} if group else {})


def quantize_kernel(kernel: jax.Array, mode: str, group: int | None = None):
    """A (..., in, out) kernel as a qwix QArray: scales per output channel and, with `group`, per `group`
    input rows (int4: `group_size`), separately for every leading (stacked-layer) index."""
    import qwix

    check_mode(mode)

    def one(k):
        return qwix.quantize(k, **_recipe(mode, group))

    for _ in kernel.shape[:-2]:
        one = jax.vmap(one)
    return one(kernel)


def linear_paths(model: nnx.Module) -> list[str]:
    """Module paths of the layers quantization applies to: every nnx.Linear (qwix intercepts its call; SigLIP's
    attention output is a modeling/siglip.HeadsProjection and stays in the compute dtype)."""
    return [path for path, module in tag_paths(model) if isinstance(module, nnx.Linear)]


def rule(paths: Iterable[str], mode: str):
    """The qwix rule naming exactly the quantized layers, so no other dot_general is touched."""
    import qwix

    return qwix.QuantizationRule(module_path="|".join(map(re.escape, paths)), op_names=("dot_general",),
                                 weight_qtype=MODES[mode])


def quantize_model(model: nnx.Module, mode: str = "int8") -> tuple[nnx.Module, Callable[[Callable], Callable]]:
    """Quantize every linear kernel of `model` in place; returns (model, tracer): wrap the functions that
    trace the model's programs with `tracer` (`qwix_tracing.under`). Needs concrete weights: for an abstract plan
    see `abstract`."""
    import qwix

    check_mode(mode)
    paths = linear_paths(model)
    modules = dict(tag_paths(model))
    for path in paths:
        module = modules[path]
        kernel = module.kernel.get_value()
        group = group_size(kernel.shape[-2], mode)
        q = jax.jit(quantize_kernel, static_argnums=(1, 2))(kernel, mode, group)
        # jax 0.10.2's CPU client reports an int4 array made by a jitted function as unpacked while a
        # compiled program wants it packed, and refuses the committed array; one through the host is
        # uncommitted, which the program accepts (`abstract` traces this: no array to move then)
        if mode == "int4" and not isinstance(q.qvalue, jax.core.Tracer):
            q = q.replace(qvalue=jnp.asarray(jax.device_get(q.qvalue)))
        module.kernel = ptq_weight(q, _recipe(mode, group))
    return model, under(qwix.PtqProvider([rule(paths, mode)]))


def quantize_params(params: dict, paths: Iterable[str], mode: str) -> dict:
    """A nested parameter tree with the kernel of each module in `paths` quantized, laid out as the state of
    a model `quantize_model` quantized ('<module>/kernel/array/qvalue' and '.../scale')."""
    flat = flatten(params)
    for path in paths:
        kernel = flat.pop(f"{path}/kernel")
        q = quantize_kernel(kernel, mode, group_size(kernel.shape[-2], mode))
        flat[f"{path}/kernel/array/qvalue"], flat[f"{path}/kernel/array/scale"] = q.qvalue, q.scale
    return nest(flat)


def dequantize_params(params: dict) -> dict:
    """The inverse layout of `quantize_params`: every quantized kernel as the float array it stands for (in
    its scales' dtype), e.g. to merge LoRA adapters into the base a QLoRA run trained against."""
    import qwix

    flat = flatten(params)
    for path in [p for p in flat if p.endswith("/kernel/array/qvalue")]:
        module = path[: -len("/kernel/array/qvalue")]
        qvalue, scale = flat.pop(path), flat.pop(f"{module}/kernel/array/scale")
        flat[f"{module}/kernel"] = qwix.dequantize(qwix.QArray(qvalue, scale, qtype=qvalue.dtype))
    return nest(flat)


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
