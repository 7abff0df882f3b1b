"""The whole recipe on tiny models through `pdlm-train` and the shipped configs (SPEC-train-base T2, T3, T7):
tiny LLaDA + SigLIP composed by `pdlm-convert --compose` -> Base stage 1 -> stage 2 -> the region model from
Base, a few steps each with data and step overrides.

Stage 1 changes only the projector, stage 2 the projector and the LM but not the vision tower, the region model
starts from stage 2's tensors; stage 1 and the region stage resume exactly after an interruption (the other
stages share that mechanism); the Base export answers with `pdlm-infer --question` and the region export
captions with `pdlm-infer --masks`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdlm_jax import checkpoint as pdlm_ckpt
from pdlm_jax.trees import flatten
from train import config as train_config
from train import synthetic
from train.cli import main, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, components) -> Path:
    """The checkpoint stage 1 starts from: tiny LLaDA + SigLIP folders written by transformers, composed by
    `pdlm-convert --compose` in bfloat16 as the 8B recipe does (configs/base_s1.yaml)."""
    from convert.compose import compose

    out = tmp_path_factory.mktemp("recipe") / "start"
    compose(components["lm"], components["siglip"], out, dtype="bfloat16", seed=0)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Conversation records and region annotations of synthetic scenes, and a shared compilation cache."""
    root = tmp_path_factory.mktemp("recipe")
    records = []
    for i in range(4):
        scene = synthetic.make_scene(11, i, num_shapes=1 + i % 3)
        Image.fromarray(scene.image).save(root / f"scene{i}.png")
        records.append({"image": f"scene{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": str(len(scene.captions))},
            {"from": "human", "value": "What are they?"}, {"from": "gpt", "value": ", ".join(scene.captions)}]})
    (root / "conversations.json").write_text(json.dumps(records))
    synthetic.write_dataset(root / "regions", num_scenes=4, seed=12)
    return root


def _args(config: str, out: Path, init_from: Path, work: Path, *overrides: str) -> list[str]:
    return ["--config", str(CONFIGS / config), "--no-progress", f"run.output_dir={out}", f"model.init_from={init_from}",
            "data.batch_size=2", "optim.grad_accum=1", "run.max_steps=2", "run.save_every=1", "run.mesh=data:-1",
            "run.async_save=false", f"run.compilation_cache={work / 'cache'}", "data.workers=0", "data.threads=1",
            "data.prefetch=2", "data.image_root=null", "run.tensorboard=false",
            # float32 without rematerialisation compiles faster; tests/test_train_base.py covers bf16 frozen modules
            "model.dtype=float32", "model.remat=false", *overrides]


def _params(ckpt: Path) -> dict[str, np.ndarray]:
    _, tree = pdlm_ckpt.restore_params(ckpt, dtype=np.float32)
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not np.array_equal(before[k], after[k])}


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


class Interrupt(Exception):
    pass


def _stop_after_one(step, record):
    if step == 1:
        raise Interrupt


def _check_resumes_exactly(args: list[str], full: Path, tmp: Path) -> Path:
    """The run of `args` interrupted after step 1 and resumed equals the uninterrupted run `full`."""
    out = tmp / f"{full.name}-resumed"
    args = [a if not a.startswith("run.output_dir=") else f"run.output_dir={out}" for a in args]
    cfg = train_config.load(args[1], [a for a in args[2:] if a != "--no-progress"])
    with pytest.raises(Interrupt):
        train(cfg, progress=False, callback=_stop_after_one)
    assert sorted(_losses(out)) == [1]
    assert main(args) == 0  # resumes at the step-1 checkpoint
    assert _losses(out) == _losses(full)
    resumed, uninterrupted = _params(out / "export"), _params(full / "export")
    assert not _changed(uninterrupted, resumed)
    return out


def test_base_stages_then_region_model(tmp_path, start_checkpoint, work):
    s1, s2, region = tmp_path / "s1", tmp_path / "s2", tmp_path / "region"
    conv = f"data.annotations=[{work / 'conversations.json'}]"

    # stage 1: the projector only (one tile, as the reference)
    s1_args = _args("base_s1.yaml", s1, start_checkpoint, work, conv, "data.length_buckets=[128]")
    assert main(s1_args) == 0
    start, after_s1 = _params(start_checkpoint), _params(s1 / "export")
    assert _changed(start, after_s1) == {k for k in start if k.startswith("projector/")}
    assert pdlm_ckpt.load_config(s1 / "export").is_base
    _check_resumes_exactly(s1_args, s1, tmp_path)

    # stage 2: projector + the whole LM, from stage 1's export; the vision tower stays
    assert main(_args("base_s2.yaml", s2, s1 / "export", work, conv, "data.length_buckets=[160]")) == 0
    assert pdlm_ckpt.load_config(s2 / "export").region.max_tiles == 6
    after_s2 = _params(s2 / "export")
    assert _changed(after_s1, after_s2) == {k for k in start if k.startswith(("projector/", "lm/"))}

    # the region model from stage 2's export: every tensor trains
    region_args = _args("region_from_base.yaml", region, s2 / "export", work,
                        f"data.annotations=[{work / 'regions' / 'annotations.json'}]", "data.length_buckets=[192]",
                        "data.answer_buckets=[64]", "model.config={region: {max_tiles: 1}}", "data.tile_buckets=[1]")
    assert main(region_args) == 0
    after_region = _params(region / "export")
    assert set(after_region) == set(after_s2) | {"mask_embed/embedding"}
    assert _changed(after_s2, after_region) == set(after_s2)
    # it started from stage 2's tensors: the step-1 checkpoint (the first update has lr 0) holds them unchanged
    from train.export_step import export_step

    first = _params(export_step(region, tmp_path / "region-step1", step=1))
    assert not _changed(after_s2, first)
    _check_resumes_exactly(region_args, region, tmp_path)

    # the exports answer through pdlm-infer
    from infer.cli import main as infer_main

    image, masks = synthetic.write_scene(synthetic.make_scene(13, 0, num_shapes=2), tmp_path / "scene")
    answer = tmp_path / "answer.json"
    assert infer_main(["--checkpoint", str(s2 / "export"), "--image", str(image), "--question",
                       "How many shapes are there?", "--output", str(answer)]) == 0  # the demo's 128/128/128
    assert isinstance(json.loads(answer.read_text())["answer"], str)
    captions = tmp_path / "captions.json"
    assert infer_main(["--checkpoint", str(region / "export"), "--image", str(image), "--masks",
                       *map(str, masks), "--gen-length", "4", "--steps", "4", "--output", str(captions)]) == 0
    assert len(json.loads(captions.read_text())["regions"]) == 2
