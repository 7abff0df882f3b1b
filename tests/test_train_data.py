"""Training data (SPEC §11.2–11.3): schema variants, mask groups, sample construction, buckets, determinism."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np
import pytest
from helpers import encode_rle
from PIL import Image

from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.prompt import DEFAULT_QUESTION
from train import config as train_config
from train import synthetic
from train.batches import Collate, build_pipeline
from train.config import DataConfig
from train.loss import IGNORE
from train.samples import Limits, Record, build_sample, groups_per_record, mask_group
from train.sources import AnnotationSource, SyntheticRecords

CFG = preset("tiny")


def _write_annotations(tmp_path, annotation_file):
    """Both schema variants: image_file / mask_rles / captions, and an inline image with annotations."""
    path, scene = annotation_file(tmp_path / "ann.json", seed=7, num_shapes=3)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    inline = {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
              "annotations": [{"caption": "everything", "segmentation": None},
                              {"caption": scene.captions[0], "segmentation": encode_rle(scene.masks[0])}]}
    path.write_text(json.dumps(json.loads(path.read_text()) + [inline]))
    return path, scene


def test_both_schema_variants_decode(tmp_path, annotation_file):
    path, scene = _write_annotations(tmp_path, annotation_file)
    source = AnnotationSource([path])  # relative image path resolved next to the JSON
    a, b = source[0], source[1]
    assert a.captions == scene.captions
    for got, want in zip(a.masks, scene.masks):
        np.testing.assert_array_equal(got, want)
    assert b.captions == ["everything", scene.captions[0]]
    assert b.masks[0].all() and b.masks[0].shape == scene.masks[0].shape  # null segmentation = whole image
    np.testing.assert_array_equal(np.asarray(b.image), scene.image)


@pytest.mark.parametrize("record, message", [
    ({"mask_rles": [{"size": [2, 2], "counts": "04"}], "captions": ["x"]}, "names no image"),
    ({"image_file": "a.png"}, "no masks"),
    ({"image_file": "a.png", "mask_rles": [{"size": [2, 2], "counts": "04"}], "captions": []}, "one caption per"),
])
def test_bad_records_name_the_problem(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(PDLMError, match=message):
        AnnotationSource([path])


def _bad_records(scene, rle):
    """(record, expected message) for every kind of bad record; all but the image are otherwise valid."""
    good = {"image_file": "img.png", "mask_rles": [rle(m) for m in scene.masks], "captions": scene.captions}
    h, w = scene.masks[0].shape
    return [
        ({**good, "image_file": "missing.png"}, "image 'missing.png' not found"),
        ({**good, "mask_rles": [{"size": [4, 4], "counts": "12"}] + good["mask_rles"][1:]}, "mask 0: corrupt mask RLE"),
        ({**good, "mask_rles": [rle(np.zeros((h, w), bool))] + good["mask_rles"][1:]}, "mask 0 is empty"),
        ({**good, "captions": ["word " * 400] + scene.captions[1:]}, "its longest sample has .* tokens"),
        ({"image_file": "img.png"}, "no masks"),
    ]


def test_every_record_is_checked_when_the_files_load(tmp_path, tokenizer, annotation_file):
    """Bad records are found before training: the message names the file and the record's index in that file;
    on_bad_record=skip leaves them out and counts them."""
    path, scene = _write_annotations(tmp_path, annotation_file)
    limits = Limits(CFG.region, tokenizer, DEFAULT_QUESTION, 3.5, 7, 512)
    good = json.loads(path.read_text())[0]
    bad = _bad_records(scene, encode_rle)
    second = tmp_path / "second.json"
    for record, message in bad:
        second.write_text(json.dumps([good, good, record]))
        with pytest.raises(PDLMError, match=f"second.json record 2: {message}"):
            AnnotationSource([path, second], limits=limits)
    second.write_text(json.dumps([good] + [r for r, _ in bad]))
    source = AnnotationSource([path, second], limits=limits, on_bad_record="skip")
    assert len(source) == 3 and len(source.skipped) == len(bad)
    assert source.label(2) == f"{second} record 0" and "second.json record 1: image" in source.skipped[0]


def test_corrupt_rle_is_rejected_naming_file_and_record(tmp_path, annotation_file):
    """The RLE pycocotools would decode from uninitialised memory stops the load (or, with on_bad_record=skip,
    leaves its record out); the message names the file, the record's position and id, and the mask."""
    path, _ = _write_annotations(tmp_path, annotation_file)
    good = json.loads(path.read_text())[0]
    bad = {**good, "image_id": "cat-7", "mask_rles": [{"size": [4, 4], "counts": "12"}] + good["mask_rles"][1:]}
    path.write_text(json.dumps([good, bad]))
    where = f"{path} record 1 (image_id 'cat-7'): mask 0: corrupt mask RLE"
    with pytest.raises(PDLMError, match=re.escape(where)):
        AnnotationSource([path])
    source = AnnotationSource([path], on_bad_record="skip")
    assert len(source) == 1 and source.skipped[0].startswith(where)


