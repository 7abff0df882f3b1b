"""Many images per call: the passes of one bucket run as the rows of one program, same tokens as one at a time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import fixture_config, fixture_dir, fixture_oracle, load_reference_tree
from pdlm_jax import PDLMError
from pdlm_jax.api import RegionCaptioner
from pdlm_jax.modeling.pdm import from_tree
from pdlm_jax.regions.tokenizer import Tokenizer

NAME = "tiny_v1"


@functools.cache
def _model():
    cfg = fixture_config(NAME)
    return from_tree(cfg, load_reference_tree(fixture_dir(NAME), cfg), dtype=jnp.float32)


def _handle() -> RegionCaptioner:
    """A fresh handle: no compiled program yet."""
    return RegionCaptioner(fixture_config(NAME), _model(), Tokenizer(fixture_dir(NAME)))


@functools.cache
def _alone():
    """The shared handle for one-image-at-a-time runs (each bucket compiled once for all tests)."""
    return _handle()


def _box_masks(rng, size, n):
    w, h = size
    out = []
    for _ in range(n):
        mw, mh = rng.integers(6, w // 2), rng.integers(6, h // 2)
        x, y = rng.integers(0, w - mw), rng.integers(0, h - mh)
        m = np.zeros((h, w), bool)
        m[y:y + mh, x:x + mw] = True
        out.append(m)
    return out


def _items():
    """Four images of one bucket (7 tiles, 3 masks → 4 padded regions) and one of another (2 masks)."""
    d, oracle = fixture_dir(NAME), fixture_oracle(NAME)
    rng = np.random.default_rng(5)
    fixture = (Image.open(d / "image.png").convert("RGB"), [d / f for f in oracle["masks"]["files"]])
    others = []
    for n in (3, 3, 2, 3):
        image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
        others.append((image, _box_masks(rng, image.size, n)))
    return [fixture] + others


def _ids(result):
    return [r["token_ids"] for r in result["regions"]]


@pytest.mark.parametrize("mode", [dict(), dict(cache="prefix", unmask="threshold:0.5")])
def test_batch_equals_one_at_a_time(mode):
    items = _items()
    settings = dict(gen_length=8, steps=8, **mode)
    alone = [_alone().caption_regions(image, masks, **settings) for image, masks in items]
    handle = _handle()
    batched = handle.caption_batch(items, **settings)
    assert handle.program.num_compiled == 2  # one program per bucket, whatever the image count
    assert len(batched) == len(items)
    for one, many in zip(alone, batched):
        assert _ids(many) == _ids(one)
        assert [r["caption"] for r in many["regions"]] == [r["caption"] for r in one["regions"]]
        assert many["image"] == one["image"] and many["mode"] == one["mode"]
    if not mode:  # the exact mode in a batch is still the reference's output
        oracle = fixture_oracle(NAME)
        want = [c["token_ids"] for c in oracle["outputs"]["caption_tokens"]]
        assert [batched[0]["regions"][j]["token_ids"] for j in oracle["masks"]["sort_idx_desc_area"]] == want
        assert batched[0]["forwards"] == oracle["generation"]["num_forwards"]


def test_fixed_batch_size_pads_the_last_call(without_compilation_cache):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    items = [it for it in _items() if len(it[1]) == 3]  # 4 images of one bucket, in calls of 3 then 1 (+2 filler)
    handle = _handle()
    before = len(compiles)
    batched = handle.caption_batch(items, gen_length=8, steps=8, batch_size=3)
    assert handle.program.num_compiled == 1 and len(compiles) - before >= 1
    alone = [_alone().caption_regions(image, masks, gen_length=8, steps=8) for image, masks in items]
    assert [_ids(r) for r in batched] == [_ids(r) for r in alone]


def test_images_with_more_than_six_masks_batch_their_chunks():
    items = _items()
    image, masks = items[1]
    many = masks + _box_masks(np.random.default_rng(9), image.size, 5)  # 8 masks: chunks of 6 and 2
    both = _alone().caption_batch([(image, many), items[3]], gen_length=8, steps=8)
    alone = [_alone().caption_regions(image, many, gen_length=8, steps=8),
             _alone().caption_regions(*items[3], gen_length=8, steps=8)]
    assert [_ids(r) for r in both] == [_ids(r) for r in alone]
    assert [r["chunk"] for r in both[0]["regions"]].count(1) == 2


def test_bad_batch_size():
    with pytest.raises(PDLMError, match="batch_size"):
        _alone().caption_batch(_items()[:1], gen_length=8, steps=8, batch_size=0)


def test_an_image_without_masks_is_refused():
    with pytest.raises(PDLMError, match="list of \\(image, masks\\) pairs"):
        _alone().caption_batch(fixture_dir(NAME) / "image.png", gen_length=8, steps=8)


def test_caption_regions_returns_one_result_and_points_lists_to_caption_batch():
    with pytest.raises(PDLMError, match="needs its masks.*call caption_batch"):  # a list of pairs is no image
        _alone().caption_regions(_items()[:2], gen_length=8, steps=8)
    with pytest.raises(PDLMError, match="call caption_batch"):
        _alone().caption_regions(fixture_dir(NAME) / "image.png", gen_length=8, steps=8)
