"""Overlay picture of a captioning result: each region outlined in its own colour and numbered in a tag of
that colour outside it; below the image, each caption in white after the same tag. The image's own colours
are left untouched (the captions name them)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pdlm_jax.files import atomic_write

# Distinct colours (Okabe–Ito's, its dark blue swapped for a lavender), cycled beyond their count; each is
# light enough for black text on it (contrast >= 4.5:1), as the number tags here and on the page have.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (170, 140, 250), (213, 94, 0),
           (204, 121, 167), (120, 120, 120))
MIN_SIDE = 640  # small images are enlarged (nearest neighbour) so outlines and labels stay legible


def overlay(image: Image.Image, masks: Sequence[np.ndarray], captions: Sequence[str] | None) -> Image.Image:
    """The image with region i outlined in colour i, its number in a tag beside it, and a caption legend
    (none when `captions` is None: the web page shows its own, which follows the step slider)."""
    scale = max(1, -(-MIN_SIDE // max(image.size)))  # ceil
    picture = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    masks = [np.kron(m, np.ones((scale, scale), bool)) if scale > 1 else m for m in masks]
    width = max(3, max(picture.size) // 120)
    font = ImageFont.load_default(size=max(16, max(picture.size) // 32))
    for i, mask in enumerate(masks):
        _outline(picture, mask, PALETTE[i % len(PALETTE)], width)
    draw = ImageDraw.Draw(picture)
    taken: list[tuple[int, int, int, int]] = []
    for i, mask in enumerate(masks):
        _tag(draw, mask, str(i), PALETTE[i % len(PALETTE)], font, taken)
    return picture if captions is None else _with_legend(picture, captions, font)


def _outline(picture: Image.Image, mask: np.ndarray, colour, width: int) -> None:
    """Draw the mask's contour, `width` px wide outside it, in `colour` with a thin dark edge for contrast."""
    region = Image.fromarray(mask.astype(np.uint8) * 255)
    grown = region.filter(ImageFilter.MaxFilter(2 * width + 1))
    halo = grown.filter(ImageFilter.MaxFilter(3))
    picture.paste((0, 0, 0), mask=Image.fromarray((np.asarray(halo) > 0) & ~mask))
    picture.paste(colour, mask=Image.fromarray((np.asarray(grown) > 0) & ~mask))


