"""`pdlm-infer --history`: the slot tokens after every forward, across the chunks of more than 6 masks."""

import json

from infer.cli import main as infer_main
from pdlm_jax.asset_paths import DEMO_MODEL, DEMO_SCENE
from pdlm_jax.checkpoint import tokenizer_path
from pdlm_jax.regions.tokenizer import Tokenizer


def test_history_spans_every_chunk_and_ends_with_the_tokens(tmp_path):
    masks = sorted(str(p) for p in DEMO_SCENE.glob("mask_*.png"))
    masks += masks[:2]  # 7 masks: a pass of 6, then a pass of 1
    out = tmp_path / "result.json"
    assert infer_main(["--image", str(DEMO_SCENE / "image.png"), "--masks", *masks, "--history", "--output", str(out),
                       "--quiet"]) == 0
    result = json.loads(out.read_text())
    history, regions = result["history"], result["regions"]
    assert len(history) == result["forwards"] == 6  # 3 steps per pass
    assert history[-1] == [r["token_ids"] for r in regions]
    mask_id = Tokenizer(tokenizer_path(DEMO_MODEL)).special.mask
    chunk = [r["chunk"] for r in regions]
    assert sorted(chunk) == [0] * 6 + [1]
    second = chunk.index(1)
    # While the first pass runs, the second pass's region is all masks; then the first pass's are final.
    assert all(step[second] == [mask_id] * 3 for step in history[:3])
    assert all(step[j] == regions[j]["token_ids"] for step in history[3:] for j in range(7) if j != second)
    masked = [sum(t == mask_id for region in step for t in region) for step in history]
    assert masked == [12 + 3, 6 + 3, 0 + 3, 2, 1, 0]
