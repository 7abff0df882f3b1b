"""Tiny LLaDA and SigLIP component folders written by transformers' own classes (`pdlm-convert --compose`'s
inputs): LLaDA with Hugging Face names (sharded) and with its original names (one file); SigLIP as SiglipModel
and as SiglipVisionModel (the same vision weights). Sizes of the Base fixture (SPEC-base §B8), so a composed
model runs with the fixture's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.numpy import load_file, save_file

from helpers import fixture_dir

LM = dict(vocab_size=402, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=4, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64,
              patch_size=16)
TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8)
IMAGE_TOKENS = ["<IMG_CONTEXT>", "<img>", "</img>"]
# LLaDA's original (OLMo-style) names from its Hugging Face names (SPEC §12, read backwards).
TO_OLMO = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight":
           "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}
TO_OLMO_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
                 "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
                 "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random (HF initialises norms to 1 and biases to 0), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _lm_tokenizer(dst: Path) -> None:
    """The Base fixture's tokenizer without the tokens the processors add (<IMG_CONTEXT> = 376 onwards): LLaDA's."""
    src = fixture_dir("base_tiny")
    tok = json.loads((src / "tokenizer.json").read_text())
    first = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<IMG_CONTEXT>")
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < first]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < first}
    config.pop("additional_special_tokens")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((src / "special_tokens_map.json").read_text())
    special.pop("additional_special_tokens")
    (dst / "special_tokens_map.json").write_text(json.dumps(special))


def write_components(root: Path) -> dict[str, Path]:
    """Component folders: LLaDA with Hugging Face names (sharded) and with original names (one file); SigLIP
    as SiglipModel and as SiglipVisionModel (the same vision weights)."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LM)).eval()
    _randomize(llama, 1)
    lm = root / "tiny-llada-hf"
    llama.save_pretrained(lm, max_shard_size="200KB")
    config = json.loads((lm / "config.json").read_text())
    for llama_only in ("head_dim", "mlp_bias"):
        config.pop(llama_only, None)
    config.update(model_type="llada", architectures=["LLaDAModelLM"], use_cache=False,
                  auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"})
    (lm / "config.json").write_text(json.dumps(config, indent=2))
    _lm_tokenizer(lm)

    olmo = root / "tiny-llada-original"
    olmo.mkdir()
    tensors = {}
    for shard in lm.glob("*.safetensors"):
        for name, array in load_file(shard).items():
            if name in TO_OLMO:
                tensors[TO_OLMO[name]] = array
            else:
                _, _, i, *module, _ = name.split(".")
                tensors[f"model.transformer.blocks.{i}.{TO_OLMO_LAYER['.'.join(module)]}.weight"] = array
    save_file(tensors, str(olmo / "model.safetensors"), metadata={"format": "pt"})
    (olmo / "config.json").write_text(json.dumps({
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_heads": 4, "n_kv_heads": 4,
        "n_layers": 3, "mlp_hidden_size": 128, "vocab_size": 402, "embedding_size": 402, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "weight_tying": False, "include_qkv_bias": False, "activation_type": "silu",
        "max_sequence_length": 4096, "mask_token_id": 372, "eos_token_id": 375, "init_std": 0.02}))
    _lm_tokenizer(olmo)

    siglip = transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)).eval()
    _randomize(siglip, 2)
    siglip.save_pretrained(root / "tiny-siglip")
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).eval()
    tower.vision_model.load_state_dict(siglip.vision_model.state_dict())
    tower.save_pretrained(root / "tiny-siglip-vision")
    return {"lm": lm, "olmo": olmo, "siglip": root / "tiny-siglip", "tower": root / "tiny-siglip-vision"}