def _tag(draw: ImageDraw.ImageDraw, mask: np.ndarray, text: str, colour, font,
         taken: list[tuple[int, int, int, int]]) -> None:
    """A filled label beside the region (above it, else below, left or right), never over it or another tag."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    w, h = _tag_size(draw, text, font)
    gap = max(4, font.size // 3)
    cx, cy = (x0 + x1 - w) // 2, (y0 + y1 - h) // 2
    H, W = mask.shape
    candidates = [(cx, y0 - gap - h), (cx, y1 + gap), (x0 - gap - w, cy), (x1 + gap, cy)]

    def fits(box):
        bx0, by0, bx1, by1 = box
        inside = 0 <= bx0 and 0 <= by0 and bx1 < W and by1 < H
        return inside and not mask[by0:by1, bx0:bx1].any() and not any(
            bx0 < t[2] and t[0] < bx1 and by0 < t[3] and t[1] < by1 for t in taken)

    boxes = [(min(max(x, 0), W - w - 1), min(max(y, 0), H - h - 1)) for x, y in candidates]
    boxes = [(x, y, x + w, y + h) for x, y in boxes]
    box = next((b for b in boxes if fits(b)), boxes[0])
    taken.append(box)
    _draw_tag(draw, box[:2], text, colour, font)


def _tag_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, font.size // 6)
    return right - left + 2 * pad, bottom - top + 2 * pad


def _draw_tag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour, font) -> None:
    """Black text on a box of `colour` (every palette colour is light enough for it)."""
    w, h = _tag_size(draw, text, font)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    pad = max(2, font.size // 6)
    draw.rectangle((xy[0], xy[1], xy[0] + w, xy[1] + h), fill=colour, outline=(0, 0, 0))
    draw.text((xy[0] + pad - left, xy[1] + pad - top), text, fill=(0, 0, 0), font=font)


def _with_legend(picture: Image.Image, captions: Sequence[str], font) -> Image.Image:
    line_height = int(font.size * 1.5)
    indent = 8 + int(font.size * 2.2)  # room for the tag
    chars = max(20, int((picture.width - indent) / (font.size * 0.6)))
    lines = []
    for i, caption in enumerate(captions):
        for j, line in enumerate(textwrap.wrap(caption or "(empty caption)", chars)):
            lines.append((i if j == 0 else None, line))
    canvas = Image.new("RGB", (picture.width, picture.height + line_height * len(lines) + 12), (20, 20, 20))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, (i, line) in enumerate(lines):
        y = picture.height + 8 + n * line_height
        if i is not None:
            _draw_tag(draw, (8, y), str(i), PALETTE[i % len(PALETTE)], font)
        draw.text((indent, y), line, fill=(255, 255, 255), font=font)
    return canvas


def save_overlay(path: str | Path, image: Image.Image, masks: Sequence[np.ndarray], captions: Sequence[str]) -> None:
    """Write the overlay PNG atomically (a temporary file in the same folder, then rename)."""
    png = io.BytesIO()
    overlay(image, masks, captions).save(png, format="PNG")
    atomic_write(path, png.getvalue())


# ---- the denoising steps as a grid ----------------------------------------------------------------------

# slot colours: masked (a box), re-masked by this step (a box), committed by this step, committed earlier; labels
MASKED, REMASKED, NEW, KEPT, LABEL = (110, 150, 200), (235, 80, 80), (255, 200, 60), (235, 235, 235), (160, 160, 160)


def steps_grid(history: np.ndarray, mask_id: int, token_text, captions: Sequence[str] | None = None) -> Image.Image:
    """One row per denoising step (forward), one column per region: each region's G slots after that step, a
    masked slot as an empty box (red where the step re-masked a token), a token committed by this step in
    amber, earlier ones in white. `history`: (steps, regions, G) ids (`caption_regions(history=True)`);
    `token_text(id)`: one token's text. The last row is followed by the final captions if given."""
    history = np.asarray(history)
    steps, regions, slots = history.shape
    font = ImageFont.load_default(size=15)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = int(font.size * 0.8)
    space = font.size // 3

    def word(t: int) -> str:
        return token_text(int(t)).replace("\n", "\\n").strip() or "·"

    def width(ids) -> int:
        return sum((box if t == mask_id else int(measure.textlength(word(t), font=font))) + space for t in ids)

    column = max(max(width(history[s, r]) for s in range(steps) for r in range(regions)), 120) + 2 * space
    label = int(measure.textlength(f"step {steps}", font=font)) + 3 * space
    row_h = int(font.size * 1.8)
    footer = row_h * (1 + regions) if captions is not None else 0
    canvas = Image.new("RGB", (label + column * regions, row_h * (steps + 1) + footer), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for r in range(regions):
        _draw_tag(draw, (label + r * column + space, 4), str(r), PALETTE[r % len(PALETTE)], font)
    for s in range(steps):
        y = row_h * (s + 1) + 4
        draw.text((space, y), f"step {s + 1}", fill=LABEL, font=font)
        for r in range(regions):
            x = label + r * column + space
            for g, t in enumerate(history[s, r]):
                before = history[s - 1, r, g] if s else mask_id
                if t == mask_id:
                    colour = REMASKED if before != mask_id else MASKED
                    draw.rectangle((x, y + 3, x + box, y + 3 + box), outline=colour, width=2)
                    x += box + space
                    continue
                text = word(t)
                draw.text((x, y), text, fill=NEW if before != t else KEPT, font=font)
                x += int(measure.textlength(text, font=font)) + space
    if captions is not None:
        y = row_h * (steps + 1) + 4
        draw.text((space, y), "captions:", fill=LABEL, font=font)
        for r, caption in enumerate(captions):
            y += row_h
            _draw_tag(draw, (space, y), str(r), PALETTE[r % len(PALETTE)], font)
            draw.text((label, y), caption or "(empty caption)", fill=KEPT, font=font)
    return canvas


def save_steps(path: str | Path, history, mask_id: int, token_text, captions: Sequence[str] | None = None) -> None:
    """Write `steps_grid` as a PNG atomically."""
    png = io.BytesIO()
    steps_grid(history, mask_id, token_text, captions).save(png, format="PNG")
    atomic_write(path, png.getvalue())
