"""pdlm_jax.files: where a user's path points (local, file://, gs:// buckets, hf:// Hub ids) and atomic writes
of files and folders (the one helper every tool's inputs and outputs go through).

Buckets are served by fsspec's in-memory filesystem standing in for gcsfs (helpers.memory_bucket); Hub ids by
huggingface_hub itself, offline, over a cache folder laid out as it lays one out (helpers.hub_cache)."""

from __future__ import annotations

import json
import os

import pytest

from helpers import fixture_dir, hub_cache, memory_bucket
from pdlm_jax import checkpoint, files, limits
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path, atomic_directory, atomic_write, write_json_atomic


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"caption": "ein Würfel"})
    atomic_write(f"file://{tmp_path / 'b.txt'}", "text")  # file:// URLs are local paths
    umask = os.umask(0o22)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    assert json.loads(path.read_text()) == {"caption": "ein Würfel"} and (tmp_path / "b.txt").read_text() == "text"
    with pytest.raises(TypeError):  # a failed write keeps the old file and leaves no temporary file
        atomic_write(path, 3)
    assert json.loads(path.read_text()) == {"caption": "ein Würfel"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "out.json"]


def test_atomic_directory_swaps_in_only_finished_folders(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(dst) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(PDLMError, match="already exists.*--force"):
        with atomic_directory(dst):
            pass
    with atomic_directory(dst, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in dst.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_as_path_keeps_urls_and_makes_local_paths_absolute():
    with memory_bucket():
        assert str(as_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(as_path("file:///tmp/x")) == "/tmp/x" and os.path.isabs(str(as_path("rel")))


def test_bucket_without_its_filesystem_package_names_the_extra(monkeypatch):
    """gcsfs missing: one PDLMError naming the extra, from path handling and from load (not a local 'gs:'
    folder, not an ImportError traceback)."""
    import fsspec

    import pdlm_jax

    def missing(scheme):
        raise ImportError(f"Install {scheme}fs to access this filesystem")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    for attempt in (lambda: as_path("gs://b/run"), lambda: pdlm_jax.load("gs://b/ckpt"),
                    lambda: checkpoint.load_config("gs://b/ckpt")):
        with pytest.raises(PDLMError, match=r"gs://b/.*need the gcsfs package.*pip install 'pdlm-jax\[gcs\]'"):
            attempt()
    with pytest.raises(PDLMError, match="unsupported URL scheme ftp://"):
        as_path("ftp://host/x")
    with pytest.raises(PDLMError, match="Hugging Face id names a whole model folder"):
        as_path("hf://org/name")


real_copy = files._copy_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_params(a, b) -> bool:
    import numpy as np

    from pdlm_jax.trees import flatten

    fa, fb = flatten(checkpoint.restore_params(a)[1]), flatten(checkpoint.restore_params(b)[1])
    return set(fa) == set(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_checkpoint_written_to_and_loaded_from_a_bucket(converted, cache, monkeypatch):
    """pdlm-convert --dst gs://... uploads a finished checkpoint (provenance.json last); pdlm_jax.load and the
    checkpoint readers (init_from's) read it back through one cached local copy, copied again only when the
    bucket's folder changes; a run output written to the bucket reads back."""
    import pdlm_jax
    from convert import cli

    with memory_bucket() as store:
        assert cli.main(["--src", str(fixture_dir("base_tiny")), "--dst", "gs://models/base"]) == 0
        uploaded = [k for k in store if not k.endswith("/")]
        assert uploaded[-1].endswith("/base/provenance.json") and any("/params/" in k for k in uploaded)
        assert cli.main(["--src", str(fixture_dir("base_tiny")), "--dst", "gs://models/base"]) == 2  # no --force

        copies = []
        monkeypatch.setattr(files, "_copy_file", lambda *a: copies.append(a) or real_copy(*a))
        handle = pdlm_jax.load("gs://models/base")
        assert handle.cfg.is_base and len(copies) == len(uploaded)
        assert checkpoint.load_config("gs://models/base") == handle.cfg
        assert checkpoint.read_sampler("gs://models/base") == checkpoint.read_sampler(converted("base_tiny"))
        assert len(copies) == len(uploaded)  # reused, not copied again
        assert _same_params(files.local_directory("gs://models/base"), converted("base_tiny"))
        as_path("gs://models/base/sampler.json").write_text('{"gen_length": 16}')
        assert checkpoint.read_sampler("gs://models/base") == {"gen_length": 16}  # the bucket changed: copied again
        assert len(copies) == 2 * len(uploaded) + 1
        # init_from on the bucket: the training config reads the model config and tokenizer through the copy
        from pdlm_jax.regions.tokenizer import Tokenizer
        from train import config as train_config

        run = train_config.from_dict({"model": {"init_from": "gs://models/base"}, "data": {"synthetic_scenes": 2}})
        assert run.model_config() == handle.cfg and Tokenizer(run.tokenizer_dir(), base=True).special.image_context
        # the tokenizer, the position budget and a training config read straight from the bucket
        assert Tokenizer("gs://models/base", base=True).special == handle.tokenizer.special
        assert limits.position_budget("gs://models/base") == limits.position_budget(converted("base_tiny"))
        atomic_write("gs://configs/train.yaml", "run: {max_steps: 3}")
        assert train_config.load("gs://configs/train.yaml").run.max_steps == 3

        write_json_atomic("gs://runs/r/result.json", {"loss": 1.5})
        atomic_write("gs://runs/r/log.txt", "step 1")
        assert json.loads(as_path("gs://runs/r/result.json").read_text()) == {"loss": 1.5}
        assert sorted(p.name for p in as_path("gs://runs/r").iterdir()) == ["log.txt", "result.json"]
    assert not (cache / "staging").exists() or not any((cache / "staging").iterdir())


def test_load_from_a_file_url():
    import pdlm_jax

    handle = pdlm_jax.load(f"file://{pdlm_jax.DEMO_MODEL}")
    assert handle.cfg == checkpoint.load_config(pdlm_jax.DEMO_MODEL)


def test_training_data_from_a_bucket(tmp_path, annotation_file):
    """Annotation files and their images on a bucket read through fsspec (the real epath backend, not a mock)."""
    import numpy as np
    from PIL import Image

    from train.sources import AnnotationSource

    annotation_file(tmp_path / "ann.json", seed=11, num_shapes=1, caption="zebra", copies=2)
    with memory_bucket():
        for name in ("ann.json", "img.png"):
            files._copy_file(tmp_path / name, as_path(f"gs://data/set/{name}"))
        source = AnnotationSource(["gs://data/set/ann.json"])
        assert len(source) == 2 and source[1].captions == ["zebra"] and source[1].masks[0].any()
        with Image.open(tmp_path / "img.png") as local:
            assert np.array_equal(np.asarray(source[1].image), np.asarray(local))


def test_load_from_a_hub_id_offline(converted, tmp_path, monkeypatch):
    """pdlm_jax.load("hf://ORG/NAME") on a Hub repository holding a pdlm-jax checkpoint, from the cache, offline;
    a repository holding a reference-format checkpoint is sent to pdlm-convert, which converts it from its id."""
    from huggingface_hub import constants

    import pdlm_jax

    hub = hub_cache(tmp_path / "hub", {"org/base-jax": converted("base_tiny"), "org/base": fixture_dir("base_tiny")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    handle = pdlm_jax.load("hf://org/base-jax@main")
    assert handle.cfg.is_base and str(hub) in str(files.local_directory("hf://org/base-jax"))
    assert _same_params(files.local_directory("hf://org/base-jax"), converted("base_tiny"))
    with pytest.raises(PDLMError, match="reference .* checkpoint, not a pdlm-jax one.*pdlm-convert"):
        pdlm_jax.load("hf://org/base")
    from convert import cli

    assert cli.main(["--src", "hf://org/base", "--dst", str(tmp_path / "converted")]) == 0  # what the hint says
    assert _same_params(tmp_path / "converted", converted("base_tiny"))
    with pytest.raises(PDLMError, match="hf://org/missing: not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        pdlm_jax.load("hf://org/missing")
