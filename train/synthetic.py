"""The synthetic shapes tasks of the demo models.

A scene is a uniform light background with 1–6 non-overlapping filled shapes from {circle, square,
triangle} × {red, green, blue, yellow}. Colours name a hue: every shape is drawn in a random shade of it (hue,
saturation and value jitter), so a model cannot key on one RGB value. Scene `i` of seed `s` and a task is a pure
function of (s, i).

Task "shapes" (the embedded demo model's): caption "a {color} {shape}"; shape sizes are minimum widths
(circle diameter, square side, smallest triangle altitude), log-uniform from 1/8 of the shorter image side.

Task "sentences": captions "a {size} {color} {shape} {place}", e.g. "a small red circle in the top left".
- size: "small" when the shape's mask covers 0.5–2.5% of the image, "large" when 5–15%; the generator draws
  only sizes inside these two bands.
- place: the mask centroid's row (top / middle / bottom) and column (left / center / right) by thirds of the
  image height and width: "in the {row} {column}", except that middle + center is "in the center". Every
  centroid is at least 4% of the side away from the third lines.

Questions and answers (the Base demo model), `questions(scene)`:
- "How many shapes are there?" → "one" … "six"
- "What color is the {shape}?" (only when exactly one shape of that kind is present) → "{color}"
- "Which shape is {color}?" (only when exactly one shape of that colour) → "{shape}"
- "Is there a {color} {shape}?" → "yes" / "no"
- "Where is the {color} {shape}?" (only when unique) → "{place}"
- "Describe the image." → every shape's caption in reading order (by the centroid's third row, third column,
  then its y and x), joined by ", ": dense supervision for a Base model to learn from (data.synthetic_describe)

The questions are asked about scenes of the "sentences" task.

CLI: `python -m train.synthetic --out DIR --scenes N [--seed S] [--task sentences]` writes N scenes in the
training annotation schema (SPEC §11.2, variant A: image_file + mask_rles + captions); `--qa` writes scenes of
the "sentences" task as Base conversation records instead (train.conversations, one record per question).
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
    # not in the demo models' training: the new colour word of configs/finetune_demo_lora.yaml
    "purple": ((268.0, 295.0), 0.5, 0.45),
}
# mask area / image area of each size word
SIZES = {"small": (0.005, 0.025), "large": (0.05, 0.15)}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
PLACE_MARGIN = 0.04  # centroids keep this fraction of the side away from the third lines
NUMBERS = ("one", "two", "three", "four", "five", "six")
# the Base demo's question of each type, and the fields it names
QUESTIONS = {
    "count": "How many shapes are there?",
    "color": "What color is the {shape}?",
    "shape": "Which shape is {color}?",
    "exists": "Is there a {color} {shape}?",
    "where": "Where is the {color} {shape}?",
}
QUESTION_TYPES = tuple(QUESTIONS)
TASKS = ("shapes", "sentences")
MIN_SIDE, MAX_SIDE = 128, 512
MAX_SHAPES = 6


@dataclasses.dataclass(frozen=True)
class Item:
    """One shape of a scene and the words that describe it."""

    shape: str
    color: str
    size: str
    row: int  # index into ROWS
    column: int  # index into COLUMNS

    @property
    def place(self) -> str:
        if (self.row, self.column) == (1, 1):
            return "in the center"
        return f"in the {ROWS[self.row]} {COLUMNS[self.column]}"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.place}"


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # (H, W) bool, one per shape
    captions: list[str]
    items: list[Item] = dataclasses.field(default_factory=list)  # the "sentences" task's words of each shape


def shade(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    (h0, h1), s_min, v_min = HUES[color]
    h = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s_min, 1.0), rng.uniform(v_min, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.15), rng.uniform(0.88, 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _outline(rng: np.random.Generator, shape: str, d: float, rotated: float) -> tuple[str, np.ndarray]:
    """Drawing primitive of a shape of minimum width `d`, centred on the origin (its area centroid).

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


