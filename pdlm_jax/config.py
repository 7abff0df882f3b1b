"""Model configuration: frozen dataclasses, reference-config import, our JSON, presets.

A `PDLMConfig` fully describes the architecture and the reference behaviour we reproduce
(SPEC §1, §3, §7, §14). Runtime choices (dtypes, mesh, sampler settings) live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from pdlm_jax.errors import PDLMError

CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision transformer (SPEC §1.3, §3.2)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27  # layers in the released tower; we only build those we use
    num_heads: int = 16
    image_size: int = 512  # tile side in pixels
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """LLaDA bidirectional LM in HF layout (SPEC §1.2, §4)."""

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Vision→LM projector (SPEC §3.5). Only `mlp2x_gelu` exists in the reference."""

    projection_type: str = "mlp2x_gelu"


@dataclasses.dataclass(frozen=True)
class RegionConfig:
    """Region-captioning geometry (SPEC §1.1, §3.1, §6, §7)."""

    prompt_numbers: int = 6  # rows of mask_id_embedding = max regions per pass
    roi_output_size: int = 4  # RoI-Align output is roi_output_size² tokens per region
    image_size: int = 512
    patch_size: int = 16
    mask_kernel_size: int = 16  # kernel_size[0]: the patch grid used for mask activity
    downsample_ratio: float = 0.5
    vision_select_layer: int = -2
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    image_token_id: int | None = None  # informational; ids are resolved by string from the tokenizer

    @property
    def num_image_tokens(self) -> int:
        """Tokens per tile after pixel shuffle (256 for the released model)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def feature_grid(self) -> int:
        """Side of the per-tile feature map after pixel shuffle (16 for the released model)."""
        return int((self.image_size // self.patch_size) * self.downsample_ratio)

    @property
    def roi_tokens(self) -> int:
        return self.roi_output_size**2


@dataclasses.dataclass(frozen=True)
class Quirks:
    """Reference behaviour that looks like a bug (SPEC §14), one named switch each.

    Defaults reproduce the reference, because the released weights were trained/evaluated with it.
    """

    # §14.1: boxes are converted to feature units and RoI-Align scales them by 1/stride again.
    roi_double_scaling: bool = True
    # §14.2: feature "stride" literal used for the RoI box conversion (inference: 16·2 = 32; training: 28).
    roi_inference_stride: int = 32
    roi_training_stride: int = 28
    # §14.3: the merged RoI map is built from tiles[1:] (tile 0 dropped, thumbnail included).
    roi_tile_shift: bool = True
    # §14.4: a non-negative vision_select_layer means "output of layer i" (list without embedding output).
    select_layer_skips_embeddings: bool = True
    # §14.13: RoPE inv_freq in float32 (inference). Training casts it to bf16.
    rope_inv_freq_float32: bool = True


@dataclasses.dataclass(frozen=True)
class PDLMConfig:
    vision: VisionConfig = VisionConfig()
    lm: LMConfig = LMConfig()
    projector: ProjectorConfig = ProjectorConfig()
    region: RegionConfig = RegionConfig()
    quirks: Quirks = Quirks()
    version: int = CONFIG_VERSION
    # "region": PerceptionDLM (region captioning); "base": PerceptionDLM-Base, the reference's DMLLM (image
    # question answering, SPEC-base): the same modules without the mask-id embedding and the RoI replay.
    variant: str = "region"

    @property
    def is_base(self) -> bool:
        return self.variant == "base"

    # ---- derived quantities -------------------------------------------------------------------

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers actually evaluated: the reference output list has no embedding entry (§3.3)."""
        n, sel = self.vision.num_layers, self.region.vision_select_layer
        if sel == -1:
            return n
        if sel < 0:
            return n + sel + 1
        return sel + 1 if self.quirks.select_layer_skips_embeddings else sel

    @property
    def uses_post_layernorm(self) -> bool:
        """Only vision_select_layer == -1 reads the post-layernormed last hidden state."""
        return self.region.vision_select_layer == -1

    @property
    def projector_input_size(self) -> int:
        return int(self.vision.hidden_size / (self.region.downsample_ratio**2))

    def validate(self) -> "PDLMConfig":
        v, lm, r = self.vision, self.lm, self.region
        problems = []
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if lm.hidden_size % lm.num_heads:
            problems.append(f"LM hidden_size {lm.hidden_size} not divisible by num_heads {lm.num_heads}")
        if lm.num_kv_heads != lm.num_heads:
            problems.append("grouped-query attention is not used by LLaDA (num_kv_heads must equal num_heads)")
        if v.image_size != r.image_size or v.patch_size != r.patch_size:
            problems.append("vision image/patch size must match the region settings")
        if v.image_size % v.patch_size:
            problems.append(f"image_size {v.image_size} not divisible by patch_size {v.patch_size}")
        if not 1 <= self.num_vision_layers_used <= v.num_layers:
            problems.append(f"vision_select_layer {r.vision_select_layer} out of range for {v.num_layers} layers")
        if self.projector.projection_type != "mlp2x_gelu":
            problems.append(f"unsupported projection_type {self.projector.projection_type!r} (only mlp2x_gelu)")
        if r.downsample_ratio != 0.5:
            problems.append("only downsample_ratio 0.5 (2x2 pixel shuffle) is implemented")
        if self.variant not in ("region", "base"):
            problems.append(f"unknown model variant {self.variant!r} (region or base)")
        if problems:
            raise PDLMError("invalid model config: " + "; ".join(problems))
        return self

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PDLMConfig":
        try:
            return cls(
                vision=VisionConfig(**d["vision"]),
                lm=LMConfig(**d["lm"]),
                projector=ProjectorConfig(**d["projector"]),
                region=RegionConfig(**d["region"]),
                quirks=Quirks(**d.get("quirks", {})),
                version=d.get("version", CONFIG_VERSION),
                variant=d.get("variant", "region"),
            ).validate()
        except (KeyError, TypeError) as e:
            raise PDLMError(f"malformed pdlm-jax config ({e}); regenerate it with pdlm-convert") from e

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PDLMConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PDLMError(f"cannot read config {path}: {e}") from e

    @classmethod
    def from_reference(cls, ref: dict[str, Any]) -> "PDLMConfig":
        """Build from a reference `config.json` (nested language_model_config / vision_model_config)."""
        try:
            lmc = ref["language_model_config"]
            vmc = ref["vision_model_config"]
            vmc = vmc.get("vision_config", vmc)  # a full SiglipConfig nests the vision part
            heads = lmc["num_attention_heads"]
            lm = LMConfig(
                vocab_size=lmc["vocab_size"],
                hidden_size=lmc["hidden_size"],
                intermediate_size=lmc["intermediate_size"],
                num_layers=lmc["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=lmc.get("num_key_value_heads") or heads,
                rope_theta=float(lmc.get("rope_theta", 500000.0)),
                rms_norm_eps=float(lmc.get("rms_norm_eps", 1e-5)),
            )
            if lmc.get("hidden_act", "silu") != "silu":
                raise PDLMError(f"unsupported LM hidden_act {lmc['hidden_act']!r} (LLaDA uses silu)")
            if lmc.get("rope_scaling"):
                raise PDLMError("rope_scaling is not supported (LLaDA uses none)")
            vision = VisionConfig(
                hidden_size=vmc["hidden_size"],
                intermediate_size=vmc["intermediate_size"],
                num_layers=vmc["num_hidden_layers"],
                num_heads=vmc["num_attention_heads"],
                image_size=vmc["image_size"],
                patch_size=vmc["patch_size"],
                num_channels=vmc.get("num_channels", 3),
                layer_norm_eps=float(vmc.get("layer_norm_eps", 1e-6)),
                hidden_act=vmc.get("hidden_act", "gelu_pytorch_tanh"),
            )
            roi = ref.get("roi_output_size") or 4
            region = RegionConfig(
                prompt_numbers=ref.get("prompt_numbers", 5),
                roi_output_size=int(roi[0] if isinstance(roi, (list, tuple)) else roi),
                image_size=ref.get("image_size", vision.image_size),
                patch_size=ref.get("patch_size", vision.patch_size),
                mask_kernel_size=int(ref.get("kernel_size", [vision.patch_size])[0]),
                downsample_ratio=float(ref.get("downsample_ratio", 0.5)),
                vision_select_layer=int(ref.get("vision_select_layer", -2)),
                image_token_id=ref.get("image_token_id"),
            )
            projector = ProjectorConfig(
                projection_type=(ref.get("vision_abstractor_config") or {}).get("projection_type", "mlp2x_gelu")
            )
        except KeyError as e:
            raise PDLMError(f"reference config.json is missing {e}; is this a PerceptionDLM checkpoint?") from e
        if is_dmllm(ref):
            # SPEC-base §B2: HF's hidden-state tuple (embeddings first) picks the vision layer.
            return cls(vision=vision, lm=lm, projector=projector, region=region, variant="base",
                       quirks=Quirks(select_layer_skips_embeddings=False)).validate()
        return cls(vision=vision, lm=lm, projector=projector, region=region).validate()

    @classmethod
    def from_reference_file(cls, path: str | Path) -> "PDLMConfig":
        try:
            return cls.from_reference(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PDLMError(f"cannot read reference config {path}: {e}") from e

    def replace(self, **sections: Any) -> "PDLMConfig":
        return dataclasses.replace(self, **sections)


def is_dmllm(ref: dict[str, Any]) -> bool:
    """A reference config.json of PerceptionDLM-Base (the reference's DMLLM, SPEC-base §B1)."""
    return ref.get("model_type") == "dmllm" or "DMLLM" in (ref.get("architectures") or [])


REMASKING = ("low_confidence",)  # the reference's other rule, "random" (SPEC §9.1), is not built


def check_remasking(value: Any, where: str = "remasking") -> None:
    """PDLMError unless `value` names a remasking rule our sampler implements."""
    if value not in REMASKING:
        raise PDLMError(f"{where}: remasking {value!r} is not supported; the sampler commits the most confident "
                        f"slots of each step: use {' or '.join(map(repr, REMASKING))}")


def __getattr__(name: str) -> Any:
    """`DTYPES`: the dtypes a model is stored or computed in, by their CLI / config names (jax and flax take
    numpy dtypes). Built on first use: importing ml_dtypes takes about a second, which reading a config (and
    every command's `--help`) should not pay."""
    if name != "DTYPES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import ml_dtypes

    globals()["DTYPES"] = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
    return globals()["DTYPES"]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Denoising settings (SPEC §9.1). Defaults follow the reference README (G = S = 32, greedy)."""

    gen_length: int = 32
    steps: int = 32
    temperature: float = 0.0
    top_p: float = 1.0  # the reference accepts and ignores top_p; we implement it (nucleus filtering)
    remasking: str = "low_confidence"  # which masked slots a step commits (REMASKING)
    # PerceptionDLM-Base's block sampler (SPEC-base §B5): answer positions per block; None = gen_length
    block_length: int | None = None

    def __post_init__(self):
        check_remasking(self.remasking)


def _tiny(image_size: int = 64, patch_size: int = 16, roi_output_size: int = 2) -> PDLMConfig:
    """The tiny test geometry of the reference fixtures (SigLIP 32/64/3/2, LLaDA 64/128/3/4, vocab 402)."""
    return PDLMConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                            image_size=image_size, patch_size=patch_size),
        lm=LMConfig(vocab_size=402, hidden_size=64, intermediate_size=128, num_layers=3,
                    num_heads=4, num_kv_heads=4),
        region=RegionConfig(prompt_numbers=6, roi_output_size=roi_output_size, image_size=image_size,
                            patch_size=patch_size, mask_kernel_size=patch_size),
    )


PRESETS: dict[str, PDLMConfig] = {
    "perceptiondlm-8b": PDLMConfig(),
    "tiny": _tiny(),
    "tiny-roi4": _tiny(roi_output_size=4),
    "tiny-wide": _tiny(image_size=128, patch_size=8, roi_output_size=4),
    "tiny-512": _tiny(image_size=512, patch_size=16, roi_output_size=4),
}


def preset(name: str) -> PDLMConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise PDLMError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
