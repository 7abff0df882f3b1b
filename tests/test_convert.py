"""pdlm-convert: manifest coverage, conversion of every fixture, bad inputs, export round trips, bench layout.

Oracles we did not write: the `safetensors` library (numpy/torch loaders and writers) and
tests/helpers.load_reference_tree (an independent in-RAM loader).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch, save_file as save_torch

from convert import cli, writer
from convert.bench import reference_layout, scaled_config
from convert.export_safetensors import export, reference_config
from convert.reader import open_reference
from convert.safetensors_file import Entry, FileWriter
from convert.writer import convert
from helpers import FIXTURE_NAMES, fixture_config, fixture_dir, load_reference_tree
from pdlm_jax import checkpoint, keymap, trees
from pdlm_jax.config import PDLMConfig, preset
from pdlm_jax.errors import PDLMError

MANIFEST = Path(__file__).parent / "fixtures" / "reference" / "perceptiondlm_state_dict.json"
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "processor_settings.json")


def copy_checkpoint(name: str, dst: Path) -> Path:
    """The reference-checkpoint part of a fixture (weights, config, tokenizer), copied to `dst`."""
    dst.mkdir(parents=True)
    for pattern in WEIGHT_FILES:
        for f in fixture_dir(name).glob(pattern):
            shutil.copy(f, dst / f.name)
    return dst


def read_all(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def nothing_left(dst: Path) -> bool:
    return not dst.exists() and not list(dst.parent.glob(f".{dst.name}.*"))


def assert_tree_equal(restored: dict, expected: dict) -> None:
    got, want = trees.flatten(restored), trees.flatten(expected)
    assert set(got) == set(want)
    for path in want:
        a = np.asarray(got[path])
        assert a.shape == want[path].shape and a.dtype == want[path].dtype, path
        assert np.array_equal(a, want[path]), path


@pytest.fixture(scope="module")
def tiny_ours(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("ours") / "tiny_v1"
    convert(fixture_dir("tiny_v1"), dst, keep_unused=True)
    return dst


# ---- coverage of the released 9.2B layout (headers only) -----------------------------------------

@pytest.fixture(scope="module")
def full_size_headers(tmp_path_factory) -> Path:
    """The 9.2B manifest as a real reference directory: correct headers, sparse (unwritten) data."""
    d = tmp_path_factory.mktemp("manifest")
    manifest = json.loads(MANIFEST.read_text())
    dtype = {"bfloat16": "BF16"}[manifest["dtype"]]
    entries = [Entry(n, dtype, tuple(s)) for n, s in manifest["tensors"].items()]
    half = len(entries) // 2
    shards = {"model-00001-of-00002.safetensors": entries[:half], "model-00002-of-00002.safetensors": entries[half:]}
    for name, shard in shards.items():
        FileWriter(d / name, shard).close()  # truncate() extends the file sparsely: no disk is used
    weight_map = {e.name: f for f, shard in shards.items() for e in shard}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(reference_config(preset("perceptiondlm-8b"))))
    return d


def test_manifest_every_tensor_mapped_or_ignored_and_every_leaf_covered(full_size_headers):
    manifest = json.loads(MANIFEST.read_text())["tensors"]
    ref = open_reference(full_size_headers)  # the converter's own validation, on the real layout
    assert ref.config == preset("perceptiondlm-8b")
    assert set(ref.mapped) | set(ref.ignored) == set(manifest)
    ignored = set(ref.ignored)
    assert any(n.startswith("vision_model.text_model.") for n in ignored)
    assert "vision_model.vision_model.encoder.layers.26.mlp.fc1.weight" in ignored  # after select layer -2
    assert "vision_model.vision_model.post_layernorm.weight" in ignored
    assert "vision_model.logit_scale" in ignored
    shapes = keymap.expected_shapes(ref.config)
    sources = ref.leaf_sources()
    assert set(sources) == set(shapes)
    for target, shape in shapes.items():
        by_layer = sources[target]
        if None in by_layer:
            info, transform = by_layer[None]
            assert keymap.to_ours(np.broadcast_to(np.zeros((), np.uint8), info.shape), transform).shape == shape
        else:
            assert sorted(by_layer) == list(range(shape[0])), target
            for info, transform in by_layer.values():
                got = keymap.to_ours(np.broadcast_to(np.zeros((), np.uint8), info.shape), transform).shape
                assert got == shape[1:], target
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 8.4e9 < n_params < 8.5e9  # SPEC §2.3: ≈ 8.48B without the text tower (minus unused layer/head)


def test_bench_layout_is_the_released_layout():
    manifest = {n: tuple(s) for n, s in json.loads(MANIFEST.read_text())["tensors"].items()}
    assert reference_layout(preset("perceptiondlm-8b")) == manifest
    assert scaled_config(1.0) == preset("perceptiondlm-8b")
    small = scaled_config(0.02)
    assert small.lm.num_layers == 32 and small.vision.num_layers == 27
    assert sum(math.prod(s) for s in reference_layout(small, text_vocab=36224).values()) < 0.03 * 9.2e9


# ---- conversion of the fixtures -------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_convert_fixture_matches_independent_loader(name, tmp_path):
    dst = tmp_path / "ours"
    summary = convert(fixture_dir(name), dst)
    cfg = fixture_config(name)
    assert summary.dtype == "float32" and summary.parameters == sum(
        math.prod(s) for s in keymap.expected_shapes(cfg).values())
    restored_cfg, params = checkpoint.restore_params(dst)
    assert restored_cfg == cfg
    assert_tree_equal(params, load_reference_tree(fixture_dir(name), cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_settings.json"):
        assert (dst / f).read_bytes() == (fixture_dir(name) / f).read_bytes()
    provenance = json.loads((dst / "provenance.json").read_text())
    manifest = json.loads((fixture_dir(name) / "MANIFEST.json").read_text())
    for f, entry in provenance["source_files"].items():
        assert entry["sha256"] == manifest[f], f
    assert set(provenance["source_files"]) >= {"model.safetensors.index.json", "model-00001-of-00004.safetensors"}
    assert provenance["dtype"] == "float32" and provenance["converter_version"] == writer.CONVERTER_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]  # no temp dirs left beside dst


def test_single_file_checkpoint(tmp_path):
    src = copy_checkpoint("tiny_v1", tmp_path / "single")
    tensors = read_all(src)
    for f in src.glob("model-*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "ours")
    _, params = checkpoint.restore_params(tmp_path / "ours")
    assert_tree_equal(params, load_reference_tree(fixture_dir("tiny_v1"), fixture_config("tiny_v1")))


def test_convert_to_bf16_rounds_like_ml_dtypes(tmp_path):
    convert(fixture_dir("tiny_v1"), tmp_path / "ours", dtype="bfloat16")
    _, params = checkpoint.restore_params(tmp_path / "ours")
    want = load_reference_tree(fixture_dir("tiny_v1"), fixture_config("tiny_v1"))
    want = {p: a.astype(ml_dtypes.bfloat16) for p, a in trees.flatten(want).items()}
    assert_tree_equal(params, trees.nest(want))


# ---- bad inputs: culprit named, nothing left behind -----------------------------------------------

def _edit_shard(src: Path, tensor: str, edit) -> str:
    """Apply edit(dict of tensors) to the shard holding `tensor`; returns that shard's file name."""
    index_path = src / "model.safetensors.index.json"
    shard = json.loads(index_path.read_text())["weight_map"][tensor]
    tensors = load_file(src / shard)
    edit(tensors)
    save_file(tensors, src / shard, metadata={"format": "pt"})
    return shard


