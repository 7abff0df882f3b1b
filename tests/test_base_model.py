"""PerceptionDLM-Base (the reference's DMLLM, SPEC-base): pdlm-convert + pdlm-infer --question and the API are
token-exact against the reference fixture `base_tiny`, forward by forward; the block schedule; bad input."""

import json

import numpy as np
import pytest

from helpers import fixture_dir, fixture_oracle, fixture_tensors

NAME = "base_tiny"


def _settings(oracle):
    gen = oracle["generation"]
    return dict(gen_length=gen["gen_length"], block_length=gen["block_length"], steps=gen["steps"])


@pytest.fixture(scope="module")
def checkpoint(converted):
    return converted(NAME)


@pytest.fixture(scope="module")
def handle(checkpoint):
    import pdlm_jax

    return pdlm_jax.load(checkpoint)


def test_converted_config_is_base_without_region_parts(checkpoint):
    from pdlm_jax import keymap
    from pdlm_jax.checkpoint import load_config, params_metadata

    cfg = load_config(checkpoint)
    assert cfg.is_base and cfg.num_vision_layers_used == 2  # select -2 of 3 layers (HF hidden-state order)
    stored = params_metadata(checkpoint)
    assert "mask_embed/embedding" not in stored and set(stored) == set(keymap.expected_shapes(cfg))
    assert keymap.match(cfg, "mask_id_embedding.weight") is None  # an unexpected tensor for a DMLLM


