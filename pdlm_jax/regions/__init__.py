"""Host-side preprocessing: tiling, masks, tokenizer, prompt layout (SPEC §5, §6).

The names below are imported on first use (PEP 562): `pdlm_jax.regions.masks` alone does not pull in the
tokenizer or JAX.
"""

import importlib

_PUBLIC = {  # name -> the module that defines it
    "DEFAULT_QUESTION": "prompt", "PromptLayout": "prompt", "build_layout": "prompt", "build_prompt_text": "prompt",
    "PreparedRegions": "prepare", "prepare_regions": "prepare",
    "SpecialTokens": "tokenizer", "Tokenizer": "tokenizer",
    "TiledImage": "tiling", "select_grid": "tiling", "tile_image": "tiling",
    "area_order": "masks", "load_mask": "masks", "load_masks": "masks", "mask_box": "masks",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
