"""The synthetic demo task and the demo tokenizer."""

from __future__ import annotations

import colorsys

import numpy as np

from pdlm_jax.regions.tokenizer import Tokenizer
from train import demo, synthetic


def test_scenes_follow_the_task_definition():
    counts = set()
    for i in range(60):
        scene = synthetic.make_scene(11, i)
        h, w, _ = scene.image.shape
        assert 128 <= h <= 512 and 128 <= w <= 512
        assert 1 <= len(scene.masks) == len(scene.captions) <= 6
        counts.add(len(scene.masks))
        union = np.zeros((h, w), int)
        for mask, caption in zip(scene.masks, scene.captions):
            a, color, shape = caption.split(" ")
            assert a == "a" and color in synthetic.COLORS and shape in synthetic.SHAPES
            ys, xs = np.nonzero(mask)
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert side >= min(h, w) / 8 - 1  # minimum width >= 1/8 of the shorter side, less rasterisation
            union += mask
            # the shape is drawn in a shade of its colour's hue
            r, g, b = scene.image[ys[len(ys) // 2], xs[len(xs) // 2]] / 255.0
            hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
            (h0, h1), _, _ = synthetic.HUES[color]
            offset = (hue - (h0 + h1) / 2 + 180) % 360 - 180  # signed distance to the range centre
            assert abs(offset) <= (h1 - h0) / 2 + 2  # + 8-bit rounding
        assert union.max() == 1  # non-overlapping
        # background: every pixel outside the shapes has one light colour
        background = scene.image[union == 0]
        assert (background == background[0]).all()
        assert background[0].min() >= 190  # light: HSV value >= 0.88 and saturation <= 0.15
    assert counts == set(range(1, 7))
    np.testing.assert_array_equal(synthetic.make_scene(11, 3).image, synthetic.make_scene(11, 3).image)


def test_demo_tokenizer_has_every_special_token_and_one_token_per_word(tmp_path):
    demo.build_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)  # resolves every special token by string
    for token in demo.SPECIAL_TOKENS:
        assert tok.token_id(token) is not None
    for color in synthetic.COLORS:
        for shape in synthetic.SHAPES:
            ids = tok.encode(f"a {color} {shape}")
            assert len(ids) == 3 and tok.decode(ids) == f"a {color} {shape}"


def test_rotated_fraction_turns_squares_off_the_axes():
    fill = {0.0: [], 1.0: []}  # area / bounding-box area of every square
    for rotated, fills in fill.items():
        for i in range(40):
            scene = synthetic.make_scene(5, i, rotated=rotated)
            for mask, caption in zip(scene.masks, scene.captions):
                if caption.endswith("square"):
                    ys, xs = np.nonzero(mask)
                    fills.append(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    assert min(fill[0.0]) > 0.9  # axis-aligned squares fill their boxes
    assert np.median(fill[1.0]) < 0.8  # a square turned by a random angle fills ~64% on average