def _edit_index(src: Path, edit) -> None:
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


Q1 = "language_model.model.layers.1.self_attn.q_proj.weight"


def corrupt_truncate(src):
    shard = src / "model-00003-of-00004.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return ["model-00003-of-00004.safetensors", "truncated"]


def corrupt_truncate_header(src):
    with open(src / "model-00004-of-00004.safetensors", "r+b") as f:
        f.truncate(20)
    return ["model-00004-of-00004.safetensors"]


def corrupt_header_json(src):
    shard = src / "model-00002-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    return ["model-00002-of-00004.safetensors", "corrupt"]


def corrupt_missing_shard(src):
    (src / "model-00002-of-00004.safetensors").unlink()
    return ["missing shard", "model-00002-of-00004.safetensors"]


def corrupt_remove_tensor(src):
    _edit_shard(src, Q1, lambda t: t.pop(Q1))
    _edit_index(src, lambda m: m.pop(Q1))
    return ["missing tensor", Q1]


def corrupt_index_points_at_absent_tensor(src):
    shard = _edit_shard(src, Q1, lambda t: t.pop(Q1))
    return [Q1, shard, "does not contain"]


def corrupt_unexpected_tensor(src):
    name = "language_model.model.layers.1.self_attn.rotary_emb.inv_freq"
    shard = _edit_shard(src, Q1, lambda t: t.update({name: np.ones(8, np.float32)}))
    _edit_index(src, lambda m: m.update({name: shard}))
    return ["unexpected tensor", name]


