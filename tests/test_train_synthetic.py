"""The synthetic tasks of the demo models (the "sentences" task checked from the pixels) and their tokenizers."""

from __future__ import annotations

import colorsys

import numpy as np

from pdlm_jax.regions.tokenizer import Tokenizer
from train import demo, synthetic


def _check_drawing(scene, colors: list[str]) -> None:
    """Each shape in a shade of its colour's hue, no two overlapping, on a uniform light background."""
    union = np.zeros(scene.image.shape[:2], int)
    for mask, color in zip(scene.masks, colors):
        ys, xs = np.nonzero(mask)
        r, g, b = scene.image[ys[len(ys) // 2], xs[len(xs) // 2]] / 255.0
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        (h0, h1), _, _ = synthetic.HUES[color]
        offset = (hue - (h0 + h1) / 2 + 180) % 360 - 180  # signed distance to the range centre
        assert abs(offset) <= (h1 - h0) / 2 + 2  # + 8-bit rounding
        union += mask
    assert union.max() == 1  # non-overlapping
    background = scene.image[union == 0]  # every pixel outside the shapes has one light colour
    assert (background == background[0]).all()
    assert background[0].min() >= 190  # light: HSV value >= 0.88 and saturation <= 0.15


def _scenes(task: str, count: int = 60):
    """(scene, height, width) of `count` scenes of `task`, each with a valid size and 1-6 shapes; every number of
    shapes must occur."""
    counts = set()
    for i in range(count):
        scene = synthetic.make_scene(11, i, task=task)
        h, w, _ = scene.image.shape
        assert 128 <= h <= 512 and 128 <= w <= 512
        assert 1 <= len(scene.masks) == len(scene.captions) <= 6
        counts.add(len(scene.masks))
        yield scene, h, w
    assert counts == set(range(1, 7))


def test_scenes_follow_the_task_definition():
    for scene, h, w in _scenes("shapes"):
        colors = []
        for mask, caption in zip(scene.masks, scene.captions):
            a, color, shape = caption.split(" ")
            colors.append(color)
            assert a == "a" and color in synthetic.COLORS and shape in synthetic.SHAPES
            ys, xs = np.nonzero(mask)
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert side >= min(h, w) / 8 - 1  # minimum width >= 1/8 of the shorter side, less rasterisation
        _check_drawing(scene, colors)
    np.testing.assert_array_equal(synthetic.make_scene(11, 3).image, synthetic.make_scene(11, 3).image)


def _place(mask: np.ndarray) -> str:
    """The task's place words, measured from a mask: its centroid's third of the height and of the width."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    row = ("top", "middle", "bottom")[int((ys.mean() + 0.5) / h * 3)]
    column = ("left", "center", "right")[int((xs.mean() + 0.5) / w * 3)]
    return "in the center" if (row, column) == ("middle", "center") else f"in the {row} {column}"


def test_sentence_scenes_follow_the_task_definition():
    sizes = set()
    for scene, h, w in _scenes("sentences"):
        colors = []
        for mask, caption in zip(scene.masks, scene.captions):
            words = caption.split(" ")
            a, size, color, shape = words[:4]
            colors.append(color)
            assert a == "a" and color in synthetic.COLORS and shape in synthetic.SHAPES
            area = mask.mean()
            assert {"small": 0.005 <= area <= 0.025, "large": 0.05 <= area <= 0.15}[size], (caption, area)
            sizes.add(size)
            assert " ".join(words[4:]) == _place(mask)
            ys, xs = np.nonzero(mask)
            for centre in ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h):  # fractions of the side
                assert min(abs(centre - 1 / 3), abs(centre - 2 / 3)) >= 0.04  # clear of the third lines
        _check_drawing(scene, colors)
    assert sizes == {"small", "large"}
    assert not np.array_equal(synthetic.make_scene(11, 3, task="sentences").image, synthetic.make_scene(11, 3).image)


def test_questions_follow_the_task_definition():
    """Every question a scene admits, checked against the captions; and only those questions."""
    numbers = ["one", "two", "three", "four", "five", "six"]
    for i in range(40):
        scene = synthetic.make_scene(7, i, task="sentences")
        described = [c.split(" ") for c in scene.captions]
        things = [(w[2], w[3]) for w in described]  # (colour, shape)
        asked = {q: (kind, a) for kind, q, a in synthetic.questions(scene)}
        assert asked.pop("How many shapes are there?") == ("count", numbers[len(things) - 1])
        for shape in synthetic.SHAPES:
            of_shape = [c for c, s in things if s == shape]
            expected = ("color", of_shape[0]) if len(of_shape) == 1 else None
            assert asked.pop(f"What color is the {shape}?", None) == expected
        for color in synthetic.COLORS:
            of_color = [s for c, s in things if c == color]
            expected = ("shape", of_color[0]) if len(of_color) == 1 else None
            assert asked.pop(f"Which shape is {color}?", None) == expected
            for shape in synthetic.SHAPES:
                assert asked.pop(f"Is there a {color} {shape}?") == ("exists", "yes" if (color, shape) in things else "no")
                n = things.count((color, shape))
                expected = ("where", _place(scene.masks[things.index((color, shape))])) if n == 1 else None
                assert asked.pop(f"Where is the {color} {shape}?", None) == expected
        assert not asked
        picked = synthetic.one_question_per_type(scene, np.random.default_rng(i))
        assert [k for k, _, _ in picked] == [k for k in synthetic.QUESTION_TYPES
                                             if any(q[0] == k for q in synthetic.questions(scene))]


def test_conversations_ask_distinct_questions_and_balance_yes_and_no():
    answers = []
    for i in range(200):
        scene = synthetic.make_scene(3, i, task="sentences")
        messages = synthetic.conversation(scene, np.random.default_rng(i), 4)
        questions = [m["value"].removeprefix("<image>\n") for m in messages[::2]]
        assert messages[0]["value"].startswith("<image>\n") and 1 <= len(questions) <= 4
        assert len(set(questions)) == len(questions)
        truth = {q: a for _, q, a in synthetic.questions(scene)}
        assert [m["value"] for m in messages[1::2]] == [truth[q] for q in questions]
        answers += [truth[q] for q in questions if q.startswith("Is there")]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_questions_beyond_the_types_come_in_rounds():
    """More questions than types: round after round of one of each type the scene still has, until every
    question it admits is asked. The first questions are those a smaller count picks."""
    for i in range(30):
        scene = synthetic.make_scene(5, i, task="sentences")
        every = synthetic.questions(scene)
        picked = synthetic.pick_questions(scene, np.random.default_rng(i), 100)
        assert sorted(picked) == sorted(every)
        remaining = {kind: sum(q[0] == kind for q in every) for kind in synthetic.QUESTION_TYPES}
        while picked:  # each round: the types still remaining, once each
            round_types = [kind for kind, n in remaining.items() if n]
            asked, picked = picked[:len(round_types)], picked[len(round_types):]
            assert sorted(q[0] for q in asked) == sorted(round_types)
            for kind in round_types:
                remaining[kind] -= 1
        assert synthetic.pick_questions(scene, np.random.default_rng(i), 3) == \
            synthetic.pick_questions(scene, np.random.default_rng(i), 100)[:3]
        assert set(q for _, q, _ in every) <= set(synthetic.every_question())


def test_sentences_tokenizer_has_one_token_per_word(tmp_path):
    demo.build_tokenizer(tmp_path, "sentences")
    tok = Tokenizer(tmp_path)
    for token in demo.SPECIAL_TOKENS:
        assert tok.token_id(token) is not None
    for text in ["a small red circle in the top left", "a large yellow triangle in the center", "one", "six", "yes",
                 "in the bottom right", "square", "green"]:
        ids = tok.encode(text)
        assert len(ids) == len(text.split()) and tok.decode(ids) == text
    assert tok.vocab_size <= demo.VOCAB_SIZE


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
