"""The parameters of PerceptionDLM as the model itself declares them: path, shape and logical axes.

The model is built abstractly (`nnx.eval_shape`, nothing allocated, fast even for the 8B preset); each
parameter's logical axes are the names its initialiser is annotated with (`common.init`, plus 'layers' for
stacked layers). The converter's contract (`keymap.expected_shapes`) and the shardings
(`sharding.param_specs`, through the logical-rules table) are both read from here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Mapping

from flax import nnx

from pdlm_jax.config import PDLMConfig
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
