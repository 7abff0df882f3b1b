"""Data loading in grain worker processes (data.workers > 0) gives the batches and the losses of loading in the
training process, and configs/finetune.yaml (workers: 4) trains with tiny overrides."""

from __future__ import annotations

import json

import jax
import numpy as np
from helpers import ROOT, fixture_dir

from pdlm_jax.config import preset
from train import config as train_config
from train.batches import build_pipeline
from train.config import DataConfig
from train.cli import train


def test_two_workers_give_the_batches_of_none(tokenizer):
    def batches(workers: int) -> list:
        cfg = DataConfig(synthetic_scenes=8, batch_size=2, group_divisor=6, tile_buckets=(7,),
                         length_buckets=(320,), threads=1, prefetch=2, workers=workers)
        it = iter(build_pipeline(cfg, preset("tiny"), tokenizer).dataset)
        try:
            return [next(it) for _ in range(4)]
        finally:
            if hasattr(it, "close"):
                it.close()

    for a, b in zip(batches(0), batches(2), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_finetune_config_with_its_workers_trains_like_workers_0(tmp_path, annotation_file):
    """configs/finetune.yaml as written (workers: 4, fsdp mesh, grad_accum, answer buckets) on the tiny model."""
    annotation_file(tmp_path / "ann.json", seed=3, num_shapes=3, copies=8)
    tiny = ["model.init_from=null", "model.preset=tiny", f"model.tokenizer={fixture_dir('tiny_v1')}",
            "model.dtype=float32", f"data.annotations=[{tmp_path / 'ann.json'}]", "data.image_root=null",
            "data.batch_size=2", "optim.grad_accum=2", "data.length_buckets=[320]", "data.answer_buckets=[64]",
            "run.max_steps=2", "run.export=false", "run.tensorboard=false",
            f"run.compilation_cache={tmp_path / 'cache'}"]
    losses = {}
    for workers in (4, 0):
        cfg = train_config.load(ROOT / "configs" / "finetune.yaml",
                                tiny + [f"run.output_dir={tmp_path / str(workers)}", f"data.workers={workers}"])
        losses[workers] = train(cfg, progress=False)["losses"]
    assert train_config.load(ROOT / "configs" / "finetune.yaml").data.workers == 4
    assert len(losses[4]) == 2 and losses[4] == losses[0]
    saved = json.loads((tmp_path / "4" / "config.yaml").read_text())
    assert saved["data"]["workers"] == 4 and (tmp_path / "4" / "checkpoints" / "2").is_dir()