def test_longest_sample_estimate_is_the_real_length(tokenizer):
    """The load-time length check computes exactly what build_sample produces for the longest group."""
    scene = synthetic.make_scene(3, 2, num_shapes=4)
    captions = ["a much longer caption than the others, with many words"] + scene.captions[1:]
    record = Record(Image.fromarray(scene.image), scene.masks, captions)
    limits = Limits(CFG.region, tokenizer, DEFAULT_QUESTION, 6, 7, 512)  # one group of 4 masks
    tiles, length, answer = limits.longest_sample(record.image.size, captions)
    s = build_sample(record, [0, 1, 2, 3], np.random.default_rng(0), CFG, tokenizer)
    assert (tiles, length, answer) == (len(s.inputs.pixel_values), len(s.inputs.input_ids), len(s.answer_positions))


def test_answers_beyond_the_answer_buckets_are_reported_when_the_files_load(tmp_path, tokenizer, annotation_file):
    path, _ = _write_annotations(tmp_path, annotation_file)
    limits = Limits(CFG.region, tokenizer, DEFAULT_QUESTION, 3.5, 7, 512, max_answer=8)
    with pytest.raises(PDLMError, match=r"record 0: its longest answer has \d+ tokens but the largest of "
                                        r"data.answer_buckets is 8"):
        AnnotationSource([path], limits=limits)
    assert len(AnnotationSource([path], limits=dataclasses.replace(limits, max_answer=64))) == 2


def test_mask_groups_partition_like_the_reference():
    n = 9
    r = groups_per_record(n, 3.5)  # ceil(9 / 3.5) = 3 groups, at most 4 masks each
    groups = [mask_group(n, 5, 1, q, r) for q in range(r)]
    assert r == 3 and [len(g) for g in groups] == [3, 3, 3]
    assert sorted(sum(groups, [])) == list(range(n))
    assert groups == [mask_group(n, 5, 1, q, r) for q in range(r)]  # deterministic
    assert groups != [mask_group(n, 5, 2, q, r) for q in range(r)]  # re-partitioned each epoch
    assert max(len(mask_group(7, 0, 0, q, 2)) for q in range(2)) == 4


def test_sample_labels_cover_exactly_the_answer(tokenizer):
    scene = synthetic.make_scene(3, 1, num_shapes=3)
    record = Record(Image.fromarray(scene.image), scene.masks, scene.captions)
    s = build_sample(record, [0, 1, 2], np.random.default_rng(0), CFG, tokenizer)
    labelled = np.flatnonzero(s.labels != IGNORE)
    assert np.array_equal(labelled, np.arange(labelled[0], labelled[-1] + 1))  # one contiguous span
    answer = tokenizer.decode(s.labels[labelled])
    areas = [m.sum() for m in scene.masks]
    by_area = [scene.captions[i] for i in np.argsort(areas)[::-1]]
    assert answer == "\n".join(f"<|Mask_Cap_{i}|>{c}" for i, c in enumerate(by_area)) + "<|eot_id|>"
    before = tokenizer.decode(s.inputs.input_ids[:labelled[0]])
    assert before.endswith("<|start_header_id|>assistant<|end_header_id|>\n")
    assert labelled[-1] == len(s.inputs.input_ids) - 1  # the first <|eot_id|> after the header ends the sequence
    assert len(set(s.inputs.prompt_ids.tolist())) == 3 and s.inputs.prompt_ids.max() < CFG.region.prompt_numbers
    assert np.all(s.inputs.input_ids[s.inputs.image_positions] == tokenizer.special.image_context)
    assert np.all(s.inputs.input_ids[s.inputs.roi_positions[1]] == tokenizer.special.reserved[1])


