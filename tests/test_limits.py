"""Declared limits (positions, masks, pixels) and damaged checkpoints: the Python API, pdlm-infer and
pdlm-serve refuse with one PDLMError line before anything compiles."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import fixture_dir
from pdlm_jax.errors import PDLMError, TooLarge

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "pdlm_jax" / "assets" / "demo_scene"
MASKS = sorted(SCENE.glob("mask_*.png"))


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG file of a few bytes whose header claims width × height pixels (Pillow reads only the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def demo():
    import pdlm_jax

    return pdlm_jax.load()


def test_api_rejects_over_limit_requests_before_compiling(demo, tmp_path):
    limits = demo.limits.describe()
    assert limits["max_positions"] == 4096 and limits["max_gen_length"] == limits["max_gen_length_per_regions"][6]
    too_long = limits["max_gen_length_per_regions"][5] + 1
    with pytest.raises(PDLMError, match=r"needs \d+ positions, over the model's 4096") as e:
        demo.caption_regions(SCENE / "image.png", MASKS, gen_length=too_long, steps=1)
    assert "\n" not in str(e.value)
    with pytest.raises(PDLMError, match="65 masks, over the limit of 64"):
        demo.caption_regions(SCENE / "image.png", MASKS * 13, gen_length=3, steps=3)
    with pytest.raises(TooLarge, match="over Pillow's decompression-bomb limit"):
        demo.caption_regions(bomb_png(tmp_path / "bomb.png"), MASKS)
    with pytest.raises(TooLarge, match="mask 0 file .* over Pillow's decompression-bomb limit"):
        demo.caption_regions(SCENE / "image.png", [bomb_png(tmp_path / "bomb.png")])
    small = type(demo.limits)(demo.cfg, demo.tokenizer, max_image_pixels=100)
    demo.limits, saved = small, demo.limits
    try:
        with pytest.raises(TooLarge, match="pixels, over the limit of 100"):
            demo.caption_regions(np.zeros((20, 20, 3), np.uint8), [np.ones((20, 20), bool)])
    finally:
        demo.limits = saved
    assert demo.program.num_compiled == 0


def test_a_mask_of_another_size_is_resized_with_a_warning_in_the_result(demo, tmp_path):
    small = tmp_path / "small.png"
    Image.open(MASKS[0]).resize((48, 48), Image.Resampling.NEAREST).save(small)
    result = demo.caption_regions(SCENE / "image.png", [small])
    assert len(result["warnings"]) == 1 and "resized to the image with nearest-neighbour" in result["warnings"][0]
    assert demo.caption_regions(SCENE / "image.png", [MASKS[0]])["warnings"] == []


def test_base_answer_limits(converted):
    import pdlm_jax
    from pdlm_jax.limits import position_budget

    checkpoint = converted("base_tiny")
    assert position_budget(checkpoint) == 4096  # the reference config's max_position_embeddings
    base = pdlm_jax.load(checkpoint)
    image = fixture_dir("base_tiny") / "image.png"
    with pytest.raises(PDLMError, match="over the model's 4096"):
        base.answer(image, "What is in the picture?", gen_length=100_000, block_length=100_000, steps=100_000)
    with pytest.raises(PDLMError, match="steps=1000000 is over the limit"):
        base.answer(image, "What is in the picture?", gen_length=8, block_length=8, steps=1_000_000)
    assert base.num_compiled == 0


def test_cli_over_limit_is_one_line_before_loading(capsys, converted):
    from infer.cli import main

    assert main(["--demo", "--gen-length", "100000", "--steps", "3", "--compilation-cache", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdlm-infer: error: gen_length=100000") and "\n" not in err and "positions" in err
    base = converted("base_tiny")
    assert main(["--checkpoint", str(base), "--image", str(fixture_dir("base_tiny") / "image.png"), "--question",
                 "What?", "--gen-length", "100000", "--block-length", "100000", "--steps", "100000",
                 "--compilation-cache", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "over the model's 4096" in err and "\n" not in err


def _damage(source: Path, dst: Path, how: str) -> Path:
    shutil.copytree(source, dst)
    data = max((p for p in (dst / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)  # Orbax OCDBT: the array bytes live in params/**/d/<hash>
    if how == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    else:
        data.unlink()
    return dst


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_checkpoint_is_one_line_from_load_infer_and_serve(how, converted, tmp_path, capsys):
    import pdlm_jax
    from infer.cli import main as infer_main
    from infer.serve import main as serve_main

    damaged = _damage(converted("tiny_v1"), tmp_path / "damaged", how)
    with pytest.raises(PDLMError, match=f"checkpoint {damaged} is damaged.*re-run pdlm-convert"):
        pdlm_jax.load(damaged)
    capsys.readouterr()
    d = fixture_dir("tiny_v1")
    assert infer_main(["--checkpoint", str(damaged), "--image", str(d / "image.png"), "--masks", str(d / "mask_0.png"),
                       "--gen-length", "4", "--steps", "4", "--compilation-cache", "none", "--quiet"]) == 2
    assert serve_main(["--checkpoint", str(damaged), "--compilation-cache", "none", "--port", "1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert [line.split(":")[0] for line in lines] == ["pdlm-infer", "pdlm-serve"]
    assert all("is damaged" in line and "re-run pdlm-convert" in line for line in lines)


def test_wrong_dtype_on_disk(converted, tmp_path):
    import pdlm_jax
    from pdlm_jax import keymap
    from pdlm_jax.checkpoint import ParamsWriter, load_config

    source = converted("tiny_v1")
    dst = tmp_path / "ints"
    shutil.copytree(source, dst, ignore=shutil.ignore_patterns("params"))
    writer = ParamsWriter(dst / "params")
    for path, shape in keymap.expected_shapes(load_config(source)).items():
        writer.add(path, np.zeros(shape, np.int32))
    writer.close()
    with pytest.raises(PDLMError, match="dtype int32 is not a float type.*pdlm-convert"):
        pdlm_jax.load(dst)


def test_position_counts_equal_the_real_prompt_layouts(demo, converted):
    """The limits count positions from the tokenized prompt; they must equal the sequences the programs run."""
    import pdlm_jax
    from pdlm_jax.answering import prepare_question
    from pdlm_jax.limits import num_tiles
    from pdlm_jax.regions.prepare import prepare_regions
    from pdlm_jax.regions.tiling import tile_image

    tiled = tile_image(SCENE / "image.png", demo.cfg.region)
    for k, gen_length in ((1, 3), (4, 7), (6, 2)):
        prep = prepare_regions(tiled, (MASKS * 2)[:k], demo.tokenizer, demo.cfg, gen_length, "Say what it is.")
        assert demo.limits.region_positions(k, gen_length, "Say what it is.", tiled.num_tiles) == prep.layout.length
    base = pdlm_jax.load(converted("base_tiny"))
    tiled = tile_image(fixture_dir("base_tiny") / "image.png", base.cfg.region)
    assert num_tiles(tiled.size, base.cfg.region) == tiled.num_tiles == 7  # 3x2 tiles and the thumbnail
    prep = prepare_question(tiled, "What is in the picture?", base.tokenizer, base.cfg)
    assert base.limits.answer_positions(16, "What is in the picture?", tiled.num_tiles) == len(prep.input_ids) + 16
