"""The parameters of PerceptionDLM as the model itself declares them: path, shape and logical axes.

The model is built abstractly (`nnx.eval_shape`, nothing allocated, fast even for the 8B preset); each
parameter carries its logical axes as metadata, the names its initialiser is annotated with (`common.init`,
plus 'layers' for stacked layers). The converter's contract (`keymap.expected_shapes`) is read from here, and
`param_specs` turns any model state's own axes (with LoRA adapters, quantized, abstract or not) into partition
specs through `sharding`'s logical-rules table.
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
def abstract_params(cfg: PDLMConfig) -> nnx.State:
    """The nnx.Param state of `PerceptionDLM(cfg)`, abstract (shapes, dtypes and each parameter's logical axes
    as its `out_sharding` metadata)."""
    return nnx.state(nnx.eval_shape(lambda: PerceptionDLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)


@functools.lru_cache(maxsize=16)
def param_layout(cfg: PDLMConfig) -> Mapping[str, ParamInfo]:
    """{'/'-joined parameter path: ParamInfo} of `PerceptionDLM(cfg)`, read-only, sorted by path."""
    layout = {}
    for path, var in nnx.to_flat_state(abstract_params(cfg)):
        layout["/".join(map(str, path))] = ParamInfo(tuple(var.shape), tuple(_axes(var) or ()))
    return types.MappingProxyType(layout)


def _axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axes a variable was declared with (`common.init`), None if it has none."""
    axes = var.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


# Leaves of a model's state that carry no logical axes and are replicated by declaration. Every other leaf must
# carry its own (`out_sharding`); one that does not is a PDLMError, so a new parameter or state leaf without
# logical axes cannot end up silently whole on every device.
# LoRA adapters (pdlm_jax.lora): rank-r factors, tiny beside their kernel (r × in, r × out); kept whole.
REPLICATED_TYPES = (nnx.LoRAParam,)
# qwix's quantized kernels (pdlm_jax.quantize: pdlm-infer --quantize, a LoRA int8/int4 base), which are no
# nnx Variables: the int values are laid out in qwix's packing (int4 in groups), which the kernel's logical
# axes do not describe, and the per-channel / per-group scales are small; both kept whole.
REPLICATED_SUFFIXES = ("kernel/array/qvalue", "kernel/array/scale")


def param_specs(state: Any, mesh: Mesh, rules: dict[str, Any] = sharding.DEFAULT_RULES) -> Any:
    """The PartitionSpec of every leaf of a model's nnx state (abstract or concrete; the same structure, each
    Variable holding its spec): the logical axes the parameter itself carries, mapped onto `mesh` by `rules`
    (`sharding.logical_spec`). Scalars and the leaves declared above are replicated; any other leaf without
    logical axes is a PDLMError naming it."""

    def spec(key_path, leaf):
        path = sharding.path_str(key_path)
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        axes = _axes(leaf) if isinstance(leaf, nnx.Variable) else None
        if axes is None:
            if not (isinstance(leaf, REPLICATED_TYPES) or len(value.shape) == 0
                    or any(path == s or path.endswith("/" + s) for s in REPLICATED_SUFFIXES)):
                raise PDLMError(f"leaf {path!r} has no logical axes; annotate it in the model (common.init) or, "
                                "if it should be whole on every device, declare it in layout.REPLICATED_TYPES / "
                                "REPLICATED_SUFFIXES")
            axes = (None,) * len(value.shape)
        if len(axes) != len(value.shape):
            raise PDLMError(f"leaf {path!r} has {len(value.shape)} dimension(s) but {len(axes)} logical axes "
                            f"{axes}")
        out = sharding.logical_spec(value.shape, axes, mesh, rules)
        return leaf.replace(out) if isinstance(leaf, nnx.Variable) else out

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: Mesh, rules: dict[str, Any] = sharding.DEFAULT_RULES) -> Any:
    """`param_specs` as NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, rules))


def model_shardings(cfg: PDLMConfig, mesh: Mesh, rules: dict[str, Any] = sharding.DEFAULT_RULES) -> dict:
    """The shardings of `PerceptionDLM(cfg)`'s parameters as a nested dict (the paths of
    keymap.expected_shapes: a checkpoint's tree)."""
    return nnx.to_pure_dict(param_shardings(abstract_params(cfg), mesh, rules))
