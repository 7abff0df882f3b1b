"""`pdlm-infer --history` (the slot tokens after every forward, across the chunks of more than 6 masks) and
`--visualize-steps` (the same as a picture)."""

import json

import numpy as np
from PIL import Image

from infer.cli import main as infer_main
from infer.visualize import MASKED, NEW, REMASKED, steps_grid
from pdlm_jax.asset_paths import DEMO_MODEL, DEMO_SCENE
from pdlm_jax.checkpoint import tokenizer_path
from pdlm_jax.generation import for_checkpoint
from pdlm_jax.regions.tokenizer import Tokenizer
from pdlm_jax.sampling import remask_counts


def test_history_spans_every_chunk_and_ends_with_the_tokens(tmp_path):
    masks = sorted(str(p) for p in DEMO_SCENE.glob("mask_*.png"))
    masks += masks[: 7 - len(masks)]  # 7 masks: a pass of 6, then a pass of 1
    out, picture = tmp_path / "result.json", tmp_path / "steps.png"
    assert infer_main(["--image", str(DEMO_SCENE / "image.png"), "--masks", *masks, "--history", "--output", str(out),
                       "--visualize-steps", str(picture), "--quiet"]) == 0
    result = json.loads(out.read_text())
    history, regions = result["history"], result["regions"]
    G, S = for_checkpoint(DEMO_MODEL).gen_length, for_checkpoint(DEMO_MODEL).steps
    first, second_pass = remask_counts(6 * G, S), remask_counts(G, S)
    assert len(history) == result["forwards"] == len(first) + len(second_pass)
    assert history[-1] == [r["token_ids"] for r in regions]
    mask_id = Tokenizer(tokenizer_path(DEMO_MODEL)).special.mask
    chunk = [r["chunk"] for r in regions]
    assert sorted(chunk) == [0] * 6 + [1]
    second = chunk.index(1)
    # While the first pass runs, the second pass's region is all masks; then the first pass's are final.
    assert all(step[second] == [mask_id] * G for step in history[: len(first)])
    assert all(step[j] == regions[j]["token_ids"] for step in history[len(first):] for j in range(7) if j != second)
    masked = [sum(t == mask_id for region in step for t in region) for step in history]
    assert masked == [n + G for n in first] + second_pass
    assert Image.open(picture).size[1] > Image.open(picture).size[0] / 20  # written: one row per forward


def _has(picture: Image.Image, colour, box) -> bool:
    return bool((np.asarray(picture.crop(box)) == colour).all(axis=-1).any())


def test_steps_grid_marks_masked_new_and_remasked_slots():
    """Region 1's first slot is committed at step 1 and re-masked at step 2: a red box in row 2 only; each
    step's new tokens in amber; masked slots as grey boxes."""
    m = 9
    history = np.array([[[m, m], [5, m]],
                        [[1, m], [m, 6]],
                        [[1, 2], [7, 6]]])
    picture = steps_grid(history, m, lambda t: f"w{t}")
    rows = [picture.crop((0, y0, picture.width, y1)) for y0, y1 in
            ((picture.height * k // 4, picture.height * (k + 1) // 4) for k in (1, 2, 3))]
    full = (0, 0, picture.width, rows[0].height)
    assert [_has(r, REMASKED, full) for r in rows] == [False, True, False]
    assert all(_has(r, NEW, full) for r in rows)
    assert [_has(r, MASKED, full) for r in rows] == [True, True, False]
