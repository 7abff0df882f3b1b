"""LoRA (pdlm_jax.lora, qwix): the adapted forward equals the merged weights; a LoRA run trains only the
adapters (base weights bit-identical), resumes exactly from adapter-only checkpoints, and exports an
adapter directory and a merged checkpoint that caption identically."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fixture_dir

import pdlm_jax
from pdlm_jax import lora
from pdlm_jax.checkpoint import SAMPLER_FILE, restore_params
from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.pdm import PerceptionDLM
from pdlm_jax.qwix_tracing import under
from pdlm_jax.trees import flatten
from train import checkpointing, synthetic
from train import config as train_config
from train.cli import train


class Interrupt(Exception):
    pass


def test_adapted_forward_equals_merged_weights():
    cfg, spec = preset("tiny"), lora.LoraConfig(rank=4, alpha=8.0)
    model = lora.add_adapters(PerceptionDLM(cfg, rngs=nnx.Rngs(0)), spec, seed=1)
    assert [p for p, _ in lora.targets(model, spec)] == [f"lm/layers/{m}" for m in (
        "attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate", "mlp/up")]
    graphdef, _ = nnx.split(model)
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert adapters["lm"]["layers"]["mlp"]["up"]["kernel_lora_a"].shape == (cfg.lm.num_layers, cfg.lm.hidden_size, 4)
    assert not np.any(adapters["lm"]["layers"]["mlp"]["up"]["kernel_lora_b"])  # B = 0: starts as the base
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapters)
    x = jax.random.normal(jax.random.key(0), (1, 7, cfg.lm.hidden_size))

    def forward(state):
        return nnx.merge(graphdef, state).lm(x)

    adapted = jax.jit(under(lora.provider(spec))(forward))(lora.combine(base, adapters))
    ignored = jax.jit(forward)(lora.combine(base, adapters))  # no qwix: the adapters do nothing
    plain_graphdef = nnx.split(PerceptionDLM(cfg, rngs=nnx.Rngs(0)))[0]
    merged = jax.jit(lambda s: nnx.merge(plain_graphdef, s).lm(x))(lora.merge(base, adapters, spec))
    np.testing.assert_allclose(adapted, merged, atol=2e-5, rtol=1e-4)
    assert np.abs(np.asarray(ignored) - np.asarray(merged)).max() > 1e-2


@pytest.mark.parametrize("config, message", [
    ({"lora": {"rank": -1}}, "non-negative"),
    ({"lora": {"rank": 4, "alpha": 0}}, "alpha"),
    ({"lora": {"rank": 4, "target": "lm/("}}, "regular expression"),
    ({"lora": {"rank": 4, "bogus": 1}}, "unknown keys"),
    ({"lora": {"rank": 4, "base": "int3"}}, "lora.base must be one of auto, f32, bf16, int8, int4"),
    ({"lora": {"rank": 4}, "model": {"freeze": ["vision"]}}, "model.freeze has no effect"),
])
def test_bad_lora_config(config, message):
    with pytest.raises(PDLMError, match=message):
        train_config.from_dict(config)


def test_target_matching_nothing_names_the_paths():
    with pytest.raises(PDLMError, match="matches no linear layer.*lm/layers/attn/q"):
        lora.add_adapters(PerceptionDLM(preset("tiny"), rngs=nnx.Rngs(0)), lora.LoraConfig(rank=2, target="nope"))


def _cfg(base, out, cache, **run):
    return train_config.from_dict({
        "model": {"init_from": str(base), "dtype": "bfloat16", "remat": True},
        "data": {"synthetic_scenes": 40, "batch_size": 2, "group_divisor": 6, "tile_buckets": [7],
                 "length_buckets": [320], "threads": 1, "prefetch": 2},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0},
        "lora": {"rank": 4, "alpha": 8.0},
        "run": {"output_dir": str(out), "max_steps": 4, "save_every": 2, "keep": 2, "compilation_cache": str(cache),
                **run},
    })


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_lora_run_trains_adapters_only_resumes_exactly_and_exports(tmp_path):
    from train import step as step_lib
    from pdlm_jax import sharding as shd

    cfg = preset("tiny")  # a base checkpoint to fine-tune: random weights, the fixture tokenizer
    base_params = step_lib.init_params(cfg, 7, shd.make_mesh("data:1", jax.devices()[:1]))
    base = checkpointing.export(tmp_path / "base", cfg, base_params, fixture_dir("tiny_v1"))
    (base / SAMPLER_FILE).write_text(json.dumps({"gen_length": 2, "steps": 2}))
    cache = tmp_path / "cache"

    full = train(_cfg(base, tmp_path / "a", cache), progress=False)
    # the base weights are bit-identical after training, held in the compute dtype (lora.base: auto); only the
    # adapters moved
    _, stored = restore_params(base, dtype=np.float32)
    frozen = flatten(full["state"]["frozen"])
    assert frozen.keys() == flatten(stored).keys()
    for path, value in flatten(stored).items():
        assert frozen[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(frozen[path]), np.asarray(value.astype(jnp.bfloat16)), err_msg=path)
    trained = flatten(full["state"]["params"])
    assert all(p.endswith(lora.SUFFIXES) for p in trained)
    assert np.abs(np.asarray(trained["lm/layers/attn/q/kernel_lora_b"])).max() > 0
    assert set(full["state"]["opt"][1][0].mu) == {"lm"}  # AdamW moments of the adapters alone

    def stop_after_two(step, record):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg(base, tmp_path / "b", cache, export=False), progress=False, callback=stop_after_two)
    _, saved = checkpointing.saved_state(tmp_path / "b", 2)
    assert set(saved) == {"params", "opt", "step"}  # adapter-only checkpoint: no copy of the base
    train(_cfg(base, tmp_path / "b", cache, export=False), progress=False)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # bit-identical losses, steps 1..4

    # exports: the merged checkpoint and base + adapter caption identically; both carry sampler.json
    adapter = tmp_path / "a" / "adapter"
    assert json.loads((adapter / "sampler.json").read_text())["gen_length"] == 2
    assert json.loads((full["export"] / "sampler.json").read_text())["gen_length"] == 2
    scene = synthetic.make_scene(5, 0, num_shapes=2)
    merged = pdlm_jax.load(full["export"], dtype="float32", compilation_cache=cache).caption_regions(
        scene.image, scene.masks, gen_length=2, steps=2)
    _, merged_params = restore_params(full["export"], dtype=np.float32)
    spec, adapters = lora.load_adapter(adapter, cfg)
    np.testing.assert_allclose(flatten(merged_params)["lm/layers/mlp/up/kernel"],
                               flatten(lora.merge(stored, adapters, spec))["lm/layers/mlp/up/kernel"], atol=1e-6)
    # pdlm-infer --adapter (pdlm_jax.load(base, adapter=...)) captions as the merged export, with the adapter's
    # sampler.json (2 slots); a directory that is not an adapter is refused
    from infer.cli import main as infer_main
    image, masks = synthetic.write_scene(scene, tmp_path / "scene")
    args = ["--checkpoint", str(base), "--image", str(image), "--masks", *map(str, masks), "--dtype", "float32",
            "--quiet", "--compilation-cache", str(cache), "--output"]
    assert infer_main(args + [str(tmp_path / "r.json"), "--adapter", str(adapter)]) == 0
    cli = json.loads((tmp_path / "r.json").read_text())
    assert [r["token_ids"] for r in cli["regions"]] == [r["token_ids"] for r in merged["regions"]]
    assert infer_main(args + [str(tmp_path / "x.json"), "--adapter", str(base)]) == 2
    # train.export_step of a kept step: merged weights as the run's own export, or the adapter directory
    from train.export_step import export_step
    again = export_step(tmp_path / "a", tmp_path / "merged4")
    np.testing.assert_allclose(flatten(restore_params(again, dtype=np.float32)[1])["lm/layers/attn/q/kernel"],
                               flatten(merged_params)["lm/layers/attn/q/kernel"], atol=1e-6)
    _, adapters4 = lora.load_adapter(export_step(tmp_path / "a", tmp_path / "adapter4", adapter=True), cfg)
    np.testing.assert_array_equal(flatten(adapters4)["lm/layers/attn/q/kernel_lora_b"],
                                  flatten(adapters)["lm/layers/attn/q/kernel_lora_b"])
    # an adapter refuses a base of another architecture
    other = preset("tiny-roi4")
    with pytest.raises(PDLMError, match="different base model"):
        lora.load_adapter(adapter, other)


def test_siglip_attention_output_is_no_lora_target():
    # SigLIP's attention output is a HeadsProjection, not an nnx.Linear (modeling/siglip.py): qwix, which adapts
    # Linear.__call__, would train nothing there while the export merged a delta into it.
    model = PerceptionDLM(preset("tiny"), rngs=nnx.Rngs(0))
    paths = [p for p, _ in lora.targets(model, lora.LoraConfig(rank=2, target=".*"))]
    assert "vision/layers/attn/o" not in paths
    assert {"lm/layers/attn/o", "vision/layers/attn/q", "lm/lm_head"} <= set(paths)


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_qlora_trains_on_a_quantized_base_and_exports_into_the_float_base(tmp_path, base):
    from train.export_step import base_params

    cfg = train_config.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(fixture_dir("tiny_v1")), "dtype": "bfloat16", "remat": True},
        "data": {"synthetic_scenes": 40, "batch_size": 2, "group_divisor": 6, "tile_buckets": [7],
                 "length_buckets": [320], "threads": 1, "prefetch": 2},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "noise_t_min": 0.8},  # most answer tokens masked: steadier
        "lora": {"rank": 4, "alpha": 8.0, "base": base},
        "run": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "save_every": 6, "keep": 1,
                "compilation_cache": str(tmp_path / "cache")},
    })
    out = train(cfg, progress=False)
    frozen = flatten(out["state"]["frozen"])
    # every linear kernel held quantized (int4: scales per group of input rows), the rest in bfloat16
    assert str(frozen["lm/layers/mlp/up/kernel/array/qvalue"].dtype) == base
    assert "lm/layers/mlp/up/kernel" not in frozen
    assert {str(v.dtype) for p, v in frozen.items() if "/array/" not in p} == {"bfloat16"}
    losses = out["losses"]
    assert all(np.isfinite(losses)) and max(losses[-2:]) < losses[0], losses
    # the export merges the adapters into the float32 base training began from, not into its quantized copy
    spec, adapters = lora.load_adapter(tmp_path / "run" / "adapter", cfg.model_config())
    assert spec.base == base
    _, exported = restore_params(out["export"], dtype=np.float32)
    expected = flatten(lora.merge(base_params(cfg, cfg.model_config()), adapters, spec))
    np.testing.assert_allclose(flatten(exported)["lm/layers/mlp/up/kernel"], expected["lm/layers/mlp/up/kernel"],
                               atol=1e-6)
