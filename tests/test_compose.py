"""`pdlm-convert --compose`: a PerceptionDLM-Base checkpoint from LLaDA + SigLIP components.

Oracles we did not write: transformers' own classes write the components (`LlamaForCausalLM` with an untied
lm_head, re-labelled as LLaDA with LLaDA's config names; `SiglipModel` / `SiglipVisionModel`, all saved with
`save_pretrained`), transformers' `SiglipVisionModel` computes the hidden state the composed tower must
reproduce, transformers' tokenizer adds the image tokens as the reference's processor does, and
tests/helpers.load_reference_tree reads the reference-named tensors independently of the composer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from convert import cli
from convert.compose import compose, init_projector
from components import IMAGE_TOKENS
from helpers import ROOT, fixture_dir, hub_cache, load_reference_tree
from pdlm_jax import checkpoint
from pdlm_jax.config import PDLMConfig

@pytest.fixture(scope="module")
def parts(components) -> dict[str, Path]:
    return components


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("composed") / "base"
    compose(parts["lm"], parts["siglip"], dst, keep_unused=True, seed=3)
    return dst


def _component_tensors(parts) -> dict[str, np.ndarray]:
    """Every component tensor under its reference (DMLLM) name: the module names of SPEC-train-base T3.5."""
    out = {}
    for key, prefix in (("lm", "language_model."), ("siglip", "vision_model.")):
        for shard in parts[key].glob("*.safetensors"):
            out.update({prefix + n: a for n, a in load_file(shard).items()})
    return out


def _expected_tree(parts, cfg: PDLMConfig, folder: Path) -> dict:
    save_file(_component_tensors(parts), str(folder / "model.safetensors"))
    return load_reference_tree(folder, cfg)


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def test_every_component_tensor_lands_where_spec_says(parts, composed, tmp_path):
    cfg, params = checkpoint.restore_params(composed)
    assert cfg.is_base and cfg.lm.vocab_size == 402 and cfg.vision.hidden_size == 32
    ours, expected = _flat(params), _flat(_expected_tree(parts, cfg, tmp_path))
    projector = {p for p in ours if p.startswith("projector/")}
    assert set(ours) == set(expected) | projector and len(projector) == 4
    for path, value in expected.items():
        assert value.dtype == ours[path].dtype and np.array_equal(value, ours[path]), path


@pytest.mark.parametrize("lm, vision", [("olmo", "siglip"), ("lm", "tower")])
def test_other_component_forms_give_the_same_checkpoint(parts, composed, lm, vision, tmp_path):
    """LLaDA's original names and a SiglipVisionModel compose the same tensors (the projector: same seed)."""
    compose(parts[lm], parts[vision], tmp_path / "base", seed=3)
    _, reference = checkpoint.restore_params(composed)
    _, params = checkpoint.restore_params(tmp_path / "base")
    a, b = _flat(reference), _flat(params)
    assert set(a) == set(b) and all(np.array_equal(a[p], b[p]) for p in a)


def test_projector_is_pytorch_default_uniform(composed):
    """T3.2: weight and bias ~ U(±1/√fan_in), seeded: in bounds, the uniform's spread, reproducible."""
    cfg, params = checkpoint.restore_params(composed)
    for layer, fan_in in (("fc1", 4 * 32), ("fc2", 64)):
        bound = 1 / np.sqrt(fan_in)
        for kind in ("kernel", "bias"):
            value = np.asarray(params["projector"][layer][kind])
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound
        kernel = np.asarray(params["projector"][layer]["kernel"])
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound  # the std of U(-b, b)
        assert abs(kernel.mean()) < 0.05 * bound
    again, other = init_projector(cfg, 3), init_projector(cfg, 4)
    assert np.array_equal(again["projector/fc1/kernel"], np.asarray(params["projector"]["fc1"]["kernel"]))
    assert not np.array_equal(other["projector/fc1/kernel"], again["projector/fc1/kernel"])


