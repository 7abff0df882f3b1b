"""pdlm_jax.checkpoint: restore into shardings / dtypes, config and tokenizer lookup, errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import fixture_config, fixture_dir, load_reference_tree
from pdlm_jax import checkpoint, keymap, trees
from pdlm_jax.config import SamplerConfig
from pdlm_jax.errors import PDLMError


@pytest.fixture(scope="module")
def ours(converted) -> Path:
    return converted("tiny_v1")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return trees.flatten(load_reference_tree(fixture_dir("tiny_v1"), fixture_config("tiny_v1")))


def test_load_config_and_tokenizer(ours):
    assert checkpoint.load_config(ours) == fixture_config("tiny_v1")
    tok = checkpoint.tokenizer_path(ours)
    assert tok.name == "tokenizer.json" and tok.read_bytes() == (fixture_dir("tiny_v1") / "tokenizer.json").read_bytes()


def test_restore_into_mesh_shardings(ours, reference):
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    # Shard every kernel's last axis over `tensor`, replicate the rest: a tree of shardings ...
    def spec(path: str) -> NamedSharding:
        return NamedSharding(mesh, P(*([None] * (len(reference[path].shape) - 1)), "tensor")
                             if path.endswith("kernel") else P())

    tree = trees.nest({path: spec(path) for path in reference})
    for shardings in (tree, spec):  # ... or a callable path -> sharding
        cfg, params = checkpoint.restore_params(ours, shardings=shardings)
        flat = trees.flatten(params)
        assert set(flat) == set(keymap.expected_shapes(cfg)) == set(reference)
        for path, array in flat.items():
            assert isinstance(array, jax.Array) and array.sharding == spec(path), path
            assert array.dtype == np.float32 and np.array_equal(np.asarray(array), reference[path]), path


def test_restore_to_bf16(ours, reference):
    _, params = checkpoint.restore_params(ours, dtype="bfloat16")
    for path, array in trees.flatten(params).items():
        assert array.dtype == ml_dtypes.bfloat16, path
        want = reference[path].astype(ml_dtypes.bfloat16)  # round-to-nearest-even, by ml_dtypes
        assert np.array_equal(np.asarray(array).view(np.uint16), want.view(np.uint16)), path


def test_writer_in_many_partial_saves_and_streaming_reads(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    with checkpoint.checkpoint_writer(ckpt) as out:
        out.write_config(fixture_config("tiny_v1"))
        out.params.flush_bytes = 20_000  # several flushes
        for path, array in reference.items():
            out.params.add(path, array)
        out.commit({"producer": "test"})
    _, params = checkpoint.restore_params(ckpt)
    assert all(np.array_equal(np.asarray(a), reference[p]) for p, a in trees.flatten(params).items())
    streamed = dict(checkpoint.iter_leaves(ckpt, list(reference), batch_bytes=1))  # one leaf per read
    assert list(streamed) == list(reference)
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, reference[p]) for p, a in streamed.items())


def test_not_a_checkpoint(tmp_path, ours):
    for bad, hint in ((fixture_dir("tiny_v1"), "reference"), (tmp_path, "not a pdlm-jax checkpoint"),
                      (tmp_path / "nope", "does not exist")):
        with pytest.raises(PDLMError, match="pdlm-convert") as e:
            checkpoint.restore_params(bad)
        assert hint in str(e.value)
    with pytest.raises(PDLMError, match="lm/embed/embedding"):
        checkpoint.restore_params(ours, shardings={"lm": {}})


def test_params_not_matching_config(tmp_path, ours, reference):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / checkpoint.CONFIG_FILE).write_text(fixture_config("tiny_v1_wide").to_json())  # other vision geometry
    (ckpt / checkpoint.PARAMS_DIR).symlink_to(ours / checkpoint.PARAMS_DIR)
    with pytest.raises(PDLMError, match="vision/pos_embed/embedding: shape"):
        checkpoint.restore_params(ckpt)


def test_checkpoint_writer_layout_and_atomic_swap(tmp_path, reference):
    def write(dst, fail=False, force=False, sampler=None):
        with checkpoint.checkpoint_writer(dst, force=force) as out:
            for path, array in reference.items():
                out.params.add(path, array)
            out.write_config(fixture_config("tiny_v1"))
            out.copy_tokenizer(fixture_dir("tiny_v1"))
            if sampler is not None:
                out.write_sampler(sampler)
            if fail:
                raise RuntimeError("interrupted")
            return out.commit({"producer": "test"})

    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        write(dst, fail=True)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind
    write(dst, sampler=SamplerConfig(gen_length=4, steps=2))
    assert checkpoint.read_sampler(dst)["gen_length"] == 4 and checkpoint.tokenizer_path(dst).exists()
    provenance = json.loads((dst / checkpoint.PROVENANCE_FILE).read_text())
    assert provenance["producer"] == "test" and {"date", "pdlm_jax_version"} <= set(provenance)
    with pytest.raises(PDLMError, match="already exists.*--force"):
        write(dst)
    with pytest.raises(RuntimeError):  # a failed replacement keeps the old checkpoint
        write(dst, fail=True, force=True)
    assert checkpoint.read_sampler(dst)["gen_length"] == 4
    write(dst, force=True)
    assert not (dst / checkpoint.SAMPLER_FILE).exists() and [p.name for p in tmp_path.iterdir()] == ["out"]
    _, params = checkpoint.restore_params(dst)
    assert all(np.array_equal(np.asarray(a), reference[p]) for p, a in trees.flatten(params).items())
    with pytest.raises(PDLMError, match="no tokenizer.json"):
        with checkpoint.checkpoint_writer(tmp_path / "other") as out:
            out.copy_tokenizer(tmp_path)


def test_remasking_is_read_and_checked(tmp_path):
    assert SamplerConfig().remasking == "low_confidence"
    with pytest.raises(PDLMError, match="remasking 'random' is not supported"):
        SamplerConfig(remasking="random")
    (tmp_path / checkpoint.SAMPLER_FILE).write_text(json.dumps({"gen_length": 8, "remasking": "random"}))
    with pytest.raises(PDLMError, match=f"{tmp_path / checkpoint.SAMPLER_FILE}: remasking 'random'"):
        checkpoint.read_sampler(tmp_path)
    (tmp_path / checkpoint.SAMPLER_FILE).write_text(json.dumps({"gen_length": 8, "remasking": "low_confidence"}))
    assert checkpoint.read_sampler(tmp_path) == {"gen_length": 8, "remasking": "low_confidence"}