def corrupt_extra_layer(src):
    # A tensor for an LM layer the config does not have (layer counts disagree).
    name = "language_model.model.layers.7.input_layernorm.weight"
    shard = _edit_shard(src, Q1, lambda t: t.update({name: np.ones(64, np.float32)}))
    _edit_index(src, lambda m: m.update({name: shard}))
    return ["unexpected tensor", name]


def corrupt_wrong_shape(src):
    _edit_shard(src, Q1, lambda t: t.update({Q1: np.ones((64, 32), np.float32)}))
    return [Q1, "shape [64, 32]", "[64, 64]"]


def corrupt_int64(src):
    _edit_shard(src, Q1, lambda t: t.update({Q1: np.ones((64, 64), np.int64)}))
    return [Q1, "I64"]


def corrupt_no_config(src):
    (src / "config.json").unlink()
    return ["config.json"]


def corrupt_no_tokenizer(src):
    (src / "tokenizer.json").unlink()
    return ["tokenizer.json"]


BAD_INPUTS = [corrupt_truncate, corrupt_truncate_header, corrupt_header_json, corrupt_missing_shard,
              corrupt_remove_tensor, corrupt_index_points_at_absent_tensor, corrupt_unexpected_tensor,
              corrupt_extra_layer, corrupt_wrong_shape, corrupt_int64, corrupt_no_config, corrupt_no_tokenizer]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_bad_input_names_culprit_and_leaves_nothing(corrupt, tmp_path):
    src = copy_checkpoint("tiny_v1", tmp_path / "src")
    expected = corrupt(src)
    dst = tmp_path / "out" / "ours"
    with pytest.raises(PDLMError) as e:
        convert(src, dst)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))
    assert nothing_left(dst)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    real, calls = writer.build_leaf, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(writer, "build_leaf", failing)
    dst = tmp_path / "ours"
    with pytest.raises(OSError, match="simulated"):
        convert(fixture_dir("tiny_v1"), dst)
    assert len(calls) == 5 and nothing_left(dst)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path, capsys):
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert cli.main(["--src", str(fixture_dir("tiny_v1")), "--dst", str(dst)]) == 2
    assert "--force" in capsys.readouterr().err and (dst / "old.txt").exists()
    assert cli.main(["--src", str(fixture_dir("tiny_v1")), "--dst", str(dst), "--force"]) == 0
    out = capsys.readouterr().out
    assert "70 mapped" in out and "53 ignored" in out and "229,600" in out
    assert not (dst / "old.txt").exists() and (dst / "params").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]


# ---- export back to safetensors -------------------------------------------------------------------