def test_cli_is_token_exact(checkpoint, tmp_path):
    from infer.cli import main as infer_main

    oracle, out = fixture_oracle(NAME), tmp_path / "answer.json"
    s = _settings(oracle)
    assert infer_main(["--checkpoint", str(checkpoint), "--image", str(fixture_dir(NAME) / "image.png"),
                       "--question", oracle["question"], "--gen-length", str(s["gen_length"]),
                       "--block-length", str(s["block_length"]), "--steps", str(s["steps"]),
                       "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["token_ids"] == oracle["generated_ids"]
    assert result["answer"] == oracle["demo_response"]
    assert result["response_raw"] == oracle["response_raw"]
    assert result["forwards"] == oracle["generation"]["forwards"]
    assert result["prompt_length"] == oracle["prompt_length"]
    assert result["seconds"] >= result["compile_seconds"] >= 0


def test_api_every_forward_equals_the_reference(handle):
    oracle, tensors = fixture_oracle(NAME), fixture_tensors(NAME)
    result = handle.answer(fixture_dir(NAME) / "image.png", oracle["question"], return_steps=True,
                           **_settings(oracle))
    np.testing.assert_array_equal(np.array(result["step_states"]), tensors["step_states"])
    assert result["token_ids"] == tensors["output_ids"].tolist()
    assert result["answer"] == oracle["demo_response"]


def test_prompt_and_vision_match_the_reference(handle):
    from pdlm_jax.answering import prepare_question

    oracle, tensors = fixture_oracle(NAME), fixture_tensors(NAME)
    prep = prepare_question(fixture_dir(NAME) / "image.png", oracle["question"], handle.tokenizer, handle.cfg)
    assert prep.prompt_text == oracle["prompt_text"]
    assert prep.input_ids.tolist() == oracle["input_ids"]
    np.testing.assert_array_equal(prep.tiled.tiles_uint8, tensors["tiles_uint8"])
    from flax import nnx

    model = nnx.merge(handle.program.graphdef, handle.program.state)
    vision = np.asarray(model.encode_tiles(prep.tiled.pixel_values))
    np.testing.assert_allclose(vision, tensors["vision_embeds"], atol=1e-5, rtol=1e-5)


def test_image_goes_to_the_last_image_tag():
    from pdlm_jax.regions.prompt import build_question_text

    text = build_question_text("Look: <image> {what}?", num_tiles=1, num_image_tokens=2)
    image = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    assert text == ("<|start_header_id|>user<|end_header_id|>\n<image>\nLook: " + image + " {what}?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n")


def test_block_schedule():
    from pdlm_jax.block_sampling import banned_ids, block_schedule, transfer_counts
    from pdlm_jax.errors import PDLMError

    assert transfer_counts(8, 4) == [2, 2, 2, 2]
    assert transfer_counts(8, 3) == [3, 3, 2]
    assert transfer_counts(4, 6) == [1, 1, 1, 1, 0, 0]
    assert block_schedule(8, 4, 12) == (2, [1, 1, 1, 1])  # 8 forwards, not 12: the early exit
    assert block_schedule(128, 128, 128) == (1, [1] * 128)
    for bad in [(16, 5, 8), (16, 8, 3), (0, 8, 8)]:
        with pytest.raises(PDLMError):
            block_schedule(*bad)
    assert banned_ids(402, 372).tolist() == [372]
    assert banned_ids(126464, 126336).tolist() == [126080, 126081, 126336, 126346, 126347]


def test_other_schedules_run_with_the_right_forwards(handle):
    oracle = fixture_oracle(NAME)
    image = fixture_dir(NAME) / "image.png"
    one = handle.answer(image, oracle["question"], gen_length=8, block_length=4, steps=12, return_steps=True)
    assert one["forwards"] == 8 and len(one["token_ids"]) == 8
    states = np.array(one["step_states"])
    assert ((states != 372).sum(axis=1) == np.arange(1, 9)).all()  # one token per forward, in block order
    assert (states[3, 4:] == 372).all() and (states[3, :4] != 372).all()


def test_threshold_unmasking_of_the_blocks(handle):
    """A threshold near 1 (the random fixture's flat logits never reach it) commits the single most confident
    position per forward: the exact sampler with one token a step. A threshold below 1/vocabulary, which every
    argmax exceeds, commits a whole block per forward."""
    oracle = fixture_oracle(NAME)
    image = fixture_dir(NAME) / "image.png"
    exact = handle.answer(image, oracle["question"], gen_length=8, block_length=4, steps=8, return_steps=True)
    one = handle.answer(image, oracle["question"], gen_length=8, block_length=4, steps=8, unmask="threshold:0.999999",
                        return_steps=True)
    assert one["token_ids"] == exact["token_ids"] and one["step_states"] == exact["step_states"]
    assert one["forwards"] == 8 and one["mode"] == "threshold:0.999999"
    every = handle.answer(image, oracle["question"], gen_length=8, block_length=4, steps=8, unmask="threshold:1e-06",
                          cache="prefix", return_steps=True)
    assert every["forwards"] == 2 and every["mode"] == "prefix+threshold:1e-06"
    states = np.array(every["step_states"])
    assert (states[0, :4] != 372).all() and (states[0, 4:] == 372).all() and (states[1] != 372).all()


def test_prefix_cache_is_exact_for_a_one_layer_lm(checkpoint):
    """With one LM layer the cached keys/values (the layer's input embeddings projected) cannot go stale: the
    prefix mode's cached steps must then reproduce the exact mode, whatever the schedule."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from pdlm_jax.answering import QuestionAnswerer
    from pdlm_jax.checkpoint import restore_params, tokenizer_path
    from pdlm_jax.modeling.pdm import from_tree
    from pdlm_jax.regions.tokenizer import Tokenizer

    cfg, tree = restore_params(checkpoint, dtype=jnp.float32)
    cfg = cfg.replace(lm=dataclasses.replace(cfg.lm, num_layers=1))
    tree["lm"]["layers"] = jax.tree.map(lambda a: a[:1], tree["lm"]["layers"])
    handle = QuestionAnswerer(cfg, from_tree(cfg, tree), Tokenizer(tokenizer_path(checkpoint), base=True))
    image, question = fixture_dir(NAME) / "image.png", fixture_oracle(NAME)["question"]
    schedule = dict(gen_length=16, block_length=8, steps=8)  # finished, current and later blocks all occur
    exact = handle.answer(image, question, **schedule)
    cached = handle.answer(image, question, cache="prefix", **schedule)
    assert cached["token_ids"] == exact["token_ids"] and cached["mode"] == "prefix"
    assert len(set(exact["token_ids"])) > 3  # a real answer, not one repeated id


def test_wrong_checkpoint_kind_is_a_clear_error(checkpoint, handle, capsys):
    from infer.cli import main as infer_main
    from pdlm_jax.errors import PDLMError

    image = str(fixture_dir(NAME) / "image.png")
    assert infer_main(["--checkpoint", str(checkpoint), "--image", image, "--masks", image]) == 2
    assert "PerceptionDLM-Base checkpoint" in capsys.readouterr().err
    from pdlm_jax import DEMO_MODEL

    assert infer_main(["--checkpoint", str(DEMO_MODEL), "--image", image, "--question", "What?"]) == 2
    assert "region-captioning checkpoint" in capsys.readouterr().err
    assert infer_main(["--checkpoint", str(checkpoint), "--image", image]) == 2
    assert "--question is required" in capsys.readouterr().err
    # the handle's type says what it can do: no caption_regions stub; a caller that needs a captioner asks
    from pdlm_jax.api import answerer, captioner

    assert not hasattr(handle, "caption_regions") and answerer(handle) is handle
    with pytest.raises(PDLMError, match="PerceptionDLM-Base"):
        captioner(handle)
    with pytest.raises(PDLMError, match="IMG_CONTEXT"):
        handle.answer(image, "what is <IMG_CONTEXT>?")
    half = np.zeros((64, 64, 3), np.uint8)
    half[:, 32:] = 255  # normalises to -1 and +1 in equal numbers: the reference would drop this tile
    with pytest.raises(PDLMError, match="sum to exactly 0"):
        handle.answer(half, "What?")


def test_base_tokenizer_needs_only_the_image_tokens(tmp_path):
    """The released Base tokenizer is LLaDA's plus <IMG_CONTEXT>, <img>, </img>: no region tokens."""
    from pdlm_jax.errors import PDLMError
    from pdlm_jax.regions.tokenizer import Tokenizer

    tok = json.loads((fixture_dir(NAME) / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if "Mask_Cap" not in t["content"]]
    for t in [t for t in tok["model"]["vocab"] if "Mask_Cap" in t]:
        del tok["model"]["vocab"][t]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert Tokenizer(tmp_path, base=True).special.mask == 372
    with pytest.raises(PDLMError, match="Mask_Cap"):
        Tokenizer(tmp_path)


# ---- sharded: 8 fake CPU devices in the session's subprocess -----------------------------------------------

# The CLI on all three axes (exact mode), the API on fsdp:8 in the prefix-cache mode (vs its single-device run).
MESHES = [("data:2,fsdp:2,tensor:2", "none"), ("fsdp:8", "prefix")]


def _child(checkpoint: str, cli_output: str) -> list[dict]:
    import jax

    import pdlm_jax
    from infer.cli import main as infer_main

    assert jax.device_count() == 8
    oracle, image = fixture_oracle(NAME), str(fixture_dir(NAME) / "image.png")
    s = _settings(oracle)
    assert infer_main(["--checkpoint", checkpoint, "--image", image, "--question", oracle["question"],
                       "--gen-length", str(s["gen_length"]), "--block-length", str(s["block_length"]),
                       "--steps", str(s["steps"]), "--mesh", MESHES[0][0], "--output", cli_output, "--quiet"]) == 0
    out = []
    for mesh, cache in MESHES[1:]:
        handle = pdlm_jax.load(checkpoint, mesh=mesh)
        q = handle.program.state["lm"]["layers"]["attn"]["q"]["kernel"][...]
        result = handle.answer(image, oracle["question"], cache=cache, **s)
        out.append(dict(mesh=mesh, cache=cache, token_ids=result["token_ids"], q_spec=list(q.sharding.spec)))
    return out


def test_sharded_mesh_is_token_exact(checkpoint, handle, tmp_path, fake_devices):
    cli_output = tmp_path / "cli.json"
    (prefix,) = fake_devices.run("test_base_model", "_child", str(checkpoint), str(cli_output))
    oracle = fixture_oracle(NAME)
    assert json.loads(cli_output.read_text())["token_ids"] == oracle["generated_ids"]
    assert prefix["q_spec"] == [None, "fsdp", None]  # really sharded
    single = handle.answer(fixture_dir(NAME) / "image.png", oracle["question"], cache="prefix", **_settings(oracle))
    assert prefix["token_ids"] == single["token_ids"]


def test_quantized_base_answers_with_int8_kernels(checkpoint):
    # load(quantize=...) quantizes a Base model's linear kernels as it does a region model's
    import jax
    import jax.numpy as jnp

    import pdlm_jax

    handle = pdlm_jax.load(checkpoint, quantize="int8")
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(handle.program.state)
               if jax.tree_util.keystr(path).endswith("['qvalue']")]
    assert kernels and all(k.dtype == jnp.int8 for k in kernels)
    result = handle.answer(fixture_dir(NAME) / "image.png", fixture_oracle(NAME)["question"], gen_length=8,
                           block_length=8, steps=8)
    assert len(result["token_ids"]) == 8
