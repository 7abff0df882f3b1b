"""Host-side preprocessing: tiling, masks, tokenizer, prompt layout (SPEC §5, §6)."""

from pdlm_jax.regions.masks import area_order, load_mask, load_masks, mask_box
from pdlm_jax.regions.prepare import PreparedRegions, prepare_regions
from pdlm_jax.regions.prompt import DEFAULT_QUESTION, PromptLayout, build_layout, build_prompt_text
from pdlm_jax.regions.tiling import TiledImage, select_grid, tile_image
from pdlm_jax.regions.tokenizer import SpecialTokens, Tokenizer

__all__ = ["DEFAULT_QUESTION", "PreparedRegions", "PromptLayout", "SpecialTokens", "TiledImage", "Tokenizer",
           "area_order", "build_layout", "build_prompt_text", "load_mask", "load_masks", "mask_box",
           "prepare_regions", "select_grid", "tile_image"]
