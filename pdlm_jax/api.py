"""Python API: `pdlm_jax.load(checkpoint_dir)` → a handle whose `caption_regions` captions masked regions.

    import pdlm_jax
    model = pdlm_jax.load("checkpoints/perceptiondlm", dtype="bfloat16")
    result = model.caption_regions("photo.jpg", ["mask0.png", "mask1.png"], gen_length=32, steps=32)
    for region in result["regions"]:
        print(region["caption"])

The result is the same object `pdlm-infer` writes as JSON (schema in `RegionCaptioner.caption_regions`).
"""

from __future__ import annotations

import logging
import numbers
import time
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from pdlm_jax import pipeline
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.pdm import PerceptionDLM, from_tree
from pdlm_jax.regions.masks import MaskInput, area_order, load_masks
from pdlm_jax.regions.prepare import PreparedRegions, prepare_regions
from pdlm_jax.regions.prompt import DEFAULT_QUESTION
from pdlm_jax.regions.tiling import ImageInput, TiledImage, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer

log = logging.getLogger("pdlm_jax")

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n"


def reference_captions(text: str, num_regions: int) -> list[str]:
    """The reference demo's `split_assistant_blocks` (SPEC §10) on the decoded full sequence.

    Takes the text after the last assistant header, cuts it at the FIRST `<|eot_id|>` (so a caption that
    contains `<|eot_id|>` ends there and every later caption is lost), then splits on the markers.
    """
    pieces = text.split(ASSISTANT_HEADER)
    body = pieces[-1].split("<|eot_id|>")[0] if len(pieces) > 1 else text
    captions = []
    for i in range(num_regions):
        tag = f"<|Mask_Cap_{i}|>"
        start = body.find(tag)
        if start == -1:
            captions.append("")
            continue
        start += len(tag)
        end = body.find(f"<|Mask_Cap_{i + 1}|>", start) if i < num_regions - 1 else len(body)
        captions.append(body[start:(len(body) if end == -1 else end)].strip())
    return captions


def check_settings(gen_length: int, steps: int, temperature: float = 0.0, top_p: float = 1.0,
                   num_masks: int | None = None, prompt_numbers: int = 6) -> None:
    """Raise PDLMError for unusable sampler settings (cheap: call it before loading a model).

    With `num_masks`, also checks steps <= k·gen_length for the smallest pass (masks beyond
    prompt_numbers are captioned in chunks, the last one holding the remainder).
    """
    if not isinstance(gen_length, numbers.Integral) or gen_length < 1:
        raise PDLMError(f"gen_length must be a positive integer (caption slots per region), got {gen_length!r}")
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise PDLMError(f"steps must be a positive integer (denoising steps), got {steps!r}")
    if not temperature >= 0:
        raise PDLMError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise PDLMError(f"top_p must be in (0, 1], got {top_p!r}")
    if num_masks:
        smallest = num_masks if num_masks <= prompt_numbers else (num_masks % prompt_numbers or prompt_numbers)
        if steps > smallest * gen_length:
            raise PDLMError(f"steps={steps} exceeds the {smallest * gen_length} caption slots of a {smallest}-region "
                            f"pass (gen_length={gen_length}); use steps <= {smallest * gen_length}")


