"""The most work one call may ask for, checked on the host before anything is tiled, compiled or allocated.

Positions: a region pass holds the prompt (image tokens, RoI spans, question) plus k·(G+2) caption rows
(a marker, G slots and a separator per region); a Base answer holds the prompt plus G answer rows. Both must
fit the checkpoint's position budget: LLaDA's `max_position_embeddings` from the reference config the
checkpoint was converted from (`reference_config.json`), else 4096, the context LLaDA-8B was trained with.
RoPE itself has no hard end; beyond the trained context the model's output is meaningless and the work
(memory grows with the square of the length) unbounded. The check uses the real tile count of the image when
it is known and the largest tiling otherwise, so the declared `max_gen_length` holds for every image.

Image sizes (pixels, images and mask files alike) and the mask count per image are the handle's or the
server's settings; over-size inputs raise `TooLarge` (HTTP 413 in pdlm-serve), the rest `PDLMError` (400).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path

from PIL import Image

from pdlm_jax.config import PDLMConfig, RegionConfig
from pdlm_jax.errors import PDLMError, TooLarge
from pdlm_jax.files import local_directory
from pdlm_jax.regions.prompt import build_prompt_text, build_question_text

DEFAULT_MAX_POSITIONS = 4096  # LLaDA-8B's max_position_embeddings
DEFAULT_MAX_MASKS = 64
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def position_budget(checkpoint_dir: str | Path | None) -> int:
    """The LM's trained context: the reference config's `max_position_embeddings` (or LLaDA's
    `max_sequence_length`), else `DEFAULT_MAX_POSITIONS`."""
    if checkpoint_dir is None:
        return DEFAULT_MAX_POSITIONS
    path = local_directory(checkpoint_dir, "checkpoint") / "reference_config.json"
    if not path.is_file():
        return DEFAULT_MAX_POSITIONS
    lm = json.loads(path.read_text()).get("language_model_config") or {}
    value = lm.get("max_position_embeddings") or lm.get("max_sequence_length")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_POSITIONS


def num_tiles(size: tuple[int, int], region: RegionConfig) -> int:
    """Tiles (thumbnail included) of an image of `size` (W, H), without resizing it."""
    from pdlm_jax.regions.tiling import select_grid

    cols, rows = select_grid(size[0], size[1], region)
    return cols * rows + (1 if region.use_thumbnail and cols * rows > 1 else 0)


def image_file_size(path: str | Path, what: str, max_pixels: int) -> tuple[int, int]:
    """(W, H) of an image file from its header (no pixel data is decoded); TooLarge above `max_pixels`,
    PDLMError when Pillow cannot read it."""
    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError:
        raise TooLarge(f"{what} file {path} is over Pillow's decompression-bomb limit of "
                       f"{2 * Image.MAX_IMAGE_PIXELS} pixels (and over the limit of {max_pixels}); send a smaller "
                       "image") from None
    except (OSError, ValueError) as e:
        raise PDLMError(f"cannot read {what} file {path}: {e}") from e
    check_pixels(size, what, max_pixels)
    return size


def check_pixels(size: tuple[int, int], what: str, max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise TooLarge(f"{what} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit of "
                       f"{max_pixels} (max_image_pixels / --max-image-pixels); send a smaller image")


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds of one model handle (`handle.limits`); `describe()` lists them (pdlm-serve's /v1/model)."""

    cfg: PDLMConfig
    tokenizer: object  # pdlm_jax.regions.tokenizer.Tokenizer
    max_positions: int = DEFAULT_MAX_POSITIONS
    max_masks: int = DEFAULT_MAX_MASKS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        for name in ("max_positions", "max_masks", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PDLMError(f"{name} must be a positive integer, got {value!r}")

    @property
    def largest_tiling(self) -> int:
        r = self.cfg.region
        return r.max_tiles + (1 if r.use_thumbnail and r.max_tiles > 1 else 0)

    def _tiles(self, image_size: tuple[int, int] | None) -> int:
        return self.largest_tiling if image_size is None else num_tiles(image_size, self.cfg.region)

    # ---- positions ----------------------------------------------------------------------------------

    def region_positions(self, num_regions: int, gen_length: int, question: str, tiles: int) -> int:
        """Sequence length of a region pass: the tokenized prompt with RoI spans, plus k·G slots."""
        r = self.cfg.region
        text = build_prompt_text(tiles, r.num_image_tokens, num_regions, 0, question)
        return len(self.tokenizer.encode(text)) + num_regions * (r.roi_tokens - 1 + gen_length)

    def answer_positions(self, gen_length: int, question: str, tiles: int) -> int:
        """Sequence length of a Base answer: the tokenized chat prompt plus G answer rows."""
        text = build_question_text(question, tiles, self.cfg.region.num_image_tokens)
        return len(self.tokenizer.encode(text)) + gen_length

    def max_gen_length(self, num_regions: int | None = None, question: str | None = None,
                       tiles: int | None = None) -> int:
        """The largest G that fits the budget (regions: a full pass of `num_regions`, default prompt_numbers)."""
        tiles = self.largest_tiling if tiles is None else tiles
        if self.cfg.is_base:
            return self.max_positions - self.answer_positions(0, question or "What is in the picture?", tiles)
        from pdlm_jax.regions.prompt import DEFAULT_QUESTION
        k = num_regions or self.cfg.region.prompt_numbers
        return (self.max_positions - self.region_positions(k, 0, question or DEFAULT_QUESTION, tiles)) // k

    # ---- checks -------------------------------------------------------------------------------------

    def check_image(self, image, what: str = "image") -> tuple[int, int] | None:
        """The pixel limit for a path (header only), a PIL image or an array; returns (W, H) when known."""
        if isinstance(image, (str, Path)):
            return image_file_size(image, what, self.max_image_pixels)
        size = getattr(image, "size", None) if isinstance(image, Image.Image) else None
        if size is None and hasattr(image, "shape") and len(image.shape) >= 2:
            size = (int(image.shape[1]), int(image.shape[0]))
        if size is not None:
            check_pixels(size, what, self.max_image_pixels)
        return size

    def check_caption(self, num_masks: int, gen_length: int, question: str,
                      image_size: tuple[int, int] | None = None) -> None:
        """Mask count and positions of a region request (steps: `GenerationSettings.check_regions`)."""
        per_pass = self.cfg.region.prompt_numbers
        if num_masks > self.max_masks:
            raise PDLMError(f"{num_masks} masks, over the limit of {self.max_masks} per image (max_masks / "
                            "--max-masks); caption them in several requests")
        k = min(num_masks, per_pass)  # the widest pass
        tiles = self._tiles(image_size)
        used = self.region_positions(k, gen_length, question, tiles)
        if used > self.max_positions:
            raise PDLMError(f"gen_length={gen_length} with {k} region(s) per pass needs {used} positions, over the "
                            f"model's {self.max_positions} (its max_position_embeddings); use gen_length <= "
                            f"{max(self.max_gen_length(k, question, tiles), 0)} or fewer masks per request")

    def check_answer(self, gen_length: int, steps: int, question: str,
                     image_size: tuple[int, int] | None = None) -> None:
        """Positions and steps of a Base question."""
        for name, value in (("gen_length", gen_length), ("steps", steps)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise PDLMError(f"{name} must be a positive integer, got {value!r}")
        tiles = self._tiles(image_size)
        used = self.answer_positions(gen_length, question, tiles)
        if used > self.max_positions:
            raise PDLMError(f"gen_length={gen_length} needs {used} positions with this question and image, over "
                            f"the model's {self.max_positions} (its max_position_embeddings); use gen_length <= "
                            f"{max(self.max_gen_length(question=question, tiles=tiles), 0)}")
        if steps > self.max_positions:
            raise PDLMError(f"steps={steps} is over the limit of {self.max_positions}; a block commits at least one "
                            "token per step, so steps beyond gen_length add no forwards")

    def describe(self) -> dict:
        """The limits as JSON (worst case over images: the largest tiling, the default question)."""
        out = {"max_positions": self.max_positions, "max_image_pixels": self.max_image_pixels,
               "max_gen_length": self.max_gen_length()}
        if self.cfg.is_base:
            out["max_steps"] = self.max_positions
        else:
            out["max_masks"] = self.max_masks
            out["max_gen_length_per_regions"] = {k: self.max_gen_length(k)
                                                 for k in range(1, self.cfg.region.prompt_numbers + 1)}
            out["max_steps"] = "k·gen_length of the smallest pass (k = its regions)"
        return out


def for_checkpoint(checkpoint_dir: str | Path) -> Limits:
    """A checkpoint's limits from its config and tokenizer only (the CLIs check before loading weights)."""
    from pdlm_jax.checkpoint import load_config, tokenizer_path
    from pdlm_jax.regions.tokenizer import Tokenizer

    cfg = load_config(checkpoint_dir)
    return Limits(cfg, Tokenizer(tokenizer_path(checkpoint_dir), base=cfg.is_base), position_budget(checkpoint_dir))
