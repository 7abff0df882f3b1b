"""RoI-Align vs torchvision, RoI replay and embedding assembly vs the reference fixtures (SPEC §7).

torchvision's outputs are recorded in tests/fixtures/torchvision_roi_align.npz (by
tests/fixtures/record_torchvision_roi_align.py), for the inputs of tests/roi_align_cases.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import roi_align_cases as cases
from helpers import (FIXTURES, FIXTURE_NAMES, fixture_config, fixture_dir, fixture_oracle, fixture_regions,
                     fixture_tokenizer, load_reference_tree, merged_feature_map)
from helpers import fixture_array as npz
from pdlm_jax.ops.roi_align import roi_align
from pdlm_jax.ops.roi_replay import assemble_embeddings, roi_boxes, roi_replay, roi_spatial_scale


def torchvision_output(key: str) -> np.ndarray:
    """torchvision's recorded roi_align output (K, ph, pw, C) for case `key`."""
    with np.load(FIXTURES / "torchvision_roi_align.npz") as z:
        return z[key]


# Eager mode would dispatch (and compile) every small op separately: jit once per static configuration.
jit_roi_align = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))
jit_roi_replay = jax.jit(roi_replay, static_argnames=("grid", "region", "quirks", "num_tiles"))


# ---- roi_align -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_roi_align_cases(name):
    fmap = npz(name, "roi_test_input")[0].transpose(1, 2, 0)
    for case in fixture_oracle(name)["roi_align_test_cases"]:
        box = np.asarray([case["box"][1:]], np.float32)
        got = jit_roi_align(jnp.asarray(fmap), jnp.asarray(box), tuple(case["output_size"]), case["spatial_scale"],
                            2, True)
        want = npz(name, case["npz_key"]).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("i", range(len(cases.SETTINGS)))
def test_roi_align_matches_torchvision(i):
    output_size, sampling_ratio, aligned, scale = cases.SETTINGS[i]
    fmap, boxes = cases.setting_case(*cases.SETTINGS[i])
    np.testing.assert_array_equal(boxes, torchvision_output(f"{cases.setting_key(i)}_boxes"))  # same inputs
    got = jit_roi_align(jnp.asarray(fmap), jnp.asarray(boxes), output_size, scale, sampling_ratio, aligned)
    want = torchvision_output(f"{cases.setting_key(i)}_out")
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)


def test_roi_align_traced_valid_size_over_padded_map():
    """One compiled program for several valid sizes of a padded map equals torchvision on the unpadded map."""
    padded, boxes_per_size = cases.padded_cases()
    fn = jax.jit(lambda f, b, h, w: roi_align(f, b, (4, 4), 1.0, 2, True, height=h, width=w))
    for (h, w), boxes in zip(cases.PADDED_SIZES, boxes_per_size):
        got = fn(jnp.asarray(padded), jnp.asarray(boxes), h, w)
        np.testing.assert_allclose(np.asarray(got), torchvision_output(f"padded_{h}x{w}_out"), rtol=0, atol=2e-6)
    assert fn._cache_size() == 1


# ---- RoI replay (SPEC §7.2) --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_merged_feature_map_matches_fixture(name):
    cfg = fixture_config(name)
    grid = tuple(int(v) for v in npz(name, "aspect_ratio")[0])
    got = merged_feature_map(jnp.asarray(npz(name, "vision_embeds")), grid, cfg.region, cfg.quirks)
    np.testing.assert_array_equal(np.asarray(got), npz(name, "merged_feature_map")[0].transpose(1, 2, 0))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_roi_boxes_and_scale_match_fixture(name):
    cfg = fixture_config(name)
    p = fixture_regions(name)
    calls = fixture_oracle(name)["replay"]["roi_align_calls"]
    for c in range(3):
        np.testing.assert_array_equal(p.roi_boxes[c], npz(name, f"replay_roi_boxes_{c}")[0, 1:])
        assert roi_spatial_scale(cfg.quirks) == calls[c]["spatial_scale"]
        assert list(calls[c]["output_size"]) == [cfg.region.roi_output_size] * 2


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_roi_replay_matches_fixture_with_traced_grid(name):
    cfg = fixture_config(name)
    p = fixture_regions(name)
    vision = npz(name, "vision_embeds")
    fn = jax.jit(lambda v, g, b: roi_replay(v, g, b, cfg.region, cfg.quirks))
    got = np.asarray(fn(jnp.asarray(vision), jnp.asarray(p.grid), jnp.asarray(p.roi_boxes)))
    for c in range(3):
        ref = npz(name, f"replay_roi_output_{c}")[0]  # (H, R, R)
        # Inside jit XLA contracts a*b + c into FMAs, so the last bit may differ from torchvision's CPU kernel.
        np.testing.assert_allclose(got[c], ref.reshape(ref.shape[0], -1).T, rtol=0, atol=1e-6)


