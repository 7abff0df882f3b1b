"""Device mesh, logical-axis rules and partition specs (shared by training and inference).

Parameters and activations are described by *logical* axis names ('embed', 'heads', 'mlp', 'vocab',
'layers', 'norm', 'batch', 'length'): a parameter's names are the ones the model annotates it with,
which it carries as metadata; a rules table maps each name to mesh axes of a ('data', 'fsdp', 'tensor')
mesh. A dimension that does not divide evenly over its mesh axes falls back to replication, so one
rules table serves every model size and mesh shape (1 CPU, 8 fake devices, a pod).

This module knows nothing of the model (the model imports it): the parameters' specs and shardings, which read
each parameter's own axes, are `pdlm_jax.modeling.layout.param_specs` / `param_shardings`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdlm_jax.errors import PDLMError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). Parameters take their logical names from the
# model's annotations (`pdlm_jax.modeling.layout.param_specs`); this table is the only place they meet the mesh.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,  # norm scales and biases: a few KB per layer, kept whole next to the activations they scale
}


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
    """A ('data', 'fsdp', 'tensor') mesh over all (global) devices, 'tensor' varying fastest.

    jax orders the devices: along the TPU torus, by id on GPUs, as given elsewhere.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # splitting a physical TPU axis only where no whole ones fit (data:2 on a 4x4x4 pod)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except AssertionError:  # jax's check that TPU devices fill a block of the torus: a subset may not
        log.warning("make_mesh: these %d %s devices are not a whole block of the TPU torus; using them in the "
                    "order given (collectives may be slower)", len(devices), devices[0].device_kind)
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


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: dict[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a per-example array: leading 'batch' axis, everything else replicated."""
    logical = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_spec(shape, logical, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
