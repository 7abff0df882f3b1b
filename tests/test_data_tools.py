"""`pdlm-data` (from-masks, validate, stats) and the "Fine-tune on your own data" walkthrough of docs/TRAINING.md,
run command by command as the doc gives them (with run.max_steps=2), which also checks that periodic evaluation
reports what `python -m train.eval` reports."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from train import data_tools
from train.sources import AnnotationSource

EXAMPLES = ROOT / "examples" / "shapes"


def walkthrough_commands() -> list[list[str]]:
    """The commands between the walkthrough markers of docs/TRAINING.md (backslash continuations joined)."""
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    block = re.search(r"<!-- walkthrough:.*?-->\s*```bash\n(.*?)```\s*<!-- end walkthrough -->", doc, re.S)
    assert block, "docs/TRAINING.md lost its walkthrough markers"
    return [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def test_the_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys, caplog):
    """Also the honest-evaluation check: pdlm-train's periodic evaluation of the held-out image reports the
    accuracy `python -m train.eval` reports for the exported adapter on the same records."""
    from infer import cli as infer_cli
    from train import cli as train_cli, eval as train_eval

    programs = {"pdlm-data": data_tools.main, "pdlm-train": train_cli.main, "pdlm-infer": infer_cli.main,
                "python": lambda args: train_eval.main(args[2:])}  # python -m train.eval ...
    for name in ("examples", "configs", "pdlm_jax"):  # the repository as the doc's working directory
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    commands = walkthrough_commands()
    assert [c[0] for c in commands] == ["pdlm-data"] * 5 + ["pdlm-train", "python", "pdlm-infer"]
    assert commands[6][:3] == ["python", "-m", "train.eval"]
    for program, *args in commands:
        args = [re.sub(r"^run.max_steps=\d+$", "run.max_steps=2", a) for a in args]  # tiny: 2 steps
        if program == "pdlm-train":  # the overrides stay one group at the end
            args = ["--no-progress", *args, f"run.compilation_cache={tmp_path / 'cache'}", "run.tensorboard=false"]
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level("INFO"):
            assert programs[program](args) == 0, (program, args)
        if program == "pdlm-train":  # one summary line for the evaluation, none of the inference path's lines
            assert sum("eval at step 2:" in m and "gen_length 3, steps 3" in m for m in caplog.messages) == 1
            assert not any(r.name.startswith("pdlm_jax") for r in caplog.records)
        if program == "python":
            out = capsys.readouterr().out
            report = json.loads(out[:out.rindex("}") + 1])

    made = [json.loads((tmp_path / "runs/my_data" / f).read_text()) for f in ("train.json", "held_out.json")]
    example = json.loads((EXAMPLES / "annotations.json").read_text())
    assert [r["mask_rles"] for r in made[0] + made[1]] == [r["mask_rles"] for r in example]  # the committed one
    assert [r["captions"] for r in made[0] + made[1]] == [r["captions"] for r in example]
    log = [json.loads(line) for line in (tmp_path / "runs/my_lora/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # the held-out image: the purple circle is new to the demo model, the blue and yellow shapes are not
    assert (report["gen_length"], report["steps"], report["regions"]) == (3, 3, 3)
    assert (log[-1]["eval_accuracy"], log[-1]["eval_regions"]) == (report["accuracy"], report["regions"])
    assert 0 < report["accuracy"] < 1, report
    caption = json.loads((tmp_path / "runs/my_lora/caption.json").read_text())
    assert len(caption["regions"]) == 2


def test_from_masks_round_trips_through_the_training_reader(tmp_path):
    out = tmp_path / "ann.json"
    masks = [str(EXAMPLES / "masks" / f"2_{j}.png") for j in range(3)]
    assert data_tools.main(["from-masks", "--out", str(out), "--image", str(EXAMPLES / "images/2.png"),
                            "--masks", *masks, "--captions", "a", "b", "c"]) == 0
    record = AnnotationSource([out])[0]
    for got, path in zip(record.masks, masks):
        np.testing.assert_array_equal(got, np.asarray(Image.open(path)) > 0)
    assert record.captions == ["a", "b", "c"]
    # the image lies outside the file's folder: stored absolute, so the file reads from anywhere
    assert json.loads(out.read_text())[0]["image_file"] == str(EXAMPLES / "images/2.png")


@pytest.mark.parametrize("args, message", [
    (["--masks", "M0", "--captions", "a", "b"], "1 masks but --captions 2"),
    (["--masks", "EMPTY", "--captions", "a"], "is empty"),
    (["--masks", "SMALL", "--captions", "a"], "masks must have the image's size"),
])
def test_from_masks_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    Image.new("L", (134, 151)).save(tmp_path / "empty.png")
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    paths = {"M0": str(EXAMPLES / "masks/0_0.png"), "EMPTY": str(tmp_path / "empty.png"),
             "SMALL": str(tmp_path / "small.png")}
    argv = ["from-masks", "--out", str(tmp_path / "a.json"), "--image", str(EXAMPLES / "images/0.png")]
    assert data_tools.main(argv + [paths.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "a.json").exists()


def test_validate_lists_every_bad_record(tmp_path, capsys):
    records = json.loads((EXAMPLES / "annotations.json").read_text())
    for r in records:
        r["image_file"] = str(EXAMPLES / r["image_file"])
    bad = [dict(records[0], captions=["only one"]),  # 2 masks, 1 caption
           records[1],
           dict(records[2], image_file="missing.png"),
           dict(records[0], mask_rles=[{"size": [151, 134], "counts": "12"}, records[0]["mask_rles"][1]])]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert data_tools.main(["validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == [f"{path} record {i}" for i in (0, 2, 3)]
    assert "one caption per entry" in lines[0] and "not found" in lines[1] and "mask 0" in lines[2]
    assert lines[3] == f"{path}: 1 good records, 3 bad (no config: buckets not checked)"


def test_stats_counts_regions_tokens_and_buckets(tmp_path, capsys):
    config = str(ROOT / "configs" / "finetune_demo_lora.yaml")
    assert data_tools.main(["stats", str(EXAMPLES / "annotations.json"), "--config", config,
                            f"model.init_from={ROOT / 'pdlm_jax/assets/demo_shapes_model'}",
                            f"model.tokenizer={ROOT / 'configs/demo_purple_tokenizer'}",
                            "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert (report["records"], report["regions"], report["items_per_pass"]) == (3, 7, 3)
    assert report["regions_per_image"] == {"min": 2, "mean": 2.33, "max": 3}
    assert report["caption_tokens"] == {"min": 3, "mean": 3, "max": 3}  # "a", " purple", " circle"
    assert report["buckets"] == {"tiles 1, length 312": 3}
    assert "7 regions" in capsys.readouterr().out