def _area(kind: str, geom: np.ndarray) -> float:
    if kind == "ellipse":
        return math.pi / 4 * float(np.prod(np.ptp(geom, axis=0)))
    x, y = geom[:, 0], geom[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))  # shoelace


def _draw(canvas: ImageDraw.ImageDraw, kind: str, geom: np.ndarray, fill) -> None:
    getattr(canvas, kind)([tuple(p) for p in geom.tolist()], fill=fill)


def _mask(w: int, h: int, kind: str, geom: np.ndarray) -> np.ndarray:
    """(h, w) bool: the pixels the primitive covers, drawn as the shape is."""
    mask_img = Image.new("L", (w, h), 0)
    _draw(ImageDraw.Draw(mask_img), kind, geom, 255)
    return np.asarray(mask_img) > 0


def _cell(fraction: float) -> int | None:
    """The third a centroid coordinate (a fraction of the side) falls in; None within PLACE_MARGIN of a line."""
    if min(abs(fraction - 1 / 3), abs(fraction - 2 / 3)) < PLACE_MARGIN:
        return None
    return min(int(fraction * 3), 2)


def _place_shape(rng, w: int, h: int, shape: str, size: str, rotated: float, boxes: list):
    """(primitive, points, mask, row, column) of one shape of `size` placed in a random third cell clear of
    `boxes`, or None if this draw does not fit. The drawn mask, not the geometry, must meet the size band and
    the centroid margin."""
    kind, unit = _outline(rng, shape, 1.0, rotated)
    unit_area = _area(kind, unit)
    lo_frac, hi_frac = SIZES[size]
    # aim inside the band: rasterisation moves the area by a few pixels along the outline
    target = rng.uniform(lo_frac + 0.1 * (hi_frac - lo_frac), hi_frac - 0.1 * (hi_frac - lo_frac)) * w * h
    geom = unit * math.sqrt(target / unit_area)
    lo, hi = geom.min(axis=0), geom.max(axis=0)  # extent around the centroid
    row, column = (int(v) for v in rng.integers(3, size=2))
    spans = []
    for index, side, a, b in ((column, w, lo[0], hi[0]), (row, h, lo[1], hi[1])):
        start = max((index / 3 + PLACE_MARGIN) * side, 1 - a)
        stop = min(((index + 1) / 3 - PLACE_MARGIN) * side, side - 1 - b)
        if start > stop:
            return None
        spans.append(rng.uniform(start, stop))
    geom = geom + np.array(spans)
    x0, y0 = geom.min(axis=0)
    bw, bh = np.ptp(geom, axis=0)
    gap = 3  # keep shapes (and their BICUBIC-blurred tiles) apart
    if not all(x0 + bw + gap <= bx or bx + bbw + gap <= x0 or y0 + bh + gap <= by or by + bbh + gap <= y0
               for bx, by, bbw, bbh in boxes):
        return None
    mask = _mask(w, h, kind, geom)
    ys, xs = np.nonzero(mask)
    if not lo_frac <= len(ys) / (w * h) <= hi_frac:
        return None
    # the centroid of the drawn pixels (centres at +0.5), as a user's mask would be measured
    if (_cell((xs.mean() + 0.5) / w), _cell((ys.mean() + 0.5) / h)) != (column, row):
        return None
    boxes.append((x0, y0, bw, bh))
    return kind, geom, mask, row, column


