"""Exact resume: a run interrupted after step k and resumed gives the same losses as an uninterrupted run;
the exported model loads in the inference API."""

from __future__ import annotations

import json

import pytest
from helpers import fixture_dir

from train import config as train_config
from train.cli import train


class Interrupt(Exception):
    pass


def _cfg(out, cache):
    return train_config.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(fixture_dir("tiny_v1")), "dtype": "float32", "remat": True},
        "data": {"synthetic_scenes": 40, "batch_size": 2, "group_divisor": 6, "tile_buckets": [7],
                 "length_buckets": [320], "threads": 1, "prefetch": 2},
        "optim": {"lr": 1e-3, "grad_accum": 2},
        "run": {"output_dir": str(out), "max_steps": 4, "save_every": 2, "keep": 2, "compilation_cache": str(cache),
                "export": True},
    })


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    full = train(_cfg(tmp_path / "a", cache), progress=False)

    def stop_after_two(step, record):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg(tmp_path / "b", cache), progress=False, callback=stop_after_two)
    assert sorted(_losses(tmp_path / "b")) == [1, 2]
    resumed = train(_cfg(tmp_path / "b", cache), progress=False)  # picks up the step-2 checkpoint
    assert len(resumed["losses"]) == 2
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # bit-identical losses, steps 1..4

    import pdlm_jax  # the export is a pdlm-infer checkpoint
    from train import synthetic

    model = pdlm_jax.load(full["export"], dtype="float32")
    scene = synthetic.make_scene(5, 0, num_shapes=2)
    result = model.caption_regions(scene.image, scene.masks, gen_length=2, steps=2)
    assert len(result["regions"]) == 2
