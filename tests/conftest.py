"""Fixtures shared by the test files (plain helper functions live in helpers.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from helpers import FakeDevices, encode_rle, fixture_dir

# JAX's persistent compilation cache, set once for the session (pytest_configure). A test that turns on a
# cache of its own (run.compilation_cache, load(compilation_cache=...)) changes JAX's global config: the autouse
# fixture below puts these values back after every test.
SESSION_JAX_CACHE: dict = {}


# The longest test files (minutes of CPU each on a 2-core machine), run first: pytest-xdist hands whole files to
# its workers in collection order, and a long file started last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_aot.py", "test_lora.py", "test_train_resume.py", "test_train_runops.py",
                 "test_train_multiprocess.py", "test_train_workers.py", "test_train_recipe.py",
                 "test_train_sharding.py", "test_data_tools.py", "test_sharded_infer.py", "test_serve.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def pytest_configure(config):
    """One persistent compilation cache for the session and every subprocess it starts (they inherit the
    environment): a program compiled once (the demo model's, a fixture's) is read back by later test modules,
    the server and the multi-device subprocesses instead of being compiled again. Every program is cached,
    however fast it compiled. It lives in .pytest_cache (kept between runs; `--cache-clear` starts cold), or in
    JAX_COMPILATION_CACHE_DIR if that is set."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        config.cache.mkdir("jax-compilation-cache") if getattr(config, "cache", None)
        else tempfile.mkdtemp(prefix="pdlm-jax-cache-"))
    os.environ.update(JAX_COMPILATION_CACHE_DIR=directory, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    SESSION_JAX_CACHE.update(jax_enable_compilation_cache=True, jax_compilation_cache_dir=directory,
                             jax_persistent_cache_min_compile_time_secs=0.0, jax_persistent_cache_min_entry_size_bytes=0)
    restore_jax_cache_settings()  # this process imported jax before the variables were set


def restore_jax_cache_settings():
    import jax

    for name, value in SESSION_JAX_CACHE.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)


@pytest.fixture(autouse=True)
def session_jax_cache():
    yield
    restore_jax_cache_settings()


@pytest.fixture
def without_compilation_cache():
    """For a test that counts XLA's compiles: a program read back from the persistent cache is not compiled."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # session_jax_cache turns it back on


@pytest.fixture(scope="session")
def fake_devices():
    """One subprocess with 8 fake CPU devices for the session's multi-device bodies (helpers.FakeDevices)."""
    worker = FakeDevices(8)
    yield worker
    worker.close()


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
