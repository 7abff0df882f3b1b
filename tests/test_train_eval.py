"""Periodic evaluation is honest: on the LoRA demo recipe it captions with the settings the exported model gets
(the starting checkpoint's sampler.json) and reports the accuracy `python -m train.eval` reports for the
exported adapter on the same records."""

from __future__ import annotations

import json

from helpers import ROOT

from train import config as train_config, eval as train_eval, synthetic
from train.cli import train

DEMO = ROOT / "pdlm_jax" / "assets" / "demo_model"


def test_periodic_evaluation_equals_train_eval_of_the_export(tmp_path, caplog):
    train_file = synthetic.write_dataset(tmp_path / "train", 2, seed=0, colors=synthetic.COLORS + ("purple",))
    # 2 purple shapes the demo model has never seen and 2 red ones it knows
    held_out = synthetic.write_dataset(tmp_path / "eval", 3, seed=train_eval.HELD_OUT_SEED, colors=("red", "purple"))
    cfg = train_config.load(ROOT / "configs" / "finetune_demo_lora.yaml", [
        f"model.init_from={DEMO}", f"model.tokenizer={ROOT / 'configs' / 'demo_purple_tokenizer'}",
        f"data.annotations=[{train_file}]", f"eval.annotations=[{held_out}]", "eval.every=1", "eval.max_records=3",
        "run.max_steps=1", f"run.output_dir={tmp_path / 'run'}", f"run.compilation_cache={tmp_path / 'cache'}",
        "run.tensorboard=false"])
    assert cfg.model.sampler is None and cfg.sampler().gen_length == 3  # the demo model's sampler.json
    with caplog.at_level("INFO"):
        train(cfg, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # one summary line for the evaluation; none of the inference path's per-image lines
    assert sum("eval at step 1:" in m and "gen_length 3, steps 3" in m for m in caplog.messages) == 1
    assert not any(r.name.startswith("pdlm_jax") for r in caplog.records)

    report = train_eval.evaluate(DEMO, scenes=3, annotations=str(held_out), adapter=str(tmp_path / "run" / "adapter"),
                                 dtype="float32")
    assert (report["gen_length"], report["steps"]) == (3, 3)
    assert (record["eval_accuracy"], record["eval_regions"]) == (report["accuracy"], report["regions"])
    assert 0 < report["accuracy"] < 1, report  # a real judgement: some captions right, the purple ones not yet
