"""RoI feature replay and embedding assembly (SPEC §7).

The reference merges the projected tiles into one feature map, RoI-Aligns each region's box on it and
splices the R² vectors in place of the region's `<|reserved_token_i|>`. We never build the merged map on
the hot path: the RoI-Align samples read the tiles directly through an index mapping, so the grid may be a
traced value and one program serves every grid of the same tile count.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from pdlm_jax.config import Quirks, RegionConfig
from pdlm_jax.ops.roi_align import roi_align_gather


def _stride(quirks: Quirks, training: bool) -> int:
    return quirks.roi_training_stride if training else quirks.roi_inference_stride


def roi_boxes(boxes: np.ndarray, grid: tuple[int, int], region: RegionConfig, quirks: Quirks,
              training: bool = False) -> np.ndarray:
    """Normalised (k, 4) boxes -> the float32 boxes the reference passes to RoI-Align (SPEC §7.2.4).

    Done on the host in float64 like the reference: `x1 * orig_w * ss` with orig_w = Wf * stride and
    ss = Wf / orig_w, i.e. feature-map units; RoI-Align then applies `roi_spatial_scale` on top.
    """
    cols, rows = grid
    wf, hf = cols * region.feature_grid, rows * region.feature_grid
    orig_w, orig_h = wf * _stride(quirks, training), hf * _stride(quirks, training)
    ss = wf / orig_w
    b = np.asarray(boxes, dtype=np.float64)
    out = np.stack([b[:, 0] * orig_w * ss, b[:, 1] * orig_h * ss, b[:, 2] * orig_w * ss, b[:, 3] * orig_h * ss], 1)
    return out.astype(np.float32)


def roi_spatial_scale(quirks: Quirks, training: bool = False) -> float:
    """Scale RoI-Align applies to the already converted boxes: 1/stride again (§14.1) or 1 when fixed."""
    return 1.0 / _stride(quirks, training) if quirks.roi_double_scaling else 1.0


def _tile_shift(num_tiles, quirks: Quirks):
    """§14.3: the merged map starts at tile 1 (tile 0 dropped, thumbnail kept) whenever T > 1."""
    return jnp.where(jnp.asarray(num_tiles) > 1, 1, 0) if quirks.roi_tile_shift else 0


def roi_replay(vision_embeds: jnp.ndarray, grid, boxes: jnp.ndarray, region: RegionConfig, quirks: Quirks,
               training: bool = False, num_tiles=None) -> jnp.ndarray:
    """RoI vectors (k, R², H) for the `roi_boxes` of each region, in row-major cell order.

    vision_embeds (T, n, H) may hold padding tiles beyond `num_tiles` (default T); `grid` = (cols, rows)
    may be traced. RoI-Align runs in float32 and the result is cast back to the embedding dtype.
    """
    f = region.feature_grid
    t = vision_embeds.shape[0] if num_tiles is None else num_tiles
    cols, rows = jnp.asarray(grid[0], jnp.int32), jnp.asarray(grid[1], jnp.int32)
    shift = _tile_shift(t, quirks)
    feats = vision_embeds.astype(jnp.float32)

    def fetch(y, x):  # merged-map cell (y, x) -> tile (y//f)·cols + x//f (+ shift), token (y%f)·f + x%f
        tile = shift + (y // f) * cols + x // f
        return feats[tile, (y % f) * f + x % f]

    r = region.roi_output_size
    out = roi_align_gather(fetch, boxes, (r, r), rows * f, cols * f, roi_spatial_scale(quirks, training),
                           sampling_ratio=2, aligned=True)
    return out.reshape(boxes.shape[0], r * r, -1).astype(vision_embeds.dtype)


def assemble_embeddings(token_embeds: jnp.ndarray, vision_embeds: jnp.ndarray, roi_vectors: jnp.ndarray,
                        image_positions: jnp.ndarray, roi_positions: jnp.ndarray) -> jnp.ndarray:
    """Scatter vision rows (tile order, thumbnail last) and RoI vectors into the token embeddings (L, H).

    Positions >= L are dropped, so padded tiles/regions of a bucket can point past the end.
    """
    h = token_embeds.shape[-1]
    out = token_embeds.at[image_positions].set(vision_embeds.reshape(-1, h).astype(token_embeds.dtype),
                                               mode="drop")
    return out.at[roi_positions.reshape(-1)].set(roi_vectors.reshape(-1, h).astype(token_embeds.dtype),
                                                 mode="drop")
