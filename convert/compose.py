"""`pdlm-convert --compose`: a PerceptionDLM-Base starting checkpoint from its components (SPEC-train-base T3).

    pdlm-convert --compose --lm LLaDA_DIR --vision SIGLIP_DIR --dst OUT

- `--lm`: LLaDA as a Hugging Face checkpoint (`config.json` of `model_type "llada"`, safetensors, tokenizer
  files), with the names of `LLaDA-8B-Instruct-HF` / the reference's `scripts/convert.py` (`model.*`,
  `lm_head.weight`) or LLaDA's original OLMo-style names (`model.transformer.*`); `keymap.COMPONENT_RULES`.
- `--vision`: a SigLIP / SigLIP2 `SiglipModel` or `SiglipVisionModel` checkpoint (`config.json` +
  safetensors); the text tower is dropped (or kept raw with --keep-unused).
- The projector is new: PyTorch's default `nn.Linear` initialisation, weight and bias ~ U(±1/√fan_in) (T3.2),
  drawn from numpy's PCG64 with `--seed`.
- The tokenizer is the LM's plus `<IMG_CONTEXT>`, `<img>`, `</img>` as added special tokens, as the
  reference's processor adds them; the embeddings are not resized (T0.4, T3.3): the new ids use LLaDA's
  spare rows, and a tokenizer that outgrows the LM's vocabulary is refused.
- `sampler.json` holds the Base demo's generation defaults; `reference_config.json` the reference's DMLLM
  config.json, so `--to-safetensors` writes the reference's DMLLM layout.

Everything is read from headers and config files and checked before the output is created; the weights are
then streamed one leaf at a time by the converter's writer (`convert.writer.write`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from convert.reader import ReferenceCheckpoint, map_tensors, read_weights
from convert.writer import Summary, write
from pdlm_jax import checkpoint, keymap
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import BASE_DEFAULTS, STORED
from pdlm_jax.files import HUB_PREFIX, is_url, local_directory

IMAGE_TOKENS = ("<IMG_CONTEXT>", "<img>", "</img>")  # DMLLMProcessor's special tokens (SPEC-base §B1)
NEEDED_TOKENS = ("<|mdm_mask|>", "<|eot_id|>")  # LLaDA's, used by the Base prompt and sampler
PROJECTOR_PREFIX = "projector/"

# DMLLMConfig's defaults the reference trains Base with (SPEC-train-base T2; configuration_dmllm.py).
DOWNSAMPLE_RATIO = 0.5
VISION_SELECT_LAYER = -2

# LLaDA's Hugging Face config from its original one: field names (HF <- original) and the values of fields
# the original lacks, as the reference's scripts/convert.py maps them (SPEC §1.2, §12).
LLADA_HF_FROM_ORIGINAL = {
    "attention_bias": "include_qkv_bias", "attention_dropout": "attention_dropout",
    "eos_token_id": "eos_token_id", "hidden_act": "activation_type", "hidden_size": "d_model",
    "initializer_range": "init_std", "intermediate_size": "mlp_hidden_size",
    "max_position_embeddings": "max_sequence_length", "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers", "num_key_value_heads": "n_kv_heads", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "tie_word_embeddings": "weight_tying", "use_cache": "use_cache",
    "vocab_size": "vocab_size",
}
LLADA_HF_DEFAULTS = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 126081,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 16384, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "use_cache": False, "vocab_size": 126464,
}
# transformers' SiglipVisionConfig defaults: save_pretrained omits fields left at them.
SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
}


def _read_config(directory: Path, flag: str) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PDLMError(f"{flag} {directory} has no config.json; give the folder the model was saved in (its "
                        "config.json next to its safetensors)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PDLMError(f"{flag}: cannot read {path} ({e}); re-download it") from e


def llada_hf_config(lm: dict, where: Path, name: str) -> dict:
    """The Hugging Face form of a LLaDA config.json (either form), with every field the model needs; `name` is
    its `_name_or_path` unless it has one (the reference's DMLLM accepts an LM whose name contains "llada")."""
    if lm.get("model_type") != "llada":
        raise PDLMError(f"--lm {where}: model_type is {lm.get('model_type')!r}, not 'llada'; --compose takes a "
                        "LLaDA checkpoint (e.g. hf://GSAI-ML/LLaDA-8B-Instruct or MSALab/LLaDA-8B-Instruct-HF)")
    if "d_model" in lm:  # the original (OLMo-style) config
        hf = {key: lm[original] for key, original in LLADA_HF_FROM_ORIGINAL.items()
              if lm.get(original) is not None}
        hf = {**LLADA_HF_DEFAULTS, **hf}
    else:
        hf = {**LLADA_HF_DEFAULTS, **lm}
    if hf["tie_word_embeddings"]:
        raise PDLMError(f"--lm {where}: the LM ties its input and output embeddings; PerceptionDLM-Base needs "
                        "LLaDA's separate lm_head (tie_word_embeddings / weight_tying false)")
    hf.setdefault("_name_or_path", name)
    return hf


def vision_config(vision: dict, where: Path) -> dict:
    """The SigLIP config.json with every vision field the model needs filled in (SiglipModel: in its
    `vision_config`)."""
    kind = vision.get("model_type")
    if kind == "siglip":
        return {**vision, "vision_config": {**SIGLIP_VISION_DEFAULTS, **vision.get("vision_config", {})}}
    if kind == "siglip_vision_model":
        return {**SIGLIP_VISION_DEFAULTS, **vision}
    raise PDLMError(f"--vision {where}: model_type is {kind!r}; --compose takes a SigLIP or SigLIP2 checkpoint "
                    "(SiglipModel, model_type 'siglip', or SiglipVisionModel, 'siglip_vision_model')")


def dmllm_config(lm: dict, vision: dict, image_token_id: int) -> dict:
    """The config.json the reference's DMLLM would save for these components (SPEC-base §B1)."""
    v = vision.get("vision_config", vision)
    return {
        "architectures": ["DMLLM"],
        "model_type": "dmllm",
        "auto_map": {"AutoConfig": "configuration_dmllm.DMLLMConfig", "AutoModel": "modeling_dmllm.DMLLM",
                     "AutoModelForCausalLM": "modeling_dmllm.DMLLM"},
        "language_model_config": lm,
        "vision_model_config": vision,
        "vision_abstractor_config": {"projection_type": "mlp2x_gelu"},
        "image_token_id": image_token_id,
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "num_image_token": int((v["image_size"] // v["patch_size"]) ** 2 * DOWNSAMPLE_RATIO**2),
        "vision_select_layer": VISION_SELECT_LAYER,
        "replacement_noise_mode": False,
    }


def image_tokenizer(lm_dir: Path, vocab_size: int) -> tuple[dict[str, bytes], int]:
    """(files, id of <IMG_CONTEXT>): the LM's tokenizer files with the image tokens added as special tokens, as
    the reference's `tokenizer.add_special_tokens({'additional_special_tokens': [...]})` saves them
    (SPEC-train-base T0.4)."""
    from tokenizers import AddedToken, Tokenizer

    path = lm_dir / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on missing/malformed files
        raise PDLMError(f"--lm {lm_dir}: cannot load {path} ({e}); the LM folder needs LLaDA's tokenizer files") \
            from e
    missing = [t for t in NEEDED_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise PDLMError(f"--lm {path} lacks {', '.join(missing)}: PerceptionDLM-Base needs LLaDA's tokenizer")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise PDLMError(f"--lm {path}: with {', '.join(IMAGE_TOKENS)} the tokenizer has {size} tokens but the LM "
                        f"has {vocab_size} embedding rows; the image tokens must use LLaDA's spare rows (no resize, "
                        "SPEC-train-base T3.3): use LLaDA's tokenizer")
    files = {"tokenizer.json": tok.to_str(pretty=True).encode()}
    ids = {t: tok.token_to_id(t) for t in IMAGE_TOKENS}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if (lm_dir / "tokenizer_config.json").exists():
        cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
        decoder = cfg.setdefault("added_tokens_decoder", {})
        for t, i in ids.items():
            decoder.setdefault(str(i), {"content": t, **entry, "special": True})
        extra = cfg.get("additional_special_tokens") or []
        cfg["additional_special_tokens"] = extra + [t for t in IMAGE_TOKENS if t not in extra]
        files["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()
    special = (json.loads((lm_dir / "special_tokens_map.json").read_text())
               if (lm_dir / "special_tokens_map.json").exists() else {})
    extra = special.get("additional_special_tokens") or []
    present = {e["content"] if isinstance(e, dict) else e for e in extra}
    special["additional_special_tokens"] = extra + [{"content": t, **entry} for t in IMAGE_TOKENS
                                                    if t not in present]
    files["special_tokens_map.json"] = (json.dumps(special, indent=2, ensure_ascii=False) + "\n").encode()
    return files, ids[IMAGE_TOKENS[0]]


def init_projector(cfg: PDLMConfig, seed: int) -> dict[str, np.ndarray]:
    """The projector as PyTorch's `nn.Linear` initialises it: weight and bias ~ U(-b, b), b = 1/√fan_in
    (SPEC-train-base T3.2, T8.13), float32, from numpy's PCG64 seeded with `seed`. Kernels are (in, out)."""
    rng = np.random.default_rng(seed)
    shapes = {p: s for p, s in keymap.expected_shapes(cfg).items() if p.startswith(PROJECTOR_PREFIX)}
    out = {}
    for layer in ("fc1", "fc2"):
        kernel = shapes[f"{PROJECTOR_PREFIX}{layer}/kernel"]
        bound = 1.0 / np.sqrt(kernel[0])
        out[f"{PROJECTOR_PREFIX}{layer}/kernel"] = rng.uniform(-bound, bound, kernel).astype(np.float32)
        out[f"{PROJECTOR_PREFIX}{layer}/bias"] = rng.uniform(-bound, bound, kernel[1]).astype(np.float32)
    return out


def _component(directory: Path, component: str, flag: str, cfg: PDLMConfig) -> tuple[dict, dict, tuple]:
    """(mapped, ignored, files) of one component, by reference name, checked against `cfg`."""
    tensors, files = read_weights(directory, f"{flag} at a folder saved with save_pretrained")
    renamed, unknown = {}, []
    for name, info in tensors.items():
        reference = keymap.component_reference_name(component, name)
        if reference is None:
            unknown.append(name)
        else:
            renamed[reference] = info
    if unknown:
        raise PDLMError(f"{flag} {directory}: unexpected tensor(s) {', '.join(sorted(unknown)[:5])} (e.g. in "
                        f"{tensors[unknown[0]].file}); expected a "
                        + ("LLaDA checkpoint (model.* and lm_head.weight, or model.transformer.*)" if component == "lm"
                           else "SigLIP SiglipModel or SiglipVisionModel checkpoint"))
    prefix = "language_model." if component == "lm" else "vision_model."
    expected = [n for n in keymap.reference_names(cfg) if n.startswith(prefix)]
    mapped, ignored = map_tensors(cfg, renamed, expected, directory, directory / "config.json")
    return mapped, ignored, files


def compose(
    lm: str | Path,
    vision: str | Path,
    dst: str | Path,
    *,
    dtype: str = "auto",
    force: bool = False,
    keep_unused: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> Summary:
    """Write a PerceptionDLM-Base checkpoint `dst` composed of LLaDA `lm`, SigLIP `vision` and a new projector.

    `lm` / `vision`: local folders, bucket URLs or `hf://ORG/NAME[@REVISION]` ids (`pdlm_jax.files`); `dst`: a
    folder or a bucket URL.
    """
    # Configs and tokenizers first (from a Hub id: its small JSON files), so that a wrong id or component is an
    # error before gigabytes of weights download.
    lm_meta, vision_meta = local_directory(lm, "--lm", ("*.json",)), local_directory(vision, "--vision", ("*.json",))
    lm_name = os.fspath(lm).removeprefix(HUB_PREFIX).split("@")[0] if os.fspath(lm).startswith(HUB_PREFIX) \
        else Path(os.fspath(lm).rstrip("/")).name  # hf://ORG/NAME: ORG/NAME, as from_pretrained names it
    lm_config = llada_hf_config(_read_config(lm_meta, "--lm"), lm_meta, lm_name)
    siglip_config = vision_config(_read_config(vision_meta, "--vision"), vision_meta)
    tokenizer_files, image_token_id = image_tokenizer(lm_meta, lm_config["vocab_size"])
    reference_config = dmllm_config(lm_config, siglip_config, image_token_id)
    cfg = PDLMConfig.from_reference(reference_config)

    lm_dir, vision_dir = local_directory(lm, "--lm"), local_directory(vision, "--vision")
    if not is_url(dst):
        dst = Path(dst).resolve()
        for flag, src in (("--lm", lm_dir), ("--vision", vision_dir)):
            if src.resolve() == dst or src.resolve() in dst.parents:
                raise PDLMError(f"--dst {dst} must not be (inside) the {flag} directory {src}")
    lm_mapped, lm_ignored, lm_files = _component(lm_dir, "lm", "--lm", cfg)
    vision_mapped, vision_ignored, vision_files = _component(vision_dir, "vision", "--vision", cfg)
    ref = ReferenceCheckpoint(lm_dir, cfg, reference_config, (*lm_files, *vision_files),
                              {**lm_mapped, **vision_mapped}, {**lm_ignored, **vision_ignored})
    projector = init_projector(cfg, seed)
    uncovered = set(keymap.expected_shapes(cfg)) - set(ref.leaf_sources()) - set(projector)
    if uncovered:  # the Base layout has changed under us: say so rather than write a partial model
        raise PDLMError(f"internal: no component provides {sorted(uncovered)}")

    side_files = {**tokenizer_files,
                  checkpoint.REFERENCE_CONFIG_FILE: (json.dumps(reference_config, indent=2) + "\n").encode(),
                  checkpoint.SAMPLER_FILE: (json.dumps({k: getattr(BASE_DEFAULTS, k) for k in STORED}, indent=2)
                                            + "\n").encode()}
    if (vision_dir / "preprocessor_config.json").exists():  # SigLIP's image processor settings
        side_files["preprocessor_config.json"] = (vision_dir / "preprocessor_config.json").read_bytes()
    sources = [lm_dir / "config.json", vision_dir / "config.json", *ref.files,
               *(lm_dir / name for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                 if (lm_dir / name).exists())]
    provenance = {"composed": {"lm": str(lm), "vision": str(vision), "lm_dir": str(lm_dir),
                               "vision_dir": str(vision_dir),
                               "projector_init": {"distribution": "uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))",
                                                  "rng": "numpy PCG64", "seed": seed}}}
    return write(ref, dst, dtype=dtype, force=force, keep_unused=keep_unused, log=log, side_files=side_files,
                 sources=sources, provenance=provenance, initialised=projector)
