"""Device mesh, logical-axis rules and partition specs (shared by training and inference).

Parameters and activations are described by *logical* axis names ('embed', 'heads', 'mlp', 'vocab',
'layers', 'batch', 'length'); a rules table maps each name to mesh axes of a ('data', 'fsdp', 'tensor')
mesh. A dimension that does not divide evenly over its mesh axes falls back to replication, so one
rules table serves every model size and mesh shape (1 CPU, 8 fake devices, a pod).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdlm_jax.errors import PDLMError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}

# Logical axes of every parameter of the model, by path in the keymap contract (keymap.expected_shapes).
# Regexes match the end of a leaf path (so optimizer states like ".../mu/lm/embed/embedding" follow their
# parameter), first match wins; an unknown path is replicated.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"lm/embed/embedding", ("vocab", "embed")),
    (r"lm/lm_head/kernel", ("embed", "vocab")),
    (r"(lm|vision)/layers/attn/[qkv]/kernel", ("layers", "embed", "heads")),
    (r"(lm|vision)/layers/attn/[qkv]/bias", ("layers", "heads")),
    (r"(lm|vision)/layers/attn/o/kernel", ("layers", "heads", "embed")),
    (r"lm/layers/mlp/(gate|up)/kernel", ("layers", "embed", "mlp")),
    (r"lm/layers/mlp/down/kernel", ("layers", "mlp", "embed")),
    (r"vision/layers/mlp/fc1/kernel", ("layers", "embed", "mlp")),
    (r"vision/layers/mlp/fc1/bias", ("layers", "mlp")),
    (r"vision/layers/mlp/fc2/kernel", ("layers", "mlp", "embed")),
    (r"(lm|vision)/layers/.*", ("layers", None)),  # norms and remaining biases
    (r"vision/patch_embed/kernel", (None, None, None, "embed")),
    (r"vision/pos_embed/embedding", (None, "embed")),
    (r"projector/fc1/kernel", ("embed", "mlp")),
    (r"projector/fc1/bias", ("mlp",)),
    (r"projector/fc2/kernel", ("mlp", "embed")),
    (r"mask_embed/embedding", (None, "embed")),
)
_PARAM_AXES = tuple((re.compile(rf"(?:^|/){p}$"), axes) for p, axes in PARAM_AXES)


# ---- mesh ---------------------------------------------------------------------------------------


def parse_mesh(spec: str | dict[str, int] | None, num_devices: int) -> dict[str, int]:
    """'data:2,fsdp:2,tensor:2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}; one size may be -1 (fill).

    Missing axes have size 1; None means all devices on 'data'.
    """
    if spec is None or spec == "":
        sizes = {"data": -1}
    elif isinstance(spec, dict):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in str(spec).split(","):
            name, sep, size = part.partition(":")
            try:
                sizes[name.strip()] = int(size)
            except ValueError:
                raise PDLMError(f"mesh spec {spec!r}: expected 'axis:size' pairs like 'data:2,fsdp:4'") from None
            if not sep:
                raise PDLMError(f"mesh spec {spec!r}: expected 'axis:size' pairs like 'data:2,fsdp:4'")
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise PDLMError(f"mesh spec {spec!r}: unknown axes {sorted(unknown)}; use {MESH_AXES}")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1 or any(v < 1 and v != -1 for v in sizes.values()):
        raise PDLMError(f"mesh spec {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise PDLMError(f"mesh spec {spec!r}: {num_devices} devices do not divide by {known}")
        sizes[fill[0]] = num_devices // known
    full = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if math.prod(full.values()) != num_devices:
        raise PDLMError(
            f"mesh spec {spec!r} needs {math.prod(full.values())} devices but {num_devices} are available; "
            "make the sizes multiply to the device count (or use -1 for one axis)"
        )
    return full


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all (global) devices, 'tensor' varying fastest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-TPU topologies: plain row-major order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


# ---- logical axes -> partition specs ---------------------------------------------------------------


def logical_spec(
    shape: Sequence[int],
    logical: Sequence[str | None],
    mesh: Mesh,
    rules: dict[str, Any] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes; replicate dims that do not divide."""
    used: set[str] = set()
    out = []
    for size, name in zip(shape, logical):
        axes = rules.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for rx, axes in _PARAM_AXES:
        if rx.search(path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def path_str(key_path: tuple) -> str:
    """'/'-joined path of a pytree leaf (dict keys and attribute names; nnx's `.value` is dropped)."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_specs(tree: Any, mesh: Mesh, rules: dict[str, Any] = DEFAULT_RULES) -> Any:
    """Tree of PartitionSpecs (same structure as `tree`, leaves arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: logical_spec(x.shape, param_logical_axes(path_str(kp), len(x.shape)), mesh, rules), tree
    )


def param_shardings(tree: Any, mesh: Mesh, rules: dict[str, Any] = DEFAULT_RULES) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: dict[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a per-example array: leading 'batch' axis, everything else replicated."""
    logical = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_spec(shape, logical, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
