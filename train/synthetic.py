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
    # not in the demo model's training: the new colour word of configs/finetune_demo_lora.yaml
    "purple": ((268.0, 295.0), 0.5, 0.45),
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


def _outline(rng: np.random.Generator, shape: str, d: float, rotated: float) -> tuple[str, np.ndarray]:
    """Drawing primitive of a shape of minimum width `d`, centred on the origin.

    Triangles range from flat to tall and from isosceles to right-angled. Squares sit axis-aligned and
    triangles on a side (within 15°), except a fraction `rotated` of them, which take any angle (a tilted
    square is still a square). Circles: the (2, 2) corners of their bounding box.
    """
    if shape == "circle":
        return "ellipse", np.array([[-d / 2, -d / 2], [d / 2, d / 2]])
    if shape == "square":
        pts = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * (d / 2)
    else:
        height = rng.uniform(0.6, 1.5)  # relative to a base of 1
        apex = rng.uniform(0.0, 1.0)  # along the base: 0 or 1 gives a right angle
        pts = np.array([[0.0, height], [1.0, height], [apex, 0.0]])
        sides = np.linalg.norm(pts - np.roll(pts, 1, axis=0), axis=1)
        pts = (pts - pts.mean(axis=0)) * (d * sides.max() / height)  # smallest altitude = d
    if rng.random() < rotated:
        turn = rng.uniform(0.0, 2.0 * math.pi)
    elif shape == "square":
        turn = 0.0
    else:
        turn = rng.integers(4) * math.pi / 2 + math.radians(rng.uniform(-15.0, 15.0))
    c, s = math.cos(turn), math.sin(turn)
    return "polygon", pts @ np.array([[c, s], [-s, c]])


def _draw(canvas: ImageDraw.ImageDraw, kind: str, geom: np.ndarray, fill) -> None:
    getattr(canvas, kind)([tuple(p) for p in geom.tolist()], fill=fill)


def make_scene(seed: int, index: int, num_shapes: int | None = None, rotated: float = 0.0,
               colors: tuple[str, ...] = COLORS) -> Scene:
    """Scene `index` of the stream `seed` (deterministic); `rotated`: the fraction of squares and triangles
    drawn at any angle; `colors`: the colour names drawn from (keys of HUES)."""
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    short = min(w, h)
    n = int(num_shapes or rng.integers(1, MAX_SHAPES + 1))
    # minimum widths log-uniform from the task's minimum (1/8 of the shorter side) to what n shapes leave
    # room for: small shapes, the hard case, are as common as large ones
    d_min = short / 8
    d_max = max(d_min, short * min(0.5, 0.8 / math.sqrt(n)))
    image = Image.new("RGB", (w, h), background(rng))
    canvas = ImageDraw.Draw(image)
    boxes: list[tuple[float, float, float, float]] = []
    masks, captions = [], []
    for _ in range(n):
        shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
        placed = None
        for attempt in range(200):
            # shrink towards the minimum size when the scene gets crowded
            hi = d_max if attempt < 100 else d_min
            d = math.exp(rng.uniform(math.log(d_min), math.log(hi) + 1e-9))
            kind, geom = _outline(rng, shape, d, rotated)
            lo, size = geom.min(axis=0), np.ptp(geom, axis=0)
            if size[0] > w - 2 or size[1] > h - 2:
                continue
            x, y = rng.uniform(1, w - 1 - size[0]), rng.uniform(1, h - 1 - size[1])
            gap = 3  # keep shapes (and their BICUBIC-blurred tiles) apart
            if all(x + size[0] + gap <= bx or bx + bw + gap <= x or y + size[1] + gap <= by or by + bh + gap <= y
                   for bx, by, bw, bh in boxes):
                placed = (kind, geom - lo + (x, y))
                boxes.append((x, y, size[0], size[1]))
                break
        if placed is None:
            break
        kind, geom = placed
        _draw(canvas, kind, geom, shade(rng, color))
        mask_img = Image.new("L", (w, h), 0)
        _draw(ImageDraw.Draw(mask_img), kind, geom, 255)
        masks.append(np.asarray(mask_img) > 0)
        captions.append(f"a {color} {shape}")
    return Scene(np.asarray(image), masks, captions)


class SyntheticSource:
    """Random-access source of synthetic records (the `load_record` schema of train.data), for grain."""

    def __init__(self, num_records: int, seed: int = 0, rotated: float = 0.0):
        self.num_records, self.seed, self.rotated = int(num_records), int(seed), float(rotated)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        scene = make_scene(self.seed, int(index), rotated=self.rotated)
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


def write_dataset(out_dir: str | Path, num_scenes: int, seed: int = 0, rotated: float = 0.0,
                  colors: tuple[str, ...] = COLORS) -> Path:
    """Write scenes as PNGs plus `annotations.json` in the SPEC §11.2 schema (variant A)."""
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_scenes):
        scene = make_scene(seed, i, rotated=rotated, colors=colors)
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


def fraction(text: str) -> float:
    """argparse type of --rotated: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def color_list(text: str) -> tuple[str, ...]:
    """argparse type of --colors: comma-separated names from HUES."""
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in HUES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"colours must be a comma-separated subset of {', '.join(HUES)}; got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rotated", type=fraction, default=0.0, help="fraction of squares and triangles at any angle")
    ap.add_argument("--colors", type=color_list, default=COLORS,
                    help=f"comma-separated colour names (default: {','.join(COLORS)}; also: purple)")
    args = ap.parse_args(argv)
    print(write_dataset(args.out, args.scenes, args.seed, args.rotated, args.colors))


if __name__ == "__main__":
    main()
