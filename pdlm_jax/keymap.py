"""Declarative map between reference (PyTorch) tensor names and our parameter tree.

Our parameter tree is a nested dict addressed by '/'-joined paths (the `nnx.State` of
`pdlm_jax.modeling.pdm.PerceptionDLM`; its paths and shapes come from the model, `expected_shapes`); this
module holds only the name rules. Per-layer reference tensors are stacked along a leading
layer axis (layers are scanned). PyTorch Linear weights (out, in) become kernels (in, out); Conv2d
weights (O, I, kH, kW) become HWIO kernels. Everything in the released checkpoint is either mapped
or explicitly ignored (SPEC §2.4).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from pdlm_jax.config import PDLMConfig
from pdlm_jax.modeling.layout import param_layout

LM = r"language_model\.model\."
VIT = r"vision_model\.vision_model\."
LAYER = r"(?P<layer>\d+)"


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # full-match regex over the reference name; group `layer` marks a stacked index
    target: str  # path in our tree
    transform: str = "none"  # "none" | "linear" (transpose) | "conv" (OIHW -> HWIO)
    variants: tuple[str, ...] = ("region", "base")  # model variants (PDLMConfig.variant) that have this tensor

    @property
    def stacked(self) -> bool:
        return "(?P<layer>" in self.pattern


RULES: tuple[Rule, ...] = (
    # LLaDA (SPEC §2.1)
    Rule(LM + r"embed_tokens\.weight", "lm/embed/embedding"),
    Rule(LM + rf"layers\.{LAYER}\.input_layernorm\.weight", "lm/layers/input_norm/scale"),
    Rule(LM + rf"layers\.{LAYER}\.self_attn\.q_proj\.weight", "lm/layers/attn/q/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.self_attn\.k_proj\.weight", "lm/layers/attn/k/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.self_attn\.v_proj\.weight", "lm/layers/attn/v/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.self_attn\.o_proj\.weight", "lm/layers/attn/o/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.post_attention_layernorm\.weight", "lm/layers/post_norm/scale"),
    Rule(LM + rf"layers\.{LAYER}\.mlp\.gate_proj\.weight", "lm/layers/mlp/gate/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.mlp\.up_proj\.weight", "lm/layers/mlp/up/kernel", "linear"),
    Rule(LM + rf"layers\.{LAYER}\.mlp\.down_proj\.weight", "lm/layers/mlp/down/kernel", "linear"),
    Rule(LM + r"norm\.weight", "lm/final_norm/scale"),
    Rule(r"language_model\.lm_head\.weight", "lm/lm_head/kernel", "linear"),
    # SigLIP vision transformer (SPEC §2.2)
    Rule(VIT + r"embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", "conv"),
    Rule(VIT + r"embeddings\.patch_embedding\.bias", "vision/patch_embed/bias"),
    Rule(VIT + r"embeddings\.position_embedding\.weight", "vision/pos_embed/embedding"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.layer_norm1\.weight", "vision/layers/ln1/scale"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.layer_norm1\.bias", "vision/layers/ln1/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.layer_norm2\.weight", "vision/layers/ln2/scale"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.layer_norm2\.bias", "vision/layers/ln2/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.q_proj\.weight", "vision/layers/attn/q/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.q_proj\.bias", "vision/layers/attn/q/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.k_proj\.weight", "vision/layers/attn/k/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.k_proj\.bias", "vision/layers/attn/k/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.v_proj\.weight", "vision/layers/attn/v/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.v_proj\.bias", "vision/layers/attn/v/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.out_proj\.weight", "vision/layers/attn/o/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.self_attn\.out_proj\.bias", "vision/layers/attn/o/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.mlp\.fc1\.weight", "vision/layers/mlp/fc1/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.mlp\.fc1\.bias", "vision/layers/mlp/fc1/bias"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.mlp\.fc2\.weight", "vision/layers/mlp/fc2/kernel", "linear"),
    Rule(VIT + rf"encoder\.layers\.{LAYER}\.mlp\.fc2\.bias", "vision/layers/mlp/fc2/bias"),
    Rule(VIT + r"post_layernorm\.weight", "vision/post_ln/scale"),
    Rule(VIT + r"post_layernorm\.bias", "vision/post_ln/bias"),
    # Projector and mask-id embedding (SPEC §2.3)
    Rule(r"vision_abstractor\.projection\.0\.weight", "projector/fc1/kernel", "linear"),
    Rule(r"vision_abstractor\.projection\.0\.bias", "projector/fc1/bias"),
    Rule(r"vision_abstractor\.projection\.2\.weight", "projector/fc2/kernel", "linear"),
    Rule(r"vision_abstractor\.projection\.2\.bias", "projector/fc2/bias"),
    Rule(r"mask_id_embedding\.weight", "mask_embed/embedding", variants=("region",)),
)

# Present in the released file, never used by region captioning (SPEC §2.4).
IGNORED: tuple[str, ...] = (
    r"vision_model\.text_model\..*",
    r"vision_model\.logit_scale",
    r"vision_model\.logit_bias",
    VIT + r"head\..*",
)


# Components composed into a Base checkpoint (`pdlm-convert --compose`, SPEC-train-base T3.2): each tensor's
# reference name from its name in the component's own checkpoint, as (pattern, replacement) pairs tried in
# order. LLaDA comes with Hugging Face names (LLaDA-8B-Instruct-HF, the output of the reference's
# scripts/convert.py) or with the original OLMo-style names, renamed as that script does (SPEC §12); SigLIP as
# a SiglipModel (text tower and logit scalars too, then ignored) or a SiglipVisionModel.
_OLMO_BLOCK = r"model\.transformer\.blocks\.(\d+)\."
_HF_LAYER = r"language_model.model.layers.\1."
COMPONENT_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "lm": (
        (r"model\.transformer\.wte\.weight", "language_model.model.embed_tokens.weight"),
        (r"model\.transformer\.ln_f\.weight", "language_model.model.norm.weight"),
        (r"model\.transformer\.ff_out\.weight", "language_model.lm_head.weight"),
        (_OLMO_BLOCK + r"attn_norm\.weight", _HF_LAYER + "input_layernorm.weight"),
        (_OLMO_BLOCK + r"ff_norm\.weight", _HF_LAYER + "post_attention_layernorm.weight"),
        (_OLMO_BLOCK + r"(q_proj|k_proj|v_proj)\.weight", _HF_LAYER + r"self_attn.\2.weight"),
        (_OLMO_BLOCK + r"attn_out\.weight", _HF_LAYER + "self_attn.o_proj.weight"),
        (_OLMO_BLOCK + r"ff_proj\.weight", _HF_LAYER + "mlp.gate_proj.weight"),
        (_OLMO_BLOCK + r"up_proj\.weight", _HF_LAYER + "mlp.up_proj.weight"),
        (_OLMO_BLOCK + r"ff_out\.weight", _HF_LAYER + "mlp.down_proj.weight"),
        (r"(model\.(?!transformer\.).+|lm_head\.weight)", r"language_model.\1"),
    ),
    "vision": ((r"(vision_model\..+|text_model\..+|logit_scale|logit_bias)", r"vision_model.\1"),),
}
_COMPONENT_COMPILED = {c: tuple((re.compile(p), r) for p, r in rules) for c, rules in COMPONENT_RULES.items()}


def component_reference_name(component: str, name: str) -> str | None:
    """The reference name of tensor `name` of a "lm" or "vision" component checkpoint; None if unknown."""
    for rx, replacement in _COMPONENT_COMPILED[component]:
        if m := rx.fullmatch(name):
            return m.expand(replacement)
    return None


def expected_shapes(cfg: PDLMConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf of our parameter tree for `cfg` (the contract between model and converter), read
    from the model (`pdlm_jax.modeling.param_layout`)."""
    return {path: info.shape for path, info in param_layout(cfg).items()}


