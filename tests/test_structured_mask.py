"""Structured attention mask (SPEC §8) vs the reference fixtures and the SPEC's worked example."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FIXTURE_NAMES, fixture_array, fixture_regions, fixture_tokenizer
from pdlm_jax.ops.structured_mask import allowed_mask
from pdlm_jax.regions import build_layout


def mask_of(layout) -> np.ndarray:
    return np.asarray(jax.jit(allowed_mask)(layout.block_id, layout.roi_owner, layout.prefix_visible, layout.valid))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_allowed_matches_fixture(name):
    want = fixture_array(name, "attention_allowed")[0, 0]
    np.testing.assert_array_equal(mask_of(fixture_regions(name).layout), want)


def worked_example_layout():
    """SPEC §8's toy sequence: k = 2, G = 3, 16 RoI tokens per region, L = 60 after expansion."""
    s = fixture_tokenizer("tiny_v1").special
    text = 7  # any ordinary token
    ids = ([text, s.image_start, s.image_context, s.image_context, s.image_end] + [text] * 5  # [0, 10)
           + [s.reserved[0], 198, s.reserved[1]]  # RoI 0, "\n", RoI 1
           + [text] * 7  # "\n" + question + eot + "\n" + assistant header
           + [s.mask_cap[0]] + [s.mask] * 3 + [198] + [s.mask_cap[1]] + [s.mask] * 3 + [s.eot])
    return build_layout(np.array(ids), s, k=2, roi_tokens=16, gen_length=3, num_image_tokens=2)


def positions(*ranges) -> set[int]:
    return {i for a, b in ranges for i in range(a, b)}


def test_spec_worked_example():
    lay = worked_example_layout()
    assert lay.length == 60
    np.testing.assert_array_equal(lay.roi_positions, [np.arange(10, 26), np.arange(27, 43)])
    np.testing.assert_array_equal(lay.gen_positions, [[51, 52, 53], [56, 57, 58]])
    a = mask_of(lay)
    block0 = positions((0, 10), (10, 26), (43, 50), (50, 55))
    block1 = positions((0, 10), (27, 43), (43, 50), (55, 60))
    for q in range(60):
        want = block0 if 50 <= q < 55 else block1 if q >= 55 else set(range(60))
        assert set(np.flatnonzero(a[q])) == want, q


def _padded(lay, length: int):
    """The layout right-padded to `length` as `RegionBatch.padded` pads these fields: padded positions are
    invalid and outside every segment."""
    n = length - lay.length

    def pad(a, value):
        return np.concatenate([a, np.full(n, value, dtype=a.dtype)])

    return dataclasses.replace(lay, input_ids=pad(lay.input_ids, 0), block_id=pad(lay.block_id, -1),
                               roi_owner=pad(lay.roi_owner, -1), prefix_visible=pad(lay.prefix_visible, False),
                               valid=pad(lay.valid, False))


def test_padding_and_vmap_over_a_batch():
    lay = worked_example_layout()
    other = fixture_regions("tiny_v1").layout
    n = other.length + 7
    batch = [_padded(lay, n), _padded(other, n)]
    stacked = [jnp.stack([getattr(b, f) for b in batch]) for f in ("block_id", "roi_owner", "prefix_visible", "valid")]
    got = np.asarray(jax.jit(jax.vmap(allowed_mask))(*stacked))
    assert got.shape == (2, n, n)
    for b, unpadded in zip(got, (lay, other)):
        length = unpadded.length
        np.testing.assert_array_equal(b[:length, :length], mask_of(unpadded))
        assert not b[:, length:].any()  # padding keys are never visible
        assert b[length:, :length].all()  # padding rows see every valid key (no empty softmax rows)