def test_caption_padding_fills_every_caption_to_the_slots(tokenizer):
    """data.caption_padding: each caption is followed by LLaDA's EOS up to that many tokens, supervised, and the
    load-time length estimate counts it."""
    scene = synthetic.make_scene(3, 1, num_shapes=3)
    record = Record(Image.fromarray(scene.image), scene.masks, scene.captions)
    padding = max(len(tokenizer.encode(c)) for c in scene.captions) + 2
    s = build_sample(record, [0, 1, 2], np.random.default_rng(0), CFG, tokenizer, caption_padding=padding)
    answer = tokenizer.decode(s.labels[s.labels != IGNORE])
    blocks = re.split(r"<\|Mask_Cap_\d\|>", answer.removesuffix("<|eot_id|>"))[1:]
    by_area = [scene.captions[i] for i in np.argsort([m.sum() for m in scene.masks])[::-1]]
    for block, caption in zip(blocks, by_area, strict=True):
        block = block.removesuffix("\n")
        fill = padding - len(tokenizer.encode(caption))
        assert block == caption + "<|endoftext|>" * fill and fill >= 2
    limits = Limits(CFG.region, tokenizer, DEFAULT_QUESTION, 6, 7, 512, caption_padding=padding)
    tiles, length, answer_length = limits.longest_sample(record.image.size, scene.captions)
    assert (length, answer_length) == (len(s.inputs.input_ids), len(s.answer_positions))


def test_collate_pads_to_buckets(tokenizer):
    source = SyntheticRecords(4, seed=1)
    samples = [build_sample(source[i], list(range(len(source[i].masks))), np.random.default_rng(i), CFG,
                            tokenizer) for i in range(2)]
    collate = Collate((1, 7), (300, 400), CFG.region.prompt_numbers, tokenizer.special.eot)
    batch = collate(samples)
    assert batch.inputs.input_ids.shape == (2, 300) and batch.inputs.pixel_values.shape[1] in (1, 7)
    assert batch.inputs.mask_patches.shape[1] == CFG.region.prompt_numbers
    for i, s in enumerate(samples):
        n = len(s.inputs.input_ids)
        assert not batch.inputs.valid[i, n:].any() and np.all(batch.labels[i, n:] == IGNORE)
        assert np.all(batch.inputs.image_positions[i, len(s.inputs.image_positions):] == 300)  # dropped on device
    with pytest.raises(PDLMError, match="length_buckets"):
        Collate((7,), (16,), 6, tokenizer.special.eot)(samples)


def test_pipeline_is_deterministic_and_resumable(tokenizer):
    cfg = DataConfig(synthetic_scenes=12, batch_size=2, epochs=2, tile_buckets=(7,), length_buckets=(400,),
                     group_divisor=6, threads=1, prefetch=2)
    first = build_pipeline(cfg, CFG, tokenizer)
    assert first.steps_per_epoch == 6
    it = iter(first.dataset)
    next(it)
    state = it.get_state()
    expected = [next(it).inputs.input_ids for _ in range(2)]
    again = iter(build_pipeline(cfg, CFG, tokenizer).dataset)
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again).inputs.input_ids, want)


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "unknown keys"),
    ("model.freeze=[encoder]", "freeze"),
    ("optim.noise_t_min=1.0", "noise_t_min"),
    ("data.synthetic_rotated=1.5", "synthetic_rotated"),
    ("data.synthetic_questions=0", "data.synthetic_questions must be at least 1"),
    ("model.vision_pos_embed_init=sine", "vision_pos_embed_init"),
    ("data.on_bad_record=ignore", "on_bad_record"),
    ("data.loop=true", "data.loop .* run.max_steps"),
    ("run.profile_steps=[5, 2]", "profile_steps"),
    ("eval.every=10", "eval.every"),
    ("data.weights=[1, -1]", "weights"),
    ("optim.lr=-1", "optim.lr must be a positive learning rate, got -1.0"),
    ("optim.lr=0", "optim.lr must be a positive"),
    ("run.max_steps=0", "run.max_steps must be at least 1"),
    ("run.max_steps=-5", "run.max_steps must be at least 1"),
    ("run.max_steps=abc", "run.max_steps must be an integer, got 'abc'"),
    ("run.max_steps=2.5", "run.max_steps must be an integer"),
    ("run.save_every=0", "run.save_every must be at least 1"),
    ("data.workers=-1", "data.workers must be at least 0"),
    ("data.length_buckets=[512, x]", "data.length_buckets must be a list of positive integers"),
    ("eval.gen_length=true", "eval.gen_length must be an integer"),
])
def test_bad_config_values_are_named(override, message):
    with pytest.raises(PDLMError, match=message):
        train_config.load(None, [override])


def test_base_only_settings_are_refused_for_a_region_model():
    for setting in ("data.synthetic_questions=3", "data.synthetic_describe=0.5"):
        with pytest.raises(PDLMError, match="region model"):
            train_config.load(None, ["model.kind=region", setting])


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("optim: [1, 2")
    with pytest.raises(PDLMError, match="not valid YAML"):
        train_config.load(bad)
    cfg = train_config.load(None, ["optim.lr=1e-4", "model.freeze=[vision, projector]", "run.mesh=data:2,fsdp:4"])
    assert cfg.optim.lr == 1e-4 and cfg.model.freeze == ("vision", "projector") and cfg.optim.b2 == 0.999