def test_roi_replay_ignores_padding_tiles():
    name = "tiny_v1_wide"
    cfg = fixture_config(name)
    p = fixture_regions(name)
    vision = npz(name, "vision_embeds")
    padded = np.concatenate([vision, np.full((3,) + vision.shape[1:], 1e6, np.float32)])
    got = jit_roi_replay(jnp.asarray(padded), grid=p.grid, boxes=jnp.asarray(p.roi_boxes), region=cfg.region,
                         quirks=cfg.quirks, num_tiles=vision.shape[0])
    want = jit_roi_replay(jnp.asarray(vision), grid=p.grid, boxes=jnp.asarray(p.roi_boxes), region=cfg.region,
                          quirks=cfg.quirks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_single_tile_replay_uses_the_tile_itself():
    """T = 1: no shift; with the double scaling every RoI vector is the map's cell (0, 0) (SPEC §7.2.5)."""
    cfg = fixture_config("tiny_v1_wide")
    rng = np.random.default_rng(2)
    f = cfg.region.feature_grid
    vision = rng.standard_normal((1, f * f, 6)).astype(np.float32)
    boxes = roi_boxes(np.array([[0.1, 0.2, 0.9, 0.8], [0.5, 0.5, 0.6, 0.9]]), (1, 1), cfg.region, cfg.quirks)
    got = np.asarray(jit_roi_replay(jnp.asarray(vision), grid=(1, 1), boxes=jnp.asarray(boxes), region=cfg.region,
                                    quirks=cfg.quirks))
    np.testing.assert_array_equal(got, np.broadcast_to(vision[0, 0], got.shape))


def test_quirk_switches_change_replay_as_documented():
    name = "tiny_v1_wide"
    cfg = fixture_config(name)
    p = fixture_regions(name)
    vision = npz(name, "vision_embeds")
    r = cfg.region.roi_output_size
    fixed = dataclasses.replace(cfg.quirks, roi_double_scaling=False, roi_tile_shift=False)
    # Without the shift the map is tiles[0:cols*rows]; without double scaling the box is in feature units.
    fmap = merged_feature_map(jnp.asarray(vision), p.grid, cfg.region, fixed)
    np.testing.assert_array_equal(np.asarray(fmap)[:, :cfg.region.feature_grid], vision[0].reshape(8, 8, -1))
    boxes = roi_boxes(p.boxes, p.grid, cfg.region, fixed)
    got = jit_roi_replay(jnp.asarray(vision), grid=p.grid, boxes=jnp.asarray(boxes), region=cfg.region, quirks=fixed)
    np.testing.assert_array_equal(np.asarray(fmap), torchvision_output("quirk_fmap"))  # the recorded inputs
    np.testing.assert_array_equal(boxes.astype(np.float32), torchvision_output("quirk_boxes"))
    want = torchvision_output("quirk_out")
    np.testing.assert_allclose(np.asarray(got), want.reshape(3, r * r, -1), rtol=0, atol=1e-6)
    training = roi_boxes(p.boxes, p.grid, cfg.region, cfg.quirks, training=True)
    assert roi_spatial_scale(cfg.quirks, training=True) == 1 / 28
    np.testing.assert_allclose(training, p.roi_boxes, rtol=1e-6)  # same feature units, different scale


# ---- embedding assembly (SPEC §7.1, §7.2.6) ----------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_assembled_inputs_embeds_match_fixture(name):
    cfg = fixture_config(name)
    p = fixture_regions(name)
    embed = load_reference_tree(fixture_dir(name), cfg)["lm"]["embed"]["embedding"]
    vision = jnp.asarray(npz(name, "vision_embeds"))
    lay = p.layout

    @jax.jit
    def run(ids, vision, boxes, image_positions, roi_positions):
        roi = roi_replay(vision, p.grid, boxes, cfg.region, cfg.quirks)
        return assemble_embeddings(jnp.asarray(embed)[ids], vision, roi, image_positions, roi_positions)

    got = np.asarray(run(lay.input_ids, vision, p.roi_boxes, lay.image_positions, lay.roi_positions))
    want = npz(name, "inputs_embeds")[0]
    assert np.abs(got - want).max() <= 1e-6
    # The image part also agrees with the reference's pre-replay embeddings.
    before = npz(name, "inputs_embeds_before_replay")[0]
    image_before = np.flatnonzero(npz(name, "input_ids")[0] == fixture_tokenizer(name).special.image_context)
    np.testing.assert_array_equal(got[lay.image_positions], before[image_before])


def test_assemble_drops_positions_past_the_end():
    token = jnp.zeros((6, 2))
    vision = jnp.arange(8.0).reshape(2, 2, 2)  # 2 tiles x 2 tokens; the second tile is padding
    roi = jnp.ones((2, 1, 2))  # the second region is padding
    out = assemble_embeddings(token, vision, roi, jnp.array([1, 2, 6, 6]), jnp.array([[4], [6]]))
    np.testing.assert_array_equal(np.asarray(out), [[0, 0], [0, 1], [2, 3], [0, 0], [1, 1], [0, 0]])