def test_round_trip_float32_with_unused(tiny_ours, tmp_path):
    dst = tmp_path / "back"
    summary = export(tiny_ours, dst, max_shard_bytes=300_000)
    assert summary.shards > 1 and (dst / "model.safetensors.index.json").exists()
    original, back = read_all(fixture_dir("tiny_v1")), read_all(dst)
    assert set(back) == set(original)  # mapped and (kept) ignored tensors
    for name, a in original.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
        assert np.array_equal(back[name].view(np.uint8), a.view(np.uint8)), name
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
    assert (dst / "config.json").read_bytes() == (fixture_dir("tiny_v1") / "config.json").read_bytes()
    assert (dst / "tokenizer.json").read_bytes() == (fixture_dir("tiny_v1") / "tokenizer.json").read_bytes()
    # ... and the export converts again to the same tree.
    convert(dst, tmp_path / "again")
    _, params = checkpoint.restore_params(tmp_path / "again")
    assert_tree_equal(params, load_reference_tree(fixture_dir("tiny_v1"), fixture_config("tiny_v1")))


def test_export_without_unused_writes_only_mapped(tmp_path):
    convert(fixture_dir("tiny_v1_wide"), tmp_path / "ours")
    export(tmp_path / "ours", tmp_path / "back")
    assert [p.name for p in (tmp_path / "back").glob("*.safetensors")] == ["model.safetensors"]
    cfg = fixture_config("tiny_v1_wide")
    original, back = read_all(fixture_dir("tiny_v1_wide")), read_all(tmp_path / "back")
    assert set(back) == set(keymap.reference_names(cfg))
    for name, a in back.items():
        assert np.array_equal(a.view(np.uint8), original[name].view(np.uint8)), name


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> Path:
    """tiny_v1 re-saved in bf16 (by torch + safetensors), same shards and index."""
    src = copy_checkpoint("tiny_v1", tmp_path_factory.mktemp("bf16") / "tiny_v1_bf16")
    for shard in src.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_torch(shard).items()}
        save_torch(tensors, shard, metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_round_trip_bf16_source_bit_exact(tiny_bf16, tmp_path, dtype):
    summary = convert(tiny_bf16, tmp_path / "ours", dtype=dtype)
    assert summary.dtype == ("bfloat16" if dtype == "auto" else "float32")
    stored = checkpoint.params_metadata(tmp_path / "ours")
    assert {str(dt) for _, dt in stored.values()} == {summary.dtype}
    export(tmp_path / "ours", tmp_path / "back")  # auto: every tensor back in its source dtype (bf16)
    back = load_torch(tmp_path / "back" / "model.safetensors")
    original = {}
    for shard in tiny_bf16.glob("*.safetensors"):
        original.update(load_torch(shard))
    assert set(back) == set(keymap.reference_names(fixture_config("tiny_v1")))
    for name, t in back.items():
        assert t.dtype == torch.bfloat16 and t.shape == original[name].shape, name
        assert torch.equal(t.view(torch.int16), original[name].view(torch.int16)), name


def test_export_reconstructs_reference_config_when_original_missing(tiny_ours, tmp_path):
    ours = tmp_path / "ours"
    shutil.copytree(tiny_ours, ours)
    (ours / "reference_config.json").unlink()
    export(ours, tmp_path / "back")
    rebuilt = PDLMConfig.from_reference_file(tmp_path / "back" / "config.json")
    assert rebuilt == fixture_config("tiny_v1")


def test_export_cli_and_errors(tiny_ours, tmp_path, capsys):
    assert cli.main(["--to-safetensors", "--src", str(tiny_ours), "--dst", str(tmp_path / "b"),
                     "--dtype", "bfloat16"]) == 0
    assert "123 tensors" in capsys.readouterr().out
    # Kept unused tensors are written back raw; every mapped tensor is cast as asked.
    back = load_torch(tmp_path / "b" / "model.safetensors")
    assert back[Q1].dtype == torch.bfloat16 and back["vision_model.logit_scale"].dtype == torch.float32
    # Export refuses a reference checkpoint as source, naming the converter.
    assert cli.main(["--to-safetensors", "--src", str(fixture_dir("tiny_v1")), "--dst", str(tmp_path / "c")]) == 2
    assert "pdlm-convert" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_bench_runs(tmp_path):
    from convert import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--scale", "0.001", "--lm-layers", "2", "--vision-layers", "2", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["parameters"] > 0 and run["peak_rss_gb"] > 0 and run["gb_per_s"] > 0