def num_layers_for(cfg: PDLMConfig, target: str) -> int:
    return cfg.num_vision_layers_used if target.startswith("vision/") else cfg.lm.num_layers


@dataclasses.dataclass(frozen=True)
class Match:
    """Where one reference tensor goes: `target` (and `layer` for stacked leaves), or nowhere."""

    name: str
    target: str | None  # None: ignored
    layer: int | None = None
    transform: str = "none"
    reason: str = ""  # why it is ignored


_COMPILED = tuple((re.compile(r.pattern), r) for r in RULES)
_IGNORED = tuple(re.compile(p) for p in IGNORED)


def match(cfg: PDLMConfig, name: str) -> Match | None:
    """Map one reference tensor name; None if the name is unknown (an unexpected tensor)."""
    for rx, rule in _COMPILED:
        m = rx.fullmatch(name)
        if not m:
            continue
        if cfg.variant not in rule.variants:
            return None
        layer = int(m.group("layer")) if rule.stacked else None
        if rule.target.startswith("vision/post_ln/") and not cfg.uses_post_layernorm:
            return Match(name, None, reason="post_layernorm unused (vision_select_layer != -1)")
        if layer is not None and rule.target.startswith("vision/") and layer >= cfg.num_vision_layers_used:
            if layer >= cfg.vision.num_layers:
                return None
            return Match(name, None, reason=f"vision layer {layer} is after vision_select_layer")
        if layer is not None and rule.target.startswith("lm/") and layer >= cfg.lm.num_layers:
            return None
        return Match(name, rule.target, layer, rule.transform)
    if any(rx.fullmatch(name) for rx in _IGNORED):
        return Match(name, None, reason="not used by region captioning (SPEC §2.4)")
    return None


def to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    """Reference layout -> our layout (a view where possible; no copy for 'none')."""
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def to_reference(array: np.ndarray, transform: str) -> np.ndarray:
    """Our layout -> reference layout (inverse of `to_ours`)."""
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def reference_names(cfg: PDLMConfig) -> dict[str, tuple[str, int | None, str]]:
    """Reference name for every (target, layer) we hold: {name: (target, layer, transform)}.

    Used by export (our tree -> reference safetensors) and by coverage checks.
    """
    out: dict[str, tuple[str, int | None, str]] = {}
    shapes = expected_shapes(cfg)
    for rule in RULES:
        if rule.target not in shapes:
            continue
        layers = range(num_layers_for(cfg, rule.target)) if rule.stacked else [None]
        for layer in layers:
            name = rule.pattern.replace(LAYER, str(layer)) if layer is not None else rule.pattern
            out[name.replace("\\.", ".")] = (rule.target, layer, rule.transform)
    return out
