"""pdlm-convert + pdlm-infer end to end on every reference fixture (token-exact), the JSON schema, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import FIXTURE_NAMES, fixture_dir, fixture_oracle
from infer.cli import main as infer_main
from pdlm_jax.asset_paths import DEMO_SCENE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(converted):
    """Each fixture converted once with pdlm-convert (float32, like the fixtures)."""
    return {name: converted(name, "float32") for name in FIXTURE_NAMES}


def _args(name, checkpoint, *extra):
    d, oracle = fixture_dir(name), fixture_oracle(name)
    gen = oracle["generation"]
    return ["--checkpoint", str(checkpoint), "--image", str(d / "image.png"),
            "--masks", *[str(d / f) for f in oracle["masks"]["files"]],
            "--gen-length", str(gen["gen_length_per_mask"]), "--steps", str(gen["steps"]), "--dtype", "float32",
            *extra]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_convert_then_infer_is_token_exact(name, checkpoints, tmp_path):
    out = tmp_path / "result.json"
    assert infer_main(_args(name, checkpoints[name], "--output", str(out), "--reference-parser", "--quiet")) == 0
    result = json.loads(out.read_text())
    oracle = fixture_oracle(name)
    order = oracle["masks"]["sort_idx_desc_area"]
    for c, j in enumerate(order):
        assert result["regions"][j]["token_ids"] == oracle["outputs"]["caption_tokens"][c]["token_ids"]
    assert [result["regions"][j]["caption"] for j in order] == oracle["outputs"]["captions"]
    assert result["forwards"] == oracle["generation"]["num_forwards"]


def test_json_schema_and_overlay(checkpoints, tmp_path, caplog, capsys):
    out, png = tmp_path / "result.json", tmp_path / "overlay.png"
    assert infer_main(_args("tiny_v1", checkpoints["tiny_v1"], "--output", str(out), "--visualize", str(png))) == 0
    result = json.loads(out.read_text())
    assert {"regions", "seconds", "compile_seconds", "forwards", "tokens_per_forward", "image", "gen_length",
            "steps", "temperature", "top_p", "question", "seed", "parser"} <= result.keys()
    assert result["question"] == "Describe each masked region in detail." and result["parser"] == "blocks"
    assert result["image"] == {"width": 96, "height": 64, "grid": [3, 2], "tiles": 7}
    assert result["tokens_per_forward"] == 3 * 8 / result["forwards"]
    assert result["seconds"] >= result["compile_seconds"] > 0
    for i, region in enumerate(result["regions"]):
        assert region["index"] == i
        assert isinstance(region["caption"], str)
        assert len(region["token_ids"]) == 8 and all(isinstance(t, int) for t in region["token_ids"])
        assert len(region["bbox"]) == 4 and 0 <= region["bbox"][0] <= region["bbox"][2] <= 1
        assert region["prompt_id"] in range(3) and region["chunk"] == 0 and region["area"] > 0
    assert sorted(r["prompt_id"] for r in result["regions"]) == [0, 1, 2]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 96 and im.height > 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png", "result.json"]  # no temporary files left
    umask = os.umask(0o22)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (out, png)} == {0o666 & ~umask}  # as open() makes them, not 0600
    assert "pass 1/1: 3 region(s), 8 forwards" in caplog.text
    # with --output, stdout carries the captions (one line per region) and the files written
    captions = [f"region {i}: {r['caption']}" for i, r in enumerate(result["regions"])]
    assert capsys.readouterr().out.splitlines() == captions + [f"wrote {out}", f"wrote {png}"]


def test_closed_pipe_ends_quietly():
    """`pdlm-infer ... | head -c 300`: the reader leaves early; no BrokenPipeError traceback, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "infer", "--quiet", "--image", str(DEMO_SCENE / "image.png"),
                             "--masks", str(DEMO_SCENE / "mask_0.png")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the JSON is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ""


def _bad_cases(tmp_path, checkpoint):
    d = fixture_dir("tiny_v1")
    empty, garbage = tmp_path / "empty.png", tmp_path / "garbage.png"
    Image.new("L", (96, 64)).save(empty)
    garbage.write_text("not an image")
    base = ["--checkpoint", str(checkpoint), "--image", str(d / "image.png"), "--gen-length", "8", "--steps", "8"]
    masks = [str(d / f"mask_{i}.png") for i in range(3)]
    return {
        "no masks": (base, "--masks is required"),
        "all-zero mask": (base + ["--masks", masks[0], str(empty)], "mask 1 .*empty.png.* is empty"),
        "unreadable image": (["--checkpoint", str(checkpoint), "--image", str(garbage), "--masks", *masks],
                             "cannot read image file"),
        "unreadable mask": (base + ["--masks", masks[0], str(garbage)], "cannot read mask 1"),
        "missing mask": (base + ["--masks", str(tmp_path / "nope.png")], "mask 0 file .*nope.png does not exist"),
        "gen_length < 1": (base + ["--masks", *masks, "--gen-length", "0"], "gen_length must be a positive"),
        "steps < 1": (base + ["--masks", *masks, "--steps", "0"], "steps must be a positive"),
        # only one of the two given: the other comes from the checkpoint, the bad one must still be refused
        "gen_length 0 alone": (["--checkpoint", str(checkpoint), "--image", str(d / "image.png"), "--masks", *masks,
                                "--gen-length", "0"], "gen_length must be a positive"),
        "steps > k*G": (base + ["--masks", *masks, "--steps", "25"], "steps=25 exceeds the 24 caption slots"),
        "missing checkpoint": (["--checkpoint", str(tmp_path / "none"), "--image", str(d / "image.png"),
                                "--masks", *masks], "checkpoint directory .* does not exist"),
        "reference checkpoint": (["--checkpoint", str(d), "--image", str(d / "image.png"), "--masks", *masks],
                                 "reference .* checkpoint, not a pdlm-jax one"),
    }


@pytest.mark.parametrize("case", ["no masks", "all-zero mask", "unreadable image", "unreadable mask", "missing mask",
                                  "gen_length < 1", "gen_length 0 alone", "steps < 1", "steps > k*G", "missing checkpoint",
                                  "reference checkpoint"])
def test_bad_input_exits_with_one_clear_line(case, checkpoints, tmp_path, capsys):
    import re

    argv, message = _bad_cases(tmp_path, checkpoints["tiny_v1"])[case]
    assert infer_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pdlm-infer: error:")]
    assert len(err) == 1 and re.search(message, err[0]), err


def test_python_m_infer_fails_without_traceback(tmp_path):
    d = fixture_dir("tiny_v1")
    proc = subprocess.run([sys.executable, "-m", "infer", "--checkpoint", str(tmp_path / "none"), "--image",
                           str(d / "image.png"), "--masks", str(d / "mask_0.png")], cwd=ROOT, capture_output=True,
                          text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("pdlm-infer: error: checkpoint directory")
