"""Host preprocessing vs the reference fixtures: tiling, masks, boxes, tokenizer, prompt layout (SPEC §5, §6)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from helpers import FIXTURE_NAMES, fixture_config, fixture_dir, fixture_mask_paths, fixture_oracle, fixture_tokenizer
from helpers import fixture_array as npz, fixture_prepared as prepared
from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions import (DEFAULT_QUESTION, Tokenizer, build_prompt_text, load_masks, prepare_regions,
                              select_grid, tile_image)
from pdlm_jax.regions.masks import patch_activity, visual_prompt_tiles
from pdlm_jax.regions.tiling import normalize


# ---- tiling (SPEC §6.1-6.3) --------------------------------------------------------------------------------

@pytest.mark.parametrize("size,grid", [((640, 480), (3, 2)), ((480, 640), (2, 3)), ((512, 512), (1, 1)),
                                       ((1024, 1024), (2, 2)), ((1920, 1080), (2, 1)), ((800, 200), (4, 1)),
                                       ((640, 246), (3, 1)), ((640, 476), (3, 2))])
def test_grid_selection_examples(size, grid):
    assert select_grid(*size, preset("perceptiondlm-8b").region) == grid


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tiles_and_pixel_values_match_fixture(name):
    tiled, _ = prepared(name)
    np.testing.assert_array_equal(tiled.tiles_uint8, npz(name, "tiles_uint8"))
    np.testing.assert_array_equal(tiled.pixel_values, npz(name, "pixel_values").transpose(0, 2, 3, 1))
    assert tiled.grid == tuple(npz(name, "aspect_ratio")[0])
    o = fixture_oracle(name)["image"]
    assert tiled.size == (o["width"], o["height"]) and tiled.num_tiles == o["num_tiles"]


def test_tile_image_accepts_pil_modes_and_arrays():
    region = fixture_config("tiny_v1").region
    path = fixture_dir("tiny_v1") / "image.png"
    ref = npz("tiny_v1", "tiles_uint8")
    rgb = Image.open(path).convert("RGB")
    np.testing.assert_array_equal(tile_image(rgb.convert("RGBA"), region).tiles_uint8, ref)
    np.testing.assert_array_equal(tile_image(np.asarray(rgb), region).tiles_uint8, ref)
    gray = tile_image(rgb.convert("L"), region)  # any mode is converted to RGB first
    assert gray.tiles_uint8.shape == ref.shape
    np.testing.assert_array_equal(gray.tiles_uint8[..., 0], gray.tiles_uint8[..., 2])


def test_single_tile_image_has_no_thumbnail():
    tiled = tile_image(np.zeros((64, 64, 3), np.uint8), fixture_config("tiny_v1").region)
    assert tiled.grid == (1, 1) and tiled.num_tiles == 1
    np.testing.assert_array_equal(tiled.pixel_values, -1.0)


def test_normalisation_is_slow_siglip_processor():
    from transformers import SiglipImageProcessor

    tiles = npz("tiny_v1", "tiles_uint8")
    proc = SiglipImageProcessor(size={"height": 64, "width": 64})
    ref = proc(images=list(tiles), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(normalize(tiles), ref)


def test_unreadable_image_names_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(PDLMError, match="broken.jpg"):
        tile_image(bad, fixture_config("tiny_v1").region)
    with pytest.raises(PDLMError, match="missing.png"):
        tile_image(tmp_path / "missing.png", fixture_config("tiny_v1").region)


# ---- masks (SPEC §6.4, §3.1) -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sort_order_areas_and_boxes_match_fixture(name):
    _, p = prepared(name)
    o = fixture_oracle(name)
    tok = fixture_tokenizer(name)
    np.testing.assert_array_equal(p.order, o["masks"]["sort_idx_desc_area"])
    np.testing.assert_array_equal(p.areas, np.asarray(o["masks"]["areas"])[p.order])
    np.testing.assert_array_equal(p.prompt_ids, [int(s[len("<Prompt"):-1]) for s in o["masks"]["prompt_tokens"]])
    for c, box in enumerate(p.boxes):
        assert tuple(box) == tuple(o["masks"]["bboxes"][str(tok.special.reserved[c])])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_visual_prompt_tiles_and_patch_grid_match_fixture(name):
    """Our uint8 visual-prompt tiles normalise to the fixture's mask_values, and the active patches equal
    the reference rule round(((x + 1) / 2) * 255) != 255 at the top-left pixel of each patch."""
    tiled, p = prepared(name)
    cfg = fixture_config(name)
    mask_values = npz(name, "mask_values")
    masks = load_masks(fixture_mask_paths(name), tiled.size)
    k = cfg.region.mask_kernel_size
    for c, i in enumerate(p.order):
        tiles = visual_prompt_tiles(masks[i], c, tiled.grid, cfg.region)
        np.testing.assert_array_equal(normalize(tiles), mask_values[c].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(patch_activity(tiles, cfg.region), p.mask_patches[c])
    ref_active = np.round((mask_values[:, :, 0, ::k, ::k] + 1.0) / 2.0 * 255.0) != 255
    np.testing.assert_array_equal(p.mask_patches, ref_active)
    g = cfg.region.image_size // k
    assert p.mask_patches.shape == (3, tiled.num_tiles, g, g)


def test_demo_patch_counts_from_spec():
    _, p = prepared("demo512")
    np.testing.assert_array_equal(p.mask_patches.sum((2, 3)), [[0, 393, 115, 62, 528, 101, 199],
                                                               [0, 0, 0, 201, 0, 0, 34],
                                                               [0, 20, 0, 0, 0, 0, 2]])


def test_mask_inputs_any_form_and_resize_logged(caplog):
    d = fixture_dir("tiny_v1")
    path = d / "mask_0.png"
    ref = load_masks([path], (96, 64))[0]
    pil = Image.open(path)
    for m in (pil.convert("RGB"), pil.convert("L"), np.asarray(pil.convert("L")), np.asarray(pil.convert("L")) > 0,
              np.asarray(pil.convert("RGB"))):
        np.testing.assert_array_equal(load_masks([m], (96, 64))[0], ref)
    small = pil.convert("L").resize((48, 32), Image.Resampling.NEAREST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one log line, not a Python warning with its source line
        up = load_masks([small], (96, 64))[0]
    assert [r.getMessage() for r in caplog.records] == [
        "mask 0 is 48x32 but the image is 96x64: resized to the image with nearest-neighbour"]
    np.testing.assert_array_equal(up, np.asarray(small.resize((96, 64), Image.Resampling.NEAREST)) > 0)


def test_area_ties_put_higher_index_first():
    from pdlm_jax.regions import area_order

    np.testing.assert_array_equal(area_order([5, 9, 5, 1]), [1, 2, 0, 3])


def test_mask_errors(tmp_path):
    size = (96, 64)
    with pytest.raises(PDLMError, match="no masks"):
        load_masks([], size)
    empty = tmp_path / "empty.png"
    Image.new("L", size).save(empty)
    with pytest.raises(PDLMError, match=r"mask 1 .*empty\.png.* empty"):
        load_masks([fixture_dir("tiny_v1") / "mask_0.png", empty], size)
    with pytest.raises(PDLMError, match="mask 0 is empty"):
        load_masks([np.zeros((64, 96), bool)], size)
    bad = tmp_path / "bad_mask.png"
    bad.write_text("garbage")
    with pytest.raises(PDLMError, match="bad_mask.png"):
        load_masks([bad], size)
    seven = [np.ones((64, 96), bool)] * 7  # fine to load: the caller chunks
    assert len(load_masks(seven, size)) == 7
    cfg = fixture_config("tiny_v1")
    tiled = tile_image(np.zeros((64, 96, 3), np.uint8), cfg.region)
    with pytest.raises(PDLMError, match="chunks"):
        prepare_regions(tiled, seven, fixture_tokenizer("tiny_v1"), cfg, gen_length=4)


# ---- tokenizer and prompt (SPEC §5) ------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_prompt_text_and_input_ids_match_fixture(name):
    tiled, p = prepared(name)
    o = fixture_oracle(name)
    tok = fixture_tokenizer(name)
    assert p.prompt_text == o["prompt_text"]
    assert p.prompt_text == build_prompt_text(tiled.num_tiles, fixture_config(name).region.num_image_tokens, 3,
                                              o["generation"]["gen_length_per_mask"], DEFAULT_QUESTION)
    np.testing.assert_array_equal(tok.encode(p.prompt_text), npz(name, "input_ids")[0])
    np.testing.assert_array_equal(p.layout.input_ids, npz(name, "input_ids_after_replay")[0])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_layout_positions_match_fixture(name):
    tiled, p = prepared(name)
    o = fixture_oracle(name)
    lay = p.layout
    ids = npz(name, "input_ids_after_replay")[0]
    tok = fixture_tokenizer(name)
    np.testing.assert_array_equal(lay.image_positions, np.flatnonzero(ids == tok.special.image_context))
    assert lay.image_positions.size == tiled.num_tiles * fixture_config(name).region.num_image_tokens
    spans = o["replay"]["reserved_token_spans"][0]
    np.testing.assert_array_equal(lay.roi_positions, [np.arange(s, e) for _, s, e in spans])
    np.testing.assert_array_equal(lay.gen_positions, [c["positions"] for c in o["outputs"]["caption_tokens"]])
    assert lay.length == ids.size and lay.valid.all()


def test_tokenizer_special_ids_and_decode():
    name = "tiny_v1"
    tok = fixture_tokenizer(name)
    o = fixture_oracle(name)
    ids = o["tokenizer"]["special_token_ids"]
    s = tok.special
    assert s.mask == ids["<|mdm_mask|>"] == o["tokenizer"]["mask_id"]
    assert s.image_context == ids["<IMG_CONTEXT>"] == o["tokenizer"]["image_token_id"]
    assert (s.eot, s.image_start, s.image_end) == (ids["<|eot_id|>"], ids["<img>"], ids["</img>"])
    assert (s.start_header, s.end_header) == (ids["<|start_header_id|>"], ids["<|end_header_id|>"])
    assert s.reserved == tuple(ids[f"<|reserved_token_{i}|>"] for i in range(6))
    assert s.mask_cap == tuple(ids[f"<|Mask_Cap_{i}|>"] for i in range(16))
    assert tok.decode(o["outputs"]["output_ids"]) == o["outputs"]["decoded"]


def test_tokenizer_matches_transformers_fast_tokenizer():
    from transformers import PreTrainedTokenizerFast

    d = fixture_dir("tiny_v1")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    text = build_prompt_text(2, 4, 2, 5, "What is in region one, and why?  Ünïcode ✓")
    np.testing.assert_array_equal(Tokenizer(d).encode(text), hf(text)["input_ids"])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(PDLMError, match="tokenizer"):
        Tokenizer(tmp_path)
    spec = json.loads((fixture_dir("tiny_v1") / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<IMG_CONTEXT>"]
    spec["model"]["vocab"].pop("<IMG_CONTEXT>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(PDLMError, match="<IMG_CONTEXT>"):
        Tokenizer(tmp_path)


def test_question_with_special_tokens_is_rejected():
    name = "tiny_v1"
    tiled, _ = prepared(name)
    d = fixture_dir(name)
    with pytest.raises(PDLMError, match="special tokens"):
        prepare_regions(tiled, [d / "mask_0.png"], Tokenizer(d), fixture_config(name), 4,
                        question="Look at <|reserved_token_0|>")