def test_vision_tower_reproduces_hf_hidden_state(parts, composed):
    """The composed tower's output equals transformers' SiglipVisionModel hidden_states[-2] (the layer the
    reference's DMLLM reads), float32, on a random image: max |difference| <= 1e-5."""
    import jax.numpy as jnp

    from pdlm_jax.modeling.pdm import from_tree

    cfg, params = checkpoint.restore_params(composed)
    model = from_tree(cfg, params)
    hf = transformers.SiglipVisionModel.from_pretrained(parts["tower"], attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
    got = np.asarray(model.vision(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())))
    err = float(np.abs(got - want).max())
    print(f"max |ours - HF hidden_states[-2]| = {err:.2e}")
    assert got.shape == want.shape and err <= 1e-5


def test_tokenizer_adds_the_image_tokens_as_the_reference_processor(parts, composed):
    """T0.4: the LM's tokenizer + <IMG_CONTEXT>, <img>, </img> as special tokens, no resize; transformers'
    tokenizer of the composed folder equals the LM's after the reference processor's add_special_tokens."""
    reference = transformers.AutoTokenizer.from_pretrained(parts["lm"])
    reference.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS}, replace_additional_special_tokens=False)
    ours = transformers.AutoTokenizer.from_pretrained(composed)
    text = "<|start_header_id|>user<|end_header_id|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|eot_id|>"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.convert_tokens_to_ids(IMAGE_TOKENS) == reference.convert_tokens_to_ids(IMAGE_TOKENS) == [376, 377, 378]
    assert len(ours) == len(reference) == 379 and ours.additional_special_tokens == IMAGE_TOKENS
    reference_config = checkpoint.read_json(composed, checkpoint.REFERENCE_CONFIG_FILE)
    assert reference_config["image_token_id"] == 376 and reference_config["model_type"] == "dmllm"
    assert checkpoint.read_sampler(composed) == {"gen_length": 128, "block_length": 128, "steps": 128}


def test_exports_to_the_dmllm_layout_bit_identical(parts, composed, tmp_path):
    """--to-safetensors writes every component tensor under its DMLLM name, bit for bit (the text tower and
    unused vision tensors too: composed with --keep-unused), and a config.json the reference's DMLLM reads."""
    assert cli.main(["--to-safetensors", "--src", str(composed), "--dst", str(tmp_path / "dmllm")]) == 0
    back = {}
    for shard in (tmp_path / "dmllm").glob("*.safetensors"):
        back.update(load_file(shard))
    components = _component_tensors(parts)
    projector = {n for n in back if n.startswith("vision_abstractor.projection.")}
    assert set(back) == set(components) | projector and len(projector) == 4
    for name, value in components.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name].view(np.uint8), value.view(np.uint8)), name
    config = json.loads((tmp_path / "dmllm" / "config.json").read_text())
    assert config["architectures"] == ["DMLLM"] and "llada" in config["language_model_config"]["_name_or_path"]
    assert PDLMConfig.from_reference(config) == checkpoint.load_config(composed)


