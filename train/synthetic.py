"""Synthetic region-captioning task of the embedded demo model.

A scene is a uniform light background with 1–6 non-overlapping filled shapes from {circle, square,
triangle} × {red, green, blue, yellow}; each shape gets one mask and the caption "a {color} {shape}".
Colours name a hue: every shape is drawn in a random shade of it (hue, saturation and value jitter), so
the model cannot key on one RGB value. Scene `i` of seed `s` is a pure function of (s, i).

CLI: `python -m train.synthetic --out DIR --scenes N [--seed S]` writes N scenes in the training
annotation schema (SPEC §11.2, variant A: image_file + mask_rles + captions).
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
# (hue range in degrees, min saturation, min value) of each colour name.
HUES = {
    "red": ((-12.0, 12.0), 0.6, 0.55),
    "green": ((85.0, 150.0), 0.5, 0.45),
    "blue": ((195.0, 250.0), 0.55, 0.45),
    "yellow": ((47.0, 63.0), 0.6, 0.85),
}
MIN_SIDE, MAX_SIDE = 128, 512
MAX_SHAPES = 6


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # (H, W) bool, one per shape
    captions: list[str]


def shade(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    (h0, h1), s_min, v_min = HUES[color]
    h = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s_min, 1.0), rng.uniform(v_min, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.15), rng.uniform(0.88, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _outline(rng: np.random.Generator, shape: str, x: int, y: int, d: int) -> tuple[str, list]:
    """Drawing primitive of a shape whose bounding box is the d×d square at (x, y)."""
    x1, y1 = x + d - 1, y + d - 1
    if shape == "circle":
        return "ellipse", [x, y, x1, y1]
    if shape == "square":
        return "rectangle", [x, y, x1, y1]
    # triangle: base on one side of the box, apex anywhere on the opposite side (incl. right triangles)
    t = rng.uniform(0.0, 1.0)
    side = rng.integers(4)
    if side == 0:  # pointing up
        pts = [(x, y1), (x1, y1), (x + t * (d - 1), y)]
    elif side == 1:  # down
        pts = [(x, y), (x1, y), (x + t * (d - 1), y1)]
    elif side == 2:  # left
        pts = [(x1, y), (x1, y1), (x, y + t * (d - 1))]
    else:  # right
        pts = [(x, y), (x, y1), (x1, y + t * (d - 1))]
    return "polygon", pts


def _draw(canvas: ImageDraw.ImageDraw, kind: str, geom: list, fill) -> None:
    getattr(canvas, kind)(geom, fill=fill)


def make_scene(seed: int, index: int, num_shapes: int | None = None) -> Scene:
    """Scene `index` of the stream `seed` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    short = min(w, h)
    n = int(num_shapes or rng.integers(1, MAX_SHAPES + 1))
    # sizes from the task's minimum (1/8 of the shorter side) up to what n shapes leave room for
    d_min = math.ceil(short / 8)
    d_max = max(d_min, int(short * min(0.6, 0.9 / math.sqrt(n))))
    image = Image.new("RGB", (w, h), background(rng))
    canvas = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    masks, captions = [], []
    for _ in range(n):
        placed = None
        for attempt in range(200):
            # shrink towards the minimum size when the scene gets crowded
            hi = d_max if attempt < 100 else d_min
            d = int(rng.integers(d_min, hi + 1))
            x, y = int(rng.integers(0, w - d + 1)), int(rng.integers(0, h - d + 1))
            gap = 2  # keep shapes (and their BICUBIC-blurred tiles) apart
            if all(x + d + gap <= bx or bx + bd + gap <= x or y + d + gap <= by or by + bd + gap <= y
                   for bx, by, bd, _ in boxes):
                placed = (x, y, d)
                break
        if placed is None:
            break
        x, y, d = placed
        boxes.append((x, y, d, 0))
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))]
        kind, geom = _outline(rng, shape, x, y, d)
        _draw(canvas, kind, geom, shade(rng, color))
        mask_img = Image.new("L", (w, h), 0)
        _draw(ImageDraw.Draw(mask_img), kind, geom, 255)
        masks.append(np.asarray(mask_img) > 0)
        captions.append(f"a {color} {shape}")
    return Scene(np.asarray(image), masks, captions)


class SyntheticSource:
    """Random-access source of synthetic records (the `load_record` schema of train.data), for grain."""

    def __init__(self, num_records: int, seed: int = 0):
        self.num_records, self.seed = int(num_records), int(seed)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        scene = make_scene(self.seed, int(index))
        return {"image": scene.image, "masks": scene.masks, "captions": scene.captions}


def write_scene(scene: Scene, out_dir: str | Path, stem: str = "") -> tuple[Path, list[Path]]:
    """Save image.png and mask_{i}.png (0/255) — the inputs of `pdlm-infer --image/--masks`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / f"{stem}image.png"
    Image.fromarray(scene.image).save(image_path)
    mask_paths = []
    for i, m in enumerate(scene.masks):
        p = out / f"{stem}mask_{i}.png"
        Image.fromarray((m * 255).astype(np.uint8)).save(p)
        mask_paths.append(p)
    return image_path, mask_paths


def write_dataset(out_dir: str | Path, num_scenes: int, seed: int = 0) -> Path:
    """Write scenes as PNGs plus `annotations.json` in the SPEC §11.2 schema (variant A)."""
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_scenes):
        scene = make_scene(seed, i)
        name = f"images/{i:06d}.png"
        Image.fromarray(scene.image).save(out / name)
        rles = []
        for m in scene.masks:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        records.append({"image_file": str(out / name), "mask_rles": rles, "captions": scene.captions})
    path = out / "annotations.json"
    path.write_text(json.dumps(records))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_dataset(args.out, args.scenes, args.seed))


if __name__ == "__main__":
    main()
