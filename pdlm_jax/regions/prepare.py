"""Host-side preparation of one denoising pass: image tiles, sorted masks, boxes, prompt layout (SPEC §0.1-2)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.roi_replay import roi_boxes
from pdlm_jax.region_batch import RegionBatch
from pdlm_jax.regions.masks import (MaskInput, area_order, load_masks, mask_box, patch_activity,
                                    visual_prompt_tiles)
from pdlm_jax.regions.prompt import DEFAULT_QUESTION, PromptLayout, build_layout, build_prompt_text
from pdlm_jax.regions.tiling import TiledImage
from pdlm_jax.regions.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PreparedRegions:
    """One pass over k ≤ prompt_numbers regions; every per-region array is in area-sorted order."""

    pixel_values: np.ndarray  # (T, S, S, 3) float32
    mask_patches: np.ndarray  # (k, T, g, g) bool: patches whose mask-id embedding is added (SPEC §3.1)
    prompt_ids: np.ndarray  # (k,) int32: region c uses mask_id_embedding[prompt_ids[c]] (= c at inference)
    boxes: np.ndarray  # (k, 4) float64 normalised (x_min, y_min, x_max, y_max), inclusive extents
    roi_boxes: np.ndarray  # (k, 4) float32 boxes for `ops.roi_replay.roi_replay` (inference conversion)
    order: np.ndarray  # (k,) original index (in the given mask list) of each sorted region
    areas: np.ndarray  # (k,) int64 pixel areas, sorted order
    grid: tuple[int, int]  # (columns, rows)
    layout: PromptLayout
    prompt_text: str

    def inputs(self) -> RegionBatch:
        """The model's inputs for this pass: an unpadded row (pad it to a bucket with `RegionBatch.padded`)."""
        return region_inputs(self.pixel_values.astype(np.float32), self.grid, self.mask_patches, self.prompt_ids,
                             self.roi_boxes, self.layout)


def region_inputs(pixel_values: np.ndarray, grid: tuple[int, int], mask_patches: np.ndarray, prompt_ids: np.ndarray,
                  roi_boxes: np.ndarray, layout: PromptLayout) -> RegionBatch:
    """An unpadded row of the model's inputs from the tiles, the regions' arrays (area-sorted) and their prompt
    layout; inference (`PreparedRegions.inputs`) and training (`train.samples.build_sample`) both build it here."""
    return RegionBatch(pixel_values=pixel_values, mask_patches=mask_patches, prompt_ids=prompt_ids,
                       grid=np.asarray(grid, np.int32), num_tiles=np.int32(pixel_values.shape[0]), roi_boxes=roi_boxes,
                       input_ids=layout.input_ids, image_positions=layout.image_positions,
                       roi_positions=layout.roi_positions, block_id=layout.block_id, roi_owner=layout.roi_owner,
                       prefix_visible=layout.prefix_visible, valid=layout.valid)


def prepare_regions(tiled: TiledImage, masks: Sequence[MaskInput], tokenizer: Tokenizer, cfg: PDLMConfig,
                    gen_length: int, question: str = DEFAULT_QUESTION) -> PreparedRegions:
    """Everything the jitted pass needs, computed on the host (unpadded: `RegionBatch.padded` pads the row).

    More masks than `prompt_numbers` must be split into chunks by the caller (one pass per chunk).
    """
    region = cfg.region
    if gen_length < 1:
        raise PDLMError(f"gen_length must be at least 1 (got {gen_length})")
    if len(masks) > region.prompt_numbers:
        raise PDLMError(f"{len(masks)} masks in one pass; the model has {region.prompt_numbers} prompt ids, "
                        "so caption them in chunks of at most that many")
    loaded = load_masks(masks, tiled.size)
    areas = np.array([m.sum() for m in loaded], dtype=np.int64)
    order = area_order(areas)
    sorted_masks = [loaded[i] for i in order]
    k = len(sorted_masks)

    mask_patches = np.stack([patch_activity(visual_prompt_tiles(m, c, tiled.grid, region), region)
                             for c, m in enumerate(sorted_masks)])
    boxes = np.array([mask_box(m) for m in sorted_masks], dtype=np.float64)
    text = build_prompt_text(tiled.num_tiles, region.num_image_tokens, k, gen_length, question)
    layout = build_layout(tokenizer.encode(text), tokenizer.special, k, region.roi_tokens, gen_length,
                          tiled.num_tiles * region.num_image_tokens)
    return PreparedRegions(
        pixel_values=tiled.pixel_values,
        mask_patches=mask_patches,
        prompt_ids=np.arange(k, dtype=np.int32),
        boxes=boxes,
        roi_boxes=roi_boxes(boxes, tiled.grid, region, cfg.quirks),
        order=order,
        areas=areas[order],
        grid=tiled.grid,
        layout=layout,
        prompt_text=text,
    )