def test_composed_checkpoint_answers_with_pdlm_infer(composed, tmp_path):
    from infer.cli import main as infer_main

    out = tmp_path / "answer.json"
    assert infer_main(["--checkpoint", str(composed), "--image", str(fixture_dir("base_tiny") / "image.png"),
                       "--question", "What is in the picture?", "--gen-length", "8", "--block-length", "8",
                       "--steps", "4", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert isinstance(result["answer"], str) and result["forwards"] == 4


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def bad_missing_lm_tensor(parts, tmp):
    lm = _copy(parts["olmo"], tmp / "lm")
    tensors = load_file(lm / "model.safetensors")
    del tensors["model.transformer.blocks.2.up_proj.weight"]
    save_file(tensors, str(lm / "model.safetensors"))
    return lm, parts["siglip"], ["missing tensor", "layers.2.mlp.up_proj", str(lm)]


def bad_lm_hidden_size(parts, tmp):
    lm = _copy(parts["lm"], tmp / "lm")
    _edit_json(lm / "config.json", hidden_size=48, num_attention_heads=4, num_key_value_heads=4)
    return lm, parts["siglip"], ["embed_tokens.weight", "[402, 64]", "[402, 48]", str(lm / "config.json")]


def bad_vision_config(parts, tmp):
    vision = _copy(parts["tower"], tmp / "vision")
    _edit_json(vision / "config.json", hidden_size=48, num_attention_heads=2)
    return parts["lm"], vision, ["patch_embedding", "[48]", str(vision / "config.json")]


def bad_not_llada(parts, tmp):
    lm = _copy(parts["lm"], tmp / "lm")
    _edit_json(lm / "config.json", model_type="llama")
    return lm, parts["siglip"], ["--lm", "'llama'", "LLaDA"]


def bad_vision_is_an_lm(parts, tmp):
    return parts["lm"], parts["lm"], ["--vision", "'llada'", "SigLIP"]


def bad_tokenizer_outgrows_vocab(parts, tmp):
    lm = _copy(parts["lm"], tmp / "lm")
    _edit_json(lm / "config.json", vocab_size=377)
    tensors = {}
    for shard in lm.glob("*.safetensors"):  # a consistent 377-row LM, so only the tokenizer is wrong
        tensors.update({n: a[:377] if n in ("model.embed_tokens.weight", "lm_head.weight") else a
                        for n, a in load_file(shard).items()})
        shard.unlink()
    (lm / "model.safetensors.index.json").unlink()
    save_file(tensors, str(lm / "model.safetensors"))
    return lm, parts["siglip"], ["379 tokens", "377", "tokenizer"]


@pytest.mark.parametrize("bad", [bad_missing_lm_tensor, bad_lm_hidden_size, bad_vision_config, bad_not_llada,
                                 bad_vision_is_an_lm, bad_tokenizer_outgrows_vocab],
                         ids=lambda f: f.__name__.removeprefix("bad_"))
def test_bad_components_are_one_clear_error_and_leave_nothing(parts, bad, tmp_path, capsys):
    lm, vision, expected = bad(parts, tmp_path)
    dst = tmp_path / "out" / "base"
    assert cli.main(["--compose", "--lm", str(lm), "--vision", str(vision), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdlm-convert: error:") and len(err.strip().splitlines()) == 1
    for part in expected:
        assert part in err, (part, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- hf:// ids through an offline Hugging Face cache ---------------------------------------------

def test_compose_from_hf_ids_offline(parts, composed, tmp_path):
    """The CLI in a fresh process with HF_HUB_CACHE + HF_HUB_OFFLINE=1: huggingface_hub's own resolution."""
    cache = hub_cache(tmp_path / "hub", {"tiny/llada": parts["lm"], "tiny/siglip": parts["siglip"]})
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    dst = tmp_path / "base"
    run = subprocess.run([sys.executable, "-m", "convert", "--compose", "--lm", "hf://tiny/llada", "--vision",
                          "hf://tiny/siglip@main", "--dst", str(dst), "--seed", "3", "--keep-unused"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    a, b = _flat(checkpoint.restore_params(composed)[1]), _flat(checkpoint.restore_params(dst)[1])
    assert set(a) == set(b) and all(np.array_equal(a[p], b[p]) for p in a)
    composed_from = checkpoint.read_json(dst, checkpoint.PROVENANCE_FILE)["composed"]
    assert composed_from["lm"] == "hf://tiny/llada" and str(cache) in composed_from["lm_dir"]
    dmllm = checkpoint.read_json(dst, checkpoint.REFERENCE_CONFIG_FILE)
    assert dmllm["language_model_config"]["_name_or_path"] == "tiny/llada"  # the id, not the snapshot's hash



def test_offline_without_a_snapshot_is_a_clear_error(parts, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    cache = hub_cache(tmp_path / "hub", {"tiny/siglip": parts["siglip"]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["--compose", "--lm", "hf://tiny/absent", "--vision", "hf://tiny/siglip", "--dst",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--lm hf://tiny/absent" in err and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert cli.main(["--src", "hf://tiny", "--dst", str(tmp_path / "x")]) == 2
    assert "hf://ORG/NAME" in capsys.readouterr().err
