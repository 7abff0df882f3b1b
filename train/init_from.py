"""Where a run's weights and tokenizer come from: `model.init_from` (a checkpoint of the same kind, or a
PerceptionDLM-Base checkpoint for the region model) or a random initialisation.

The region model from Base is the reference's PerceptionDLM initialisation (SPEC-train-base T7): every Base
tensor is copied under its own name, the only new tensor is the mask-id embedding, drawn from N(0, 1)
(model.mask_embed_init_std), and the tokenizer is Base's with `<|Mask_Cap_0..15|>`, `<Prompt0..5>` and
`<NO_Prompt>` added after its last id where it lacks them. The vocabulary stays the checkpoint's: the new
tokens use Base's existing (padding) rows of the embedding and lm_head, as the reference's.
"""

from __future__ import annotations

import jax
import numpy as np

from pdlm_jax import checkpoint as pdlm_ckpt
from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path, atomic_write
from pdlm_jax.modeling.layout import model_shardings
from pdlm_jax.regions.tokenizer import REGION_TOKENS, extended_tokenizer

TOKENIZER_DIR = "tokenizer"  # under run.output_dir: the extended tokenizer of a region model from Base
NEW_FROM_BASE = ("mask_embed/embedding",)  # the tensors a region model has and a Base checkpoint lacks


def from_base(cfg, model_cfg: PDLMConfig) -> bool:
    """True when a region model starts from a PerceptionDLM-Base checkpoint."""
    return bool(cfg.model.init_from) and not model_cfg.is_base and pdlm_ckpt.load_config(cfg.model.init_from).is_base


def initial_params(cfg, model_cfg: PDLMConfig, mesh) -> dict:
    """float32 params of `model_cfg` in their shardings: restored from model.init_from (every tensor, plus a new
    mask-id embedding when a region model starts from Base), else randomly initialised."""
    from train import step as step_lib

    m = cfg.model
    if not m.init_from:
        return step_lib.init_params(model_cfg, cfg.run.seed, mesh, m.mask_embed_init_std, m.vision_pos_embed_init)
    shapes = keymap.expected_shapes(model_cfg)
    new = set(NEW_FROM_BASE) if from_base(cfg, model_cfg) else set()
    stored = pdlm_ckpt.params_metadata(m.init_from)
    missing, unexpected = sorted(shapes.keys() - stored.keys() - new), sorted(stored.keys() - shapes.keys())
    wrong = sorted(p for p in stored.keys() & shapes.keys() if tuple(stored[p][0]) != tuple(shapes[p]))
    if missing or unexpected or wrong:
        raise PDLMError(f"model.init_from {m.init_from} does not fit the model (missing {missing}, unexpected "
                        f"{unexpected}, other shapes {wrong}); model.config must not change the architecture")
    shardings = model_shardings(model_cfg, mesh)
    _, params = pdlm_ckpt.restore_params(m.init_from, dtype=np.float32, shardings=shardings)
    if new:
        table = step_lib.new_mask_embedding(model_cfg, cfg.run.seed, m.mask_embed_init_std)
        params["mask_embed"] = {"embedding": jax.device_put(table, shardings["mask_embed"]["embedding"])}
    return params


def training_tokenizer(cfg, model_cfg: PDLMConfig, run_dir) -> str:
    """The tokenizer directory a run trains and exports with: model.tokenizer or init_from's; for a region model
    from a Base checkpoint, Base's with the region tokens it lacks added (written to run_dir/tokenizer)."""
    src = cfg.tokenizer_dir()
    if not from_base(cfg, model_cfg):
        return src
    text, added = extended_tokenizer(src, REGION_TOKENS)
    if not added:
        return src
    out = as_path(run_dir) / TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)  # every process writes the same files (atomically): none waits
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (as_path(src) / name).exists():
            atomic_write(out / name, (as_path(src) / name).read_text())
    atomic_write(out / "tokenizer.json", text)
    return str(out)
