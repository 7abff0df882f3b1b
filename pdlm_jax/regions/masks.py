"""Region masks: loading, area order, boxes and the per-tile mask-patch grids (SPEC §6.4, §3.1)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from pdlm_jax.config import RegionConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.tiling import open_image, tile_pil

MaskInput = Union[str, Path, Image.Image, np.ndarray]

log = logging.getLogger("pdlm_jax")


def _mask_image(mask: MaskInput, name: str) -> Image.Image:
    """Any mask input -> mode "L" PIL image (the reference converts mask files to "L")."""
    if isinstance(mask, np.ndarray) and mask.ndim == 2:  # any dtype: nonzero = inside
        return Image.fromarray((mask > 0).astype(np.uint8) * 255)
    return open_image(mask, "L", name)


def load_mask(mask: MaskInput, size: tuple[int, int], name: str = "mask",
              notes: list[str] | None = None) -> np.ndarray:
    """Load one mask as a bool (H, W) array at the image size (W, H); binarised `> 0`.

    A mask of another size is resized with NEAREST (what the reference demo does), with one log line that
    is also appended to `notes` (the API returns it with the result).
    """
    im = _mask_image(mask, name)
    if im.size != tuple(size):
        message = (f"{name} is {im.width}x{im.height} but the image is {size[0]}x{size[1]}: resized to the image "
                   "with nearest-neighbour")
        log.warning("%s", message)
        if notes is not None:
            notes.append(message)
        im = im.resize(tuple(size), Image.Resampling.NEAREST)
    return np.asarray(im) > 0


def load_masks(masks: Sequence[MaskInput], size: tuple[int, int], notes: list[str] | None = None
               ) -> list[np.ndarray]:
    """Load every mask; errors name the offending mask (index and file); resizes are noted in `notes`."""
    if len(masks) == 0:
        raise PDLMError("no masks given: pass at least one binary mask per region to caption")
    loaded = []
    for i, m in enumerate(masks):
        name = f"mask {i}" + (f" ({m})" if isinstance(m, (str, Path)) else "")
        b = load_mask(m, size, name, notes)
        if not b.any():
            raise PDLMError(f"{name} is empty (no pixel > 0); every mask must cover at least one pixel")
        loaded.append(b)
    return loaded


def area_order(areas: Sequence[int]) -> np.ndarray:
    """Descending area; ties put the higher original index first (the reference's reversed argsort)."""
    return np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1].copy()


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised box of the INCLUSIVE pixel extents: (x_min/W, y_min/H, x_max/W, y_max/H) (SPEC §6.4.3)."""
    h, w = mask.shape
    xs, ys = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))  # cheaper than nonzero
    return (xs[0] / w, ys[0] / h, xs[-1] / w, ys[-1] / h)


def visual_prompt_tiles(mask: np.ndarray, prompt_id: int, grid: tuple[int, int], region: RegionConfig) -> np.ndarray:
    """The reference's visual-prompt image (255 background, prompt id on the mask), tiled like the image."""
    canvas = np.full(mask.shape, 255, dtype=np.uint8)
    canvas[mask] = prompt_id
    # The reference resizes an "L" image converted to RGB: three equal channels, so resize once (a third of
    # the work, same bytes: Pillow resamples each 8-bit channel alike) and view it as three channels.
    gray = tile_pil(Image.fromarray(canvas), grid, region)
    return np.broadcast_to(gray[..., None], (*gray.shape, 3))  # a read-only view


def patch_activity(prompt_tiles: np.ndarray, region: RegionConfig) -> np.ndarray:
    """(T, S, S, 3) uint8 visual-prompt tiles -> (T, g, g) bool: top-left pixel of each patch is not 255.

    Equivalent to the reference's bf16 round trip + nearest downsampling (SPEC §3.1); the three channels
    are equal (an "L" image converted to RGB), so channel 0 is enough.
    """
    k = region.mask_kernel_size
    return prompt_tiles[:, ::k, ::k, 0] != 255


# ---- COCO compressed RLE (annotation files) ------------------------------------------------------------


def _rle_runs(counts: bytes) -> list[int]:
    """Parse COCO's compressed RLE string like pycocotools' rleFrString, rejecting malformed input
    (pycocotools decodes such strings into uninitialised memory instead of failing)."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos == len(counts):
                raise ValueError("the counts string ends inside a number")
            c = counts[pos] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(counts[pos])!r} in counts")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign extension
        if len(runs) > 2:
            value += runs[-2]  # runs after the second are stored as differences
        if value < 0:
            raise ValueError("negative run length")
        runs.append(value)
    return runs


def check_rle(rle: object) -> tuple[int, int, bytes, bool]:
    """Validate a COCO compressed RLE without decoding it: (h, w, counts, any pixel set).

    Raises PDLMError("corrupt mask RLE (...)") for anything pycocotools would misread.
    """
    try:
        if not isinstance(rle, dict):
            raise TypeError("a mask must be a COCO compressed RLE dict {'size': [h, w], 'counts': str}")
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if not isinstance(counts, str):
            raise ValueError("counts must be a compressed RLE string (uncompressed lists and polygons are "
                             "not supported)")
        counts = counts.encode("ascii")
        runs = _rle_runs(counts)
        if h < 0 or w < 0 or sum(runs) != h * w:
            raise ValueError(f"run lengths do not add up to size {h}x{w}")
    except (TypeError, KeyError, ValueError, UnicodeEncodeError) as e:
        raise PDLMError(f"corrupt mask RLE ({type(e).__name__}: {e}).") from e
    return h, w, counts, any(runs[1::2])  # runs alternate 0s and 1s, starting with 0s


def decode_rle(rle: object) -> np.ndarray:
    """Strictly decode a COCO compressed RLE to an (h, w) bool mask; PDLMError if corrupt (not if empty)."""
    import pycocotools.mask

    h, w, counts, _ = check_rle(rle)
    with warnings.catch_warnings():  # pycocotools' NumPy 2 copy=False deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return pycocotools.mask.decode({"size": [h, w], "counts": counts}).astype(bool)
