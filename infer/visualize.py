"""Overlay picture of a captioning result: each mask tinted in its own colour, numbered, with its caption."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, readable colours (Okabe–Ito palette plus a few), cycled beyond their count.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (120, 120, 120))
ALPHA = 0.45
LEGEND_MIN_WIDTH = 480


def overlay(image: Image.Image, masks: Sequence[np.ndarray], captions: Sequence[str]) -> Image.Image:
    """The image with mask i tinted in colour i and numbered at its box, plus a caption legend below it."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i, mask in enumerate(masks):
        colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
        base[mask] = (1 - ALPHA) * base[mask] + ALPHA * colour
    picture = Image.fromarray(base.round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, picture.width // 60))
    draw = ImageDraw.Draw(picture)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle((xs.min(), ys.min(), xs.max(), ys.max()), outline=colour, width=2)
        draw.text((xs.min() + 3, ys.min() + 1), str(i), fill=colour, font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return _with_legend(picture, captions, font)


def _with_legend(picture: Image.Image, captions: Sequence[str], font) -> Image.Image:
    line_height = int(font.size * 1.3)
    width = max(picture.width, LEGEND_MIN_WIDTH)  # small images still get a readable legend
    chars = int(width / (font.size * 0.6))
    lines = []
    for i, caption in enumerate(captions):
        for j, line in enumerate(textwrap.wrap(f"{i}: {caption or '(empty caption)'}", chars) or [f"{i}:"]):
            lines.append((i, line if j == 0 else "   " + line))
    canvas = Image.new("RGB", (width, picture.height + line_height * len(lines) + 8), (20, 20, 20))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, (i, line) in enumerate(lines):
        draw.text((6, picture.height + 4 + n * line_height), line, fill=PALETTE[i % len(PALETTE)], font=font)
    return canvas


def save_overlay(path: str | Path, image: Image.Image, masks: Sequence[np.ndarray], captions: Sequence[str]) -> None:
    """Write the overlay PNG atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            overlay(image, masks, captions).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