class RegionCaptioner:
    """A loaded model, its tokenizer and its compiled programs (one per input bucket)."""

    def __init__(self, cfg: PDLMConfig, model: PerceptionDLM, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.program = pipeline.CaptionProgram(model, cfg, tokenizer.special.mask)

    def caption_regions(self, image: ImageInput | TiledImage, masks: Sequence[MaskInput], gen_length: int = 32,
                        steps: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                        question: str = DEFAULT_QUESTION, seed: int = 0, reference_parser: bool = False) -> dict:
        """Caption every mask of `image`; returns a JSON-ready dict.

        image: path, PIL image, uint8 array or an already tiled `TiledImage`; masks: paths, PIL images or
        arrays (nonzero = inside), one per region. More than `prompt_numbers` (6) masks are captioned in
        chunks of 6 in descending-area order, one denoising pass per chunk (captions within a chunk depend on
        each other). `steps` may not exceed k·gen_length for the smallest chunk's k. Greedy (temperature 0)
        reproduces the reference; temperature > 0 samples with `seed` (chunk c uses seed + c) and `top_p`
        nucleus filtering (the reference ignores top_p).

        Result: {"regions": [one record per mask, in the order given: index, caption, token_ids (its
        gen_length generated ids), bbox (normalised x_min, y_min, x_max, y_max of the inclusive pixel
        extents, as the reference), prompt_id, area, chunk], "image": {width, height, grid, tiles}, the
        settings, "parser", "seconds" (wall time of the call, compilation included), "compile_seconds",
        "forwards" (LM forward passes, all chunks), "tokens_per_forward" (generated tokens / forwards)}.
        `reference_parser=True` takes captions from the reference demo's string parser (SPEC §10) instead of
        decoding each block's own tokens without special tokens.
        """
        start = time.perf_counter()
        per_pass = self.cfg.region.prompt_numbers
        check_settings(gen_length, steps, temperature, top_p, len(masks), per_pass)
        tiled = image if isinstance(image, TiledImage) else tile_image(image, self.cfg.region)
        loaded = load_masks(masks, tiled.size)
        order = area_order([int(m.sum()) for m in loaded])
        chunks = [sorted(int(j) for j in order[i:i + per_pass]) for i in range(0, len(order), per_pass)]

        records: list[dict | None] = [None] * len(loaded)
        forwards = compile_seconds = 0.0
        for c, members in enumerate(chunks):
            # Members in input order: the pass sorts them by area itself, with the same tie rule as above.
            prep = prepare_regions(tiled, [loaded[j] for j in members], self.tokenizer, self.cfg, gen_length,
                                   question)
            tokens, n, seconds = self._run_pass(prep, gen_length, steps, temperature, top_p, seed + c)
            log.info("pass %d/%d: %d region(s), %d forwards%s", c + 1, len(chunks), len(members), n,
                     f" (compiled in {seconds:.1f} s)" if seconds else "")
            forwards += n
            compile_seconds += seconds
            captions = self._captions(prep, tokens, reference_parser)
            for slot, local in enumerate(prep.order):
                j = members[local]
                records[j] = {"index": j, "caption": captions[slot], "token_ids": tokens[slot].tolist(),
                              "bbox": [float(v) for v in prep.boxes[slot]], "prompt_id": int(prep.prompt_ids[slot]),
                              "area": int(prep.areas[slot]), "chunk": c}

        generated = len(loaded) * gen_length
        return {
            "regions": records,
            "image": {"width": tiled.size[0], "height": tiled.size[1], "grid": list(tiled.grid),
                      "tiles": tiled.num_tiles},
            "gen_length": gen_length, "steps": steps, "temperature": temperature, "top_p": top_p,
            "question": question, "seed": seed, "parser": "reference" if reference_parser else "blocks",
            "seconds": time.perf_counter() - start,
            "compile_seconds": compile_seconds,
            "forwards": int(forwards),
            "tokens_per_forward": generated / forwards,
        }

    def _run_pass(self, prep: PreparedRegions, gen_length: int, steps: int, temperature: float, top_p: float,
                  seed: int) -> tuple[np.ndarray, int, float]:
        """Slot tokens (k, G) in area order, forwards run, compile seconds."""
        k = prep.layout.num_regions
        bucket = pipeline.choose_bucket(prep.pixel_values.shape[0], k, gen_length, prep.layout.length,
                                        self.cfg.region.prompt_numbers, temperature, top_p)
        inputs = pipeline.pass_inputs(prep, bucket, self.cfg, self.tokenizer.special.eot, steps, temperature,
                                         top_p, seed)
        tokens, forwards, compile_seconds = self.program.run(bucket, inputs)
        return tokens[:k], forwards, compile_seconds

    def full_sequence(self, prep: PreparedRegions, tokens: np.ndarray) -> np.ndarray:
        """The reference's returned ids: the RoI-expanded prompt with the generated slots filled in."""
        ids = prep.layout.input_ids[: prep.layout.length].copy()
        ids[prep.layout.gen_positions] = tokens
        return ids

    def _captions(self, prep: PreparedRegions, tokens: np.ndarray, reference_parser: bool) -> list[str]:
        if reference_parser:
            text = self.tokenizer.decode(self.full_sequence(prep, tokens), skip_special_tokens=False)
            return reference_captions(text, len(tokens))
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def load(checkpoint_dir: str | Path, dtype: str = "bfloat16", compilation_cache: str | Path | None = None
         ) -> RegionCaptioner:
    """Load a checkpoint converted by `pdlm-convert` (config, weights, tokenizer) for region captioning.

    dtype: "bfloat16" (the reference's inference dtype) or "float32". compilation_cache: a folder for JAX's
    persistent compilation cache, so later processes skip compiling the same buckets.
    """
    from pdlm_jax.checkpoint import restore_params, tokenizer_path

    if dtype not in DTYPES:
        raise PDLMError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg, tree = restore_params(checkpoint_dir, dtype=DTYPES[dtype])  # PDLMError if not a converted checkpoint
    tokenizer = Tokenizer(tokenizer_path(checkpoint_dir))
    if compilation_cache is not None:
        pipeline.enable_compilation_cache(str(compilation_cache))
    return RegionCaptioner(cfg, from_tree(cfg, tree, dtype=DTYPES[dtype]), tokenizer)