def make_scene(seed: int, index: int, num_shapes: int | None = None, rotated: float = 0.0,
               colors: tuple[str, ...] = COLORS, task: str = "shapes") -> Scene:
    """Scene `index` of the stream `seed` of `task` (deterministic); `rotated`: the fraction of squares and
    triangles drawn at any angle; `colors`: the colour names drawn from (keys of HUES)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    n = int(num_shapes or rng.integers(1, MAX_SHAPES + 1))
    image = Image.new("RGB", (w, h), background(rng))
    place = _place_shapes if task == "shapes" else _place_sentences
    masks, captions, items = [], [], []
    for kind, geom, mask, color, caption, item in place(rng, w, h, n, rotated, colors):
        _draw(ImageDraw.Draw(image), kind, geom, shade(rng, color))
        masks.append(mask)
        captions.append(caption)
        items += [item] if item else []
    return Scene(np.asarray(image), masks, captions, items)


def _place_shapes(rng, w: int, h: int, n: int, rotated: float, colors):
    """The "shapes" task's shapes, one at a time: (primitive, points, mask, colour, caption, None)."""
    short = min(w, h)
    # minimum widths log-uniform from the task's minimum (1/8 of the shorter side) to what n shapes leave
    # room for: small shapes, the hard case, are as common as large ones
    d_min = short / 8
    d_max = max(d_min, short * min(0.5, 0.8 / math.sqrt(n)))
    boxes: list[tuple[float, float, float, float]] = []
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
            return
        kind, geom = placed
        yield kind, geom, _mask(w, h, kind, geom), color, f"a {color} {shape}", None


def _place_sentences(rng, w: int, h: int, n: int, rotated: float, colors):
    """The "sentences" task's shapes, one at a time: (primitive, points, mask, colour, caption, Item)."""
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
        size = ("small", "large")[rng.integers(2)]
        placed = None
        for attempt in range(400):
            # a crowded scene leaves no room for a large shape: fall back to a small one
            placed = _place_shape(rng, w, h, shape, size if attempt < 200 else "small", rotated, boxes)
            if placed is not None:
                break
        if placed is None:
            return
        kind, geom, mask, row, column = placed
        item = Item(shape, color, size if attempt < 200 else "small", row, column)
        yield kind, geom, mask, color, item.caption, item


# ---- questions and answers (the Base demo) --------------------------------------------------------------


def questions(scene: Scene, colors: tuple[str, ...] = COLORS) -> list[tuple[str, str, str]]:
    """(type, question, answer) of every question of the task that the scene admits (QUESTION_TYPES order)."""
    items = scene.items
    kinds = [i.shape for i in items]
    hues = [i.color for i in items]
    pairs = [(i.color, i.shape) for i in items]
    out = [("count", QUESTIONS["count"], NUMBERS[len(items) - 1])]
    out += [("color", QUESTIONS["color"].format(shape=s), items[kinds.index(s)].color)
            for s in SHAPES if kinds.count(s) == 1]
    out += [("shape", QUESTIONS["shape"].format(color=c), items[hues.index(c)].shape)
            for c in colors if hues.count(c) == 1]
    out += [("exists", QUESTIONS["exists"].format(color=c, shape=s), "yes" if (c, s) in pairs else "no")
            for c in colors for s in SHAPES]
    out += [("where", QUESTIONS["where"].format(color=c, shape=s), items[pairs.index((c, s))].place)
            for c in colors for s in SHAPES if pairs.count((c, s)) == 1]
    return out


def every_question(colors: tuple[str, ...] = COLORS) -> list[str]:
    """Every question any scene can be asked."""
    return list(dict.fromkeys(q.format(color=c, shape=s) for q in QUESTIONS.values() for c in colors for s in SHAPES))


DESCRIBE = "Describe the image."


def describe(scene: Scene) -> str:
    """Every shape's caption in reading order: by third row, third column, then the centroid's y and x."""
    centroids = [np.argwhere(m).mean(axis=0) for m in scene.masks]
    order = sorted(range(len(scene.items)), key=lambda i: (scene.items[i].row, scene.items[i].column,
                                                           *centroids[i]))
    return ", ".join(scene.items[i].caption for i in order)


