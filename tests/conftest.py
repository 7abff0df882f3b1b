"""Fixtures shared by the test files (plain helper functions live in helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import encode_rle, fixture_dir


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny fixtures' tokenizer (special tokens of the reference)."""
    from pdlm_jax.regions.tokenizer import Tokenizer

    return Tokenizer(fixture_dir("tiny_v1"))


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(name, dtype="auto") -> a reference fixture converted by pdlm-convert, once per session.

    Shared by every test that asks for the same conversion: read it, never write into it.
    """
    from convert.writer import convert

    root, done = tmp_path_factory.mktemp("converted"), {}

    def get(name: str, dtype: str = "auto") -> Path:
        if (name, dtype) not in done:
            done[name, dtype] = root / f"{name}-{dtype}"
            convert(fixture_dir(name), done[name, dtype], dtype=dtype)
        return done[name, dtype]

    return get


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    """Tiny LLaDA and SigLIP folders written by transformers (tests/components.py), once per session."""
    from components import write_components

    return write_components(tmp_path_factory.mktemp("components"))


@pytest.fixture
def annotation_file():
    """annotation_file(path, seed, num_shapes, caption=None, copies=1) -> (path, scene): writes a training
    annotation file (pdlm-train's `data.annotations`; the image_file / mask_rles / captions variant) of
    `copies` records of one synthetic scene, whose image is saved beside it as img.png. `caption` replaces
    every caption of the scene."""
    from PIL import Image

    from train import synthetic

    def write(path: Path, seed: int, num_shapes: int, caption: str | None = None, copies: int = 1):
        scene = synthetic.make_scene(seed, 0, num_shapes=num_shapes)
        Image.fromarray(scene.image).save(path.parent / "img.png")
        record = {"image_file": "img.png", "mask_rles": [encode_rle(m) for m in scene.masks],
                  "captions": scene.captions if caption is None else [caption] * len(scene.masks)}
        path.write_text(json.dumps([record] * copies))
        return path, scene

    return write
