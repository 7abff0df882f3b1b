"""The model's one input struct (`RegionBatch`) and `PerceptionDLM.embed_inputs`, shared by inference and training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fixture_dir
from PIL import Image

from pdlm_jax import pipeline
from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import GenerationSettings
from pdlm_jax.modeling.pdm import PerceptionDLM
from pdlm_jax.region_batch import RegionBatch, stack
from pdlm_jax.regions.prepare import prepare_regions
from pdlm_jax.regions.tiling import tile_image
from pdlm_jax.regions.tokenizer import Tokenizer
from train import synthetic
from train.batches import Collate
from train.samples import Record, build_sample

# Without the double RoI scaling (SPEC §14.1) training and inference replay the same boxes, so the two input
# paths must give the same embeddings; with it they differ by design (scale 1/28 vs 1/32).
CFG = preset("tiny").replace(quirks=dataclasses.replace(preset("tiny").quirks, roi_double_scaling=False))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(fixture_dir("tiny_v1"))


@pytest.fixture(scope="module")
def model():
    return PerceptionDLM(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def record():
    scene = synthetic.make_scene(11, 0, num_shapes=3)
    return Record(Image.fromarray(scene.image), scene.masks, scene.captions)


def test_inference_and_training_embed_a_record_alike(model, tokenizer, record):
    """A record's inference row (prepare_regions → pass_inputs) and its training collation (build_sample →
    Collate, tiles and regions padded further) embed through embed_inputs to the same prompt embeddings: image
    rows, RoI vectors and tokens up to the answer, where the two sequences part."""
    k = len(record.masks)
    prep = prepare_regions(tile_image(record.image, CFG.region), record.masks, tokenizer, CFG, gen_length=4)
    bucket = pipeline.choose_bucket(prep.pixel_values.shape[0], k, prep.layout.length, CFG.region.prompt_numbers,
                                    GenerationSettings(gen_length=4, steps=4))
    row = pipeline.pass_inputs(prep, bucket, CFG, tokenizer.special.eot).regions
    sample = build_sample(record, range(k), np.random.default_rng(0), CFG, tokenizer, random_prompt_ids=False)
    T = sample.inputs.pixel_values.shape[0]
    train = Collate((T + 2,), (512,), CFG.region.prompt_numbers, tokenizer.special.eot)([sample])
    assert train.inputs.pixel_values.shape[1] == T + 2 and bucket.tiles == T  # padded tiles in training only

    inference = model.embed_inputs(jax.tree.map(jnp.asarray, stack([row])))
    training = model.embed_inputs(jax.tree.map(jnp.asarray, train.inputs), training=True)
    answer = int(np.flatnonzero(train.labels[0] >= 0)[0])  # the first answer token
    np.testing.assert_array_equal(row.input_ids[:answer], train.inputs.input_ids[0, :answer])
    assert np.isin(row.roi_positions[:k], np.arange(answer)).all()
    np.testing.assert_allclose(np.asarray(inference[0, :answer]), np.asarray(training[0, :answer]),
                               rtol=0, atol=1e-5)
    # and the RoI rows are not trivially equal: boxes of different regions give different vectors
    rois = np.asarray(inference[0, row.roi_positions[:k, 0]])
    assert not np.allclose(rois[0], rois[1])


def _row(tokenizer, record) -> RegionBatch:
    prep = prepare_regions(tile_image(record.image, CFG.region), record.masks, tokenizer, CFG, gen_length=4)
    return prep.inputs()


@pytest.mark.parametrize("field, value, message", [
    ("roi_boxes", None, r"RegionBatch.roi_boxes is missing: expected an array of shape \(B, P, 4\)"),
    ("roi_boxes", np.zeros((1, 3, 5), np.float32), r"roi_boxes has shape \(1, 3, 5\) .*expected \(1, 3, 4\)"),
    ("image_positions", np.zeros((1, 7), np.int32), r"image_positions has shape \(1, 7\) .*expected \(1, 20\)"),
    ("input_ids", np.zeros((1, 229), np.float32), r"input_ids has shape \(1, 229\) and dtype float32; .* integer"),
    ("mask_patches", np.zeros((1, 3, 5, 5, 5), bool), r"mask_patches has shape .* expected \(1, 3, 5, 4, 4\)"),
])
def test_a_missing_or_misshaped_field_is_named(tokenizer, record, field, value, message):
    batch = stack([_row(tokenizer, record)])
    batch.check(CFG)  # the real thing passes
    bad = batch.replace(**{field: value})
    with pytest.raises(PDLMError, match=message):
        bad.check(CFG)


def test_embed_inputs_checks_its_batch_before_tracing_the_model(model, tokenizer, record):
    batch = stack([_row(tokenizer, record)])
    too_many = batch.replace(prompt_ids=np.zeros((1, 7), np.int32),
                             mask_patches=np.zeros((1, 7, *batch.mask_patches.shape[2:]), bool),
                             roi_boxes=np.zeros((1, 7, 4), np.float32),
                             roi_positions=np.zeros((1, 7, batch.roi_positions.shape[-1]), np.int32))
    with pytest.raises(PDLMError, match="7 regions; the model has 6 prompt ids"):
        jax.jit(lambda b: model.embed_inputs(b))(too_many)
    with pytest.raises(PDLMError, match="RegionBatch.grid has shape"):
        model.embed_inputs(batch.replace(grid=np.zeros((1, 3), np.int32)))


def test_padding_a_row_keeps_it_and_fills_neutral_values(tokenizer, record):
    row = _row(tokenizer, record)
    T, k, L = row.pixel_values.shape[0], row.prompt_ids.shape[0], row.input_ids.shape[0]
    padded = row.padded(T + 1, 6, L + 10, pad_id=99)
    padded.check(CFG, batched=False)
    for f in dataclasses.fields(RegionBatch):  # the original row is a prefix of every field
        have, got = np.asarray(getattr(row, f.name)), np.asarray(getattr(padded, f.name))
        np.testing.assert_array_equal(got[tuple(slice(0, d) for d in have.shape)], have, err_msg=f.name)
    assert (padded.input_ids[L:] == 99).all() and not padded.valid[L:].any() and (padded.block_id[L:] == -1).all()
    assert (padded.roi_positions[k:] == L + 10).all()
    assert (padded.image_positions[len(row.image_positions):] == L + 10).all()
    assert not padded.mask_patches[k:].any() and not padded.pixel_values[T:].any()
    with pytest.raises(PDLMError, match="cannot pad RegionBatch.input_ids"):
        row.padded(T, k, L - 1, pad_id=0)
