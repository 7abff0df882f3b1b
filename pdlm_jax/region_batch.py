"""`RegionBatch`: the model's input, one typed struct shared by inference (`pipeline`) and training (`train`).

It holds what `PerceptionDLM.embed_inputs` needs (the vision path, RoI replay, embedding assembly) and the
per-token segment arrays of the structured attention mask. Each field declares its shape, so the shapes are
documented and checked in one place. A *row* (one pass or one training sample) has the shapes below; a batch
adds a leading axis B (`stack`). Symbols: T tiles (thumbnail last; a training batch pads tiles beyond
`num_tiles` with zeros), S tile side in pixels, g vision patches per side, P regions (≤ prompt_numbers; padded
regions have no mask patches and point past the sequence), R RoI tokens per region (roi_output_size²), n image
tokens per tile, L sequence length (right-padded: `valid` False). Positions ≥ L are dropped by the on-device
scatters, which is how padded tiles and regions become no-ops.

Host code builds an unpadded row (`regions.prepare.region_inputs` for inference and training samples; a Base
conversation, which has no regions, in `train.conversations`), pads it to a static bucket with `padded` and
stacks rows with `stack`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.structured_mask import allowed_mask


def _field(shape: str, kind, pad):
    """A field of `shape` (space-separated dims: symbols, ints, or products like T*n), dtype `kind` (a jnp
    abstract type) and the value `padded` fills in (None: the pad id, "L": the padded length)."""
    return struct.field(metadata={"shape": tuple(shape.split()), "kind": kind, "pad": pad})


_FLOAT, _INT, _BOOL = jnp.floating, jnp.integer, jnp.bool_


@struct.dataclass
class RegionBatch:
    """The model's input (see the module docstring); shapes of a row, a batch has a leading B."""

    pixel_values: jax.Array = _field("T S S 3", _FLOAT, 0)  # NHWC tiles, normalised, float32
    mask_patches: jax.Array = _field("P T g g", _BOOL, False)  # patches that get region c's mask-id embedding
    prompt_ids: jax.Array = _field("P", _INT, 0)  # region c uses mask_id_embedding[prompt_ids[c]]
    grid: jax.Array = _field("2", _INT, 0)  # (columns, rows) of the tile grid
    num_tiles: jax.Array = _field("", _INT, 0)  # real tiles (≤ T)
    roi_boxes: jax.Array = _field("P 4", _FLOAT, 0)  # `ops.roi_replay.roi_boxes` (for inference or training)
    input_ids: jax.Array = _field("L", _INT, None)  # RoI-expanded token ids
    image_positions: jax.Array = _field("T*n", _INT, "L")  # where the image tokens go, tile by tile
    roi_positions: jax.Array = _field("P R", _INT, "L")  # region c's RoI span
    block_id: jax.Array = _field("L", _INT, -1)  # caption block of each position, -1 outside (SPEC §8)
    roi_owner: jax.Array = _field("L", _INT, -1)  # region whose RoI span holds the position, else -1
    prefix_visible: jax.Array = _field("L", _BOOL, False)  # the "fix prompt" every caption row sees
    valid: jax.Array = _field("L", _BOOL, False)  # False for right padding

    def attention_mask(self) -> jax.Array:
        """The structured attention mask (B, L, L) of a batch, True = query row may attend to key column."""
        return jax.vmap(allowed_mask)(self.block_id, self.roi_owner, self.prefix_visible, self.valid)

    def check(self, cfg: PDLMConfig, batched: bool = True) -> "RegionBatch":
        """Raise PDLMError naming the field if one is missing or its shape or dtype disagrees with the others or
        with `cfg`; works on arrays, tracers and ShapeDtypeStructs (shapes only: free under jit)."""
        dims = {"S": cfg.region.image_size, "g": cfg.vision.grid_size, "R": cfg.region.roi_tokens,
                "n": cfg.region.num_image_tokens}
        lead = ("B",) if batched else ()
        for f in dataclasses.fields(self):
            value, spec = getattr(self, f.name), lead + f.metadata["shape"]
            if value is None or not hasattr(value, "shape"):
                raise PDLMError(f"RegionBatch.{f.name} is missing: expected an array of shape ({', '.join(spec)})")
            if len(spec) == len(value.shape):  # the first field naming a symbol fixes it
                dims.update({s: d for s, d in zip(spec, value.shape) if s.isalpha() and s not in dims})
            expected = tuple(_size(s, dims) for s in spec)
            if tuple(value.shape) != expected or not jnp.issubdtype(value.dtype, f.metadata["kind"]):
                raise PDLMError(f"RegionBatch.{f.name} has shape {tuple(value.shape)} and dtype {value.dtype}; "
                                f"expected {expected} of {f.metadata['kind'].__name__} (given the other fields and "
                                "the model config): build inputs with pdlm_jax.regions / train.samples")
        if dims["P"] > cfg.region.prompt_numbers:
            raise PDLMError(f"RegionBatch has {dims['P']} regions; the model has {cfg.region.prompt_numbers} "
                            "prompt ids")
        return self

    def padded(self, tiles: int, regions: int, length: int, pad_id: int) -> "RegionBatch":
        """This (unbatched) row right-padded to `tiles`, `regions` and `length` (a static bucket); input_ids
        with `pad_id`, positions with L (dropped), the rest with each field's neutral value."""
        per_tile = np.shape(self.image_positions)[0] // np.shape(self.pixel_values)[0]
        sizes = {"T": tiles, "P": regions, "L": length, "T*n": tiles * per_tile}
        fills = {None: pad_id, "L": length}
        out = {}
        for f in dataclasses.fields(self):
            value = np.asarray(getattr(self, f.name))
            shape = tuple(sizes.get(s, d) for s, d in zip(f.metadata["shape"], value.shape))
            if any(have > want for have, want in zip(value.shape, shape)):
                raise PDLMError(f"cannot pad RegionBatch.{f.name} of shape {value.shape} to {shape}")
            pad = f.metadata["pad"]
            out[f.name] = np.full(shape, fills.get(pad, pad), value.dtype)
            out[f.name][tuple(slice(0, d) for d in value.shape)] = value
        return RegionBatch(**out)


def _size(symbol: str, dims: dict) -> int | str:
    """A dim's size given the bound symbols (the symbol itself while unbound)."""
    if symbol.isdigit():
        return int(symbol)
    parts = symbol.split("*")
    return math.prod(dims[p] for p in parts) if all(p in dims for p in parts) else symbol


def stack(rows: Sequence):
    """Stack unbatched structs (RegionBatch or any struct of arrays) into a batch along a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)