def _one_of(pool: list[tuple[str, str, str]], kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """A random question of type `kind` from `pool`; "Is there ...?" draws "yes" as often as "no"."""
    of_kind = [q for q in pool if q[0] == kind]
    if kind == "exists":
        answers = sorted({q[2] for q in of_kind})
        answer = answers[rng.integers(len(answers))]
        of_kind = [q for q in of_kind if q[2] == answer]
    return of_kind[rng.integers(len(of_kind))]


def _types_in(pool: list[tuple[str, str, str]]) -> list[str]:
    """The question types `pool` still has, in QUESTION_TYPES order."""
    return [kind for kind in QUESTION_TYPES if any(q[0] == kind for q in pool)]


def pick_questions(scene: Scene, rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """Up to `count` different questions, in rounds: each round asks one more question of every type the scene
    still has, in random order. Every type is asked about as often; "Is there ...?" is answered "yes" as often
    as "no" while both remain. Several rounds ask one image about different shapes and colours, with different
    answers: what tells the question's words apart is in the sample."""
    pool, picked = questions(scene), []
    while len(picked) < count and pool:
        types = _types_in(pool)
        for i in rng.permutation(len(types))[:count - len(picked)]:
            picked.append(_one_of(pool, types[i], rng))
            pool.remove(picked[-1])
    return picked


def one_question_per_type(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One random question of every type the scene admits, in QUESTION_TYPES order (the held-out evaluation of
    the Base demo)."""
    pool = questions(scene)
    return [_one_of(pool, kind, rng) for kind in _types_in(pool)]


def parse_caption(text: str) -> dict[str, str] | None:
    """{size, color, shape, place} of a caption in the task's grammar, else None."""
    words = text.split()
    if len(words) < 6 or words[0] != "a" or words[4:6] != ["in", "the"]:
        return None
    size, color, shape, place = words[1], words[2], words[3], " ".join(words[4:])
    places = {Item("circle", "red", "small", r, c).place for r in range(3) for c in range(3)}
    if size not in SIZES or color not in HUES or shape not in SHAPES or place not in places:
        return None
    return {"size": size, "color": color, "shape": shape, "place": place}


# ---- sources for training ------------------------------------------------------------------------------


class SyntheticSource:
    """Random-access source of synthetic records (image, masks, captions), for grain
    through train.sources.SyntheticRecords."""

    def __init__(self, num_records: int, seed: int = 0, rotated: float = 0.0, task: str = "shapes"):
        self.num_records, self.seed, self.rotated, self.task = int(num_records), int(seed), float(rotated), task

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        scene = make_scene(self.seed, int(index), rotated=self.rotated, task=self.task)
        return {"image": scene.image, "masks": scene.masks, "captions": scene.captions}


def conversation(scene: Scene, rng: np.random.Generator, questions: int = 1, describe_fraction: float = 0.0
                 ) -> list[dict]:
    """Question turns about `scene` as LLaVA-style messages, the image tag in the first: one question of each of
    `questions` types (as many as the scene admits); with probability `describe_fraction` the one turn "Describe
    the image." instead."""
    if describe_fraction and rng.random() < describe_fraction:
        return [{"from": "human", "value": f"<image>\n{DESCRIBE}"}, {"from": "gpt", "value": describe(scene)}]
    messages = []
    for i, (_, question, answer) in enumerate(pick_questions(scene, rng, questions)):
        messages.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        messages.append({"from": "gpt", "value": answer})
    return messages


# ---- files ---------------------------------------------------------------------------------------------


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
                  colors: tuple[str, ...] = COLORS, qa: bool = False, task: str = "shapes") -> Path:
    """Write scenes of `task` as PNGs plus `annotations.json`: the SPEC §11.2 schema (variant A), or with `qa`
    Base conversation records with one record per question (scenes of the "sentences" task)."""
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_scenes):
        scene = make_scene(seed, i, rotated=rotated, colors=colors, task="sentences" if qa else task)
        name = f"images/{i:06d}.png"
        Image.fromarray(scene.image).save(out / name)
        if qa:
            records += [{"image": str(out / name), "question_type": kind,
                         "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
                        for kind, q, a in questions(scene, colors)]
            continue
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
    ap.add_argument("--task", choices=TASKS, default="shapes", help="the captions' grammar (see above)")
    ap.add_argument("--qa", action="store_true", help="write Base conversation records (every question of a scene)")
    args = ap.parse_args(argv)
    print(write_dataset(args.out, args.scenes, args.seed, args.rotated, args.colors, args.qa, args.task))


if __name__ == "__main__":
    main()
