"""Dynamic tiling and SigLIP normalisation of the input image (SPEC §6.1–6.3).

The reference (`dynamic_preprocess`) picks a (columns, rows) grid by aspect ratio, resizes the whole image
to that grid of tiles with Pillow's BICUBIC filter, crops the tiles row-major and appends a thumbnail.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from pdlm_jax.config import RegionConfig
from pdlm_jax.errors import PDLMError, TooLarge

ImageInput = Union[str, Path, Image.Image, np.ndarray]

# The reference builds its candidates as `sorted(set((i, j) ...), key=i*j)` (SPEC §6.1); for the released
# min/max of 1/6 CPython's set order gives exactly this list, which also decides ties.
REFERENCE_GRIDS = ((1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1),
                   (2, 3), (1, 6), (3, 2))


def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Candidate (columns, rows) grids in the reference's iteration order."""
    if (min_tiles, max_tiles) == (1, 6):
        return REFERENCE_GRIDS
    # Other limits: the reference's own construction (deterministic: small-int tuple hashes are fixed).
    ratios = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_tiles <= i * j <= max_tiles}
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def select_grid(width: int, height: int, region: RegionConfig) -> tuple[int, int]:
    """`find_closest_aspect_ratio`: closest aspect ratio; exact ties go to a later grid if the image is big."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in candidate_grids(region.min_tiles, region.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * region.image_size * region.image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_pil(image: Image.Image, grid: tuple[int, int], region: RegionConfig) -> np.ndarray:
    """Resize to the grid (BICUBIC), crop row-major, append the thumbnail if >1 tile -> (T, S, S[, C]) uint8."""
    cols, rows = grid
    s = region.image_size
    resized = image.resize((s * cols, s * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop(((n % cols) * s, (n // cols) * s, (n % cols + 1) * s, (n // cols + 1) * s))
             for n in range(cols * rows)]
    if region.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])


def _normalized_levels() -> np.ndarray:
    """Slow SiglipImageProcessor: rescale in float64 -> float32, then (x - 0.5) / 0.5 in float32 (SPEC §6.2)."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (x - half) / half


NORMALIZED_LEVELS = _normalized_levels()  # one float32 per uint8 value


def normalize(tiles_uint8: np.ndarray) -> np.ndarray:
    """uint8 tiles -> SigLIP-normalised float32 (a table lookup: the same values, computed once)."""
    return NORMALIZED_LEVELS[tiles_uint8]


def read_image_file(path: str | Path, mode: str, what: str) -> Image.Image:
    """An image file fully read and converted to `mode`; a clear PDLMError naming `what` if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Image.DecompressionBombError as e:  # Pillow's guard against tiny files of huge images
        raise TooLarge(f"{what} file {path} is too large: {e}") from None
    except (OSError, ValueError) as e:
        raise PDLMError(f"cannot read {what} file {path}: {e}") from e


def open_image(image: ImageInput, mode: str, what: str) -> Image.Image:
    """Path / PIL image (any mode) / uint8 array (H, W) or (H, W, 3|4) -> PIL image in `mode`."""
    if isinstance(image, (str, Path)):
        return read_image_file(image, mode, what)
    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise PDLMError(f"{what} array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} "
                            f"{image.shape}")
        return Image.fromarray(image).convert(mode)
    raise PDLMError(f"{what} must be a file path, a PIL image or a uint8 numpy array, not {type(image).__name__}")


def open_rgb(image: ImageInput, what: str = "image") -> Image.Image:
    return open_image(image, "RGB", what)


@dataclasses.dataclass(frozen=True)
class TiledImage:
    tiles_uint8: np.ndarray  # (T, S, S, 3) uint8, row-major tiles then the thumbnail
    pixel_values: np.ndarray  # (T, S, S, 3) float32, normalised (NHWC)
    grid: tuple[int, int]  # (columns, rows)
    size: tuple[int, int]  # original (W, H)

    @property
    def num_tiles(self) -> int:
        return self.tiles_uint8.shape[0]


def tile_image(image: ImageInput, region: RegionConfig) -> TiledImage:
    rgb = open_rgb(image)
    if rgb.width < 1 or rgb.height < 1:
        raise PDLMError(f"image has no pixels ({rgb.width}x{rgb.height})")
    grid = select_grid(rgb.width, rgb.height, region)
    tiles = tile_pil(rgb, grid, region)
    return TiledImage(tiles_uint8=tiles, pixel_values=normalize(tiles), grid=grid, size=(rgb.width, rgb.height))
