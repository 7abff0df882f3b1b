"""The parameters of PerceptionDLM as the model itself declares them: path, shape and logical axes.

The model is built abstractly (`nnx.eval_shape`, nothing allocated, fast even for the 8B preset); each
parameter's logical axes are the names its initialiser is annotated with (`common.init`, plus 'layers' for
stacked layers). The converter's contract (`keymap.expected_shapes`) and the parameters' shardings
(`param_specs`, through `sharding`'s logical-rules table) are both read from here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pdlm_jax import sharding
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.pdm import PerceptionDLM


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name (or None) per dimension; () if not annotated


@functools.lru_cache(maxsize=16)
def param_layout(cfg: PDLMConfig) -> Mapping[str, ParamInfo]:
    """{'/'-joined parameter path: ParamInfo} of `PerceptionDLM(cfg)`, read-only, sorted by path."""
    model = nnx.eval_shape(lambda: PerceptionDLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    layout = {}
    for path, var in nnx.to_flat_state(state):
        layout["/".join(map(str, path))] = ParamInfo(tuple(var.shape), tuple(specs[path].get_value()))
    return types.MappingProxyType(layout)


# Leaves that are no parameter of the model's own, replicated by declaration, matched on the path's ending
# (with any container before it: 'adapters/...', 'frozen/...', 'opt/0/mu/...'). Every other leaf must end in
# a parameter the model declares (`param_layout`); one that does not is a PDLMError, so a new parameter or
# state leaf without logical axes cannot end up silently whole on every device.
REPLICATED_SUFFIXES = (
    # LoRA adapters (pdlm_jax.lora): rank-r factors added by qwix while tracing, not in the module tree;
    # tiny beside their kernel (r × in, r × out), so each device keeps them whole.
    "kernel_lora_a", "kernel_lora_b",
    # qwix's quantized kernels (pdlm_jax.quantize: pdlm-infer --quantize, a LoRA int8/int4 base): the int
    # values are laid out in qwix's packing (int4 in groups), which the kernel's logical axes do not describe,
    # and the per-channel / per-group scales are small; both kept whole.
    "kernel/array/qvalue", "kernel/array/scale",
)


def _declared_replicated(path: str, ndim: int) -> bool:
    # A scalar (the train step, the optimizer's step counts and hyperparameters) has nothing to split.
    return ndim == 0 or any(path == s or path.endswith("/" + s) for s in REPLICATED_SUFFIXES)


def param_logical_axes(path: str, ndim: int, cfg: PDLMConfig) -> tuple[str | None, ...]:
    """Logical axes of the leaf at `path`: those the model declares for the parameter whose path `path` ends
    in ('lm/embed/embedding', 'params/lm/embed/embedding', 'opt/0/mu/lm/embed/embedding'); all None for a
    leaf replicated by declaration (`REPLICATED_SUFFIXES`, scalars). PDLMError for any other leaf, or for a
    parameter's leaf of another rank than the parameter."""
    if _declared_replicated(path, ndim):
        return (None,) * ndim
    layout, parts = param_layout(cfg), path.split("/")
    for i in range(len(parts)):
        info = layout.get("/".join(parts[i:]))
        if info is not None:
            if len(info.axes) != ndim:
                raise PDLMError(f"leaf {path!r} has {ndim} dimension(s) but the model's parameter "
                                f"{'/'.join(parts[i:])!r} has {len(info.axes)}: no logical axes to shard it by")
            return info.axes
    raise PDLMError(f"leaf {path!r} is no parameter of the model and has no logical axes; annotate it in the "
                    "model or, if it should be whole on every device, declare it in layout.REPLICATED_SUFFIXES")


def param_specs(tree: Any, mesh: Mesh, cfg: PDLMConfig, rules: dict[str, Any] = sharding.DEFAULT_RULES) -> Any:
    """Tree of PartitionSpecs (same structure as `tree`, leaves arrays or ShapeDtypeStructs) for the
    parameters of `PerceptionDLM(cfg)` in any container: the parameter tree, an nnx state, a train state
    with its optimizer moments (see `param_logical_axes`). PDLMError names a leaf without logical axes that
    is not replicated by declaration."""

    def spec(key_path, x):
        axes = param_logical_axes(sharding.path_str(key_path), len(x.shape), cfg)
        return sharding.logical_spec(x.shape, axes, mesh, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree: Any, mesh: Mesh, cfg: PDLMConfig, rules: dict[str, Any] = sharding.DEFAULT_RULES) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, cfg, rules))
