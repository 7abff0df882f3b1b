"""Training configuration: a YAML file plus `key=value` command-line overrides -> frozen dataclasses.

Sections: `model` (architecture / initial weights / precision / freezing), `data` (train.data.DataConfig),
`optim` (AdamW + cosine schedule, SPEC §11.4 defaults), `run` (mesh, output, logging, checkpoints,
TensorBoard, profiling), `eval` (periodic held-out evaluation), `lora` (pdlm_jax.lora.LoraConfig: rank > 0
trains LoRA adapters only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from pdlm_jax.config import PDLMConfig, SamplerConfig, preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.lora import LoraConfig
from train.data import DataConfig

MODULE_GROUPS = ("vision", "mask_embed", "projector", "lm")  # top-level parameter groups (freezable)


VISION_POS_EMBED_INITS = ("random", "sincos")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    init_from: str | None = None  # pdlm-jax checkpoint directory (pdlm-convert output or an export)
    preset: str | None = None  # or a preset name (random init)...
    config: dict | None = None  # ...with these fields merged over it (PDLMConfig.to_dict layout)
    tokenizer: str | None = None  # directory with tokenizer.json; default: init_from
    dtype: str = "bfloat16"  # compute dtype; parameters (master weights) are float32
    remat: bool = True  # recompute each layer's activations in the backward pass
    # the LM's attention kernel: xla (ours), cudnn (GPU), splash (Pallas, TPU); pdlm_jax.ops.attention
    attention: str = "xla"
    freeze: tuple[str, ...] = ()  # subset of MODULE_GROUPS kept fixed (the reference trains all)
    # std of the random mask-id embedding (random init only); 1.0 = PyTorch's nn.Embedding, as the reference
    mask_embed_init_std: float = 1.0
    # one of VISION_POS_EMBED_INITS: "random" (flax default) or "sincos" (a 2-D sine-cosine start)
    vision_pos_embed_init: str = "random"
    sampler: dict | None = None  # SamplerConfig fields stored with exported checkpoints (pdlm-infer defaults)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 4e-5
    warmup_ratio: float = 0.03
    end_lr_ratio: float = 0.0  # cosine decays to lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1  # micro-batches of data.batch_size per update
    # diffusion time t ~ U[noise_t_min, 1) (SPEC §11.1: 0). Raising it drops the rare low-noise draws whose
    # 1/p loss weights make the gradient noisy; the loss stays an unbiased estimate of the answer CE.
    noise_t_min: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/train"
    mesh: str = "data:-1"  # e.g. "data:2,fsdp:2,tensor:2"; -1 = the remaining devices
    seed: int = 0  # noise and initialisation
    max_steps: int | None = None  # default: epochs of data
    log_every: int = 1
    save_every: int = 1000
    keep: int = 3
    async_save: bool = True
    export: bool = True  # write the final params as a pdlm-infer checkpoint (output_dir/export)
    compilation_cache: str | None = None
    tensorboard: bool = True  # TensorBoard event files in output_dir/tensorboard (next to log.jsonl)
    # [first, last]: a jax.profiler trace of steps first..last (1-based) into output_dir/profile
    profile_steps: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation on held-out data: the loss (any data) and, through the inference path, the
    exact-caption accuracy (a region counts when its caption equals the annotation, ignoring case and
    punctuation: the measure for the synthetic task)."""

    every: int = 0  # evaluate every N steps and after the last; 0 = never
    annotations: tuple[str, ...] = ()  # held-out annotation files (the training schema)
    synthetic_scenes: int = 0  # or: that many synthetic scenes from a seed training never uses
    batch_size: int = 4  # loss batches (samples that do not fill the last batch are left out)
    max_records: int = 32  # records captioned for the accuracy (the first ones); 0 = loss only
    gen_length: int | None = None  # caption slots per region; default: model.sampler, else 32
    steps: int | None = None  # denoising steps; default: model.sampler, else gen_length


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    lora: LoraConfig = LoraConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- derived ----------------------------------------------------------------------------

    def model_config(self) -> PDLMConfig:
        m = self.model
        if m.init_from:
            from pdlm_jax.checkpoint import load_config
            base = load_config(m.init_from)
        elif m.preset:
            base = preset(m.preset)
        elif m.config:
            base = PDLMConfig()
        else:
            raise PDLMError("model: set init_from (a pdlm-jax checkpoint), preset or config")
        if not m.config:
            return base
        return PDLMConfig.from_dict(_merge(base.to_dict(), m.config))

    def tokenizer_dir(self) -> str:
        path = self.model.tokenizer or self.model.init_from
        if not path:
            raise PDLMError("model.tokenizer: give the directory holding tokenizer.json")
        return path

    def sampler(self) -> SamplerConfig | None:
        return SamplerConfig(**self.model.sampler) if self.model.sampler else None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise PDLMError(f"config section {where!r}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(default, tuple) and isinstance(value, (str, int)):
            value = (value,)
        elif isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise PDLMError(f"{where}.{name} must be a number, got {value!r}") from None
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise PDLMError(f"{where}.{name} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise PDLMError(f"{where}.{name} must be an integer, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig, "eval": EvalConfig,
            "lora": LoraConfig}


def from_dict(d: dict) -> TrainConfig:
    if not isinstance(d, dict):
        raise PDLMError("the training config must be a YAML mapping with sections " + ", ".join(SECTIONS))
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise PDLMError(f"unknown config sections {sorted(unknown)}; use {sorted(SECTIONS)}")
    cfg = TrainConfig(**{name: _build(cls, d.get(name) or {}, name) for name, cls in SECTIONS.items()})
    bad = set(cfg.model.freeze) - set(MODULE_GROUPS)
    if bad:
        raise PDLMError(f"model.freeze: unknown modules {sorted(bad)}; choose from {MODULE_GROUPS}")
    if cfg.optim.grad_accum < 1 or cfg.data.batch_size < 1:
        raise PDLMError("optim.grad_accum and data.batch_size must be at least 1")
    if cfg.model.dtype not in ("bfloat16", "float32"):
        raise PDLMError(f"model.dtype must be bfloat16 or float32, got {cfg.model.dtype!r}")
    if cfg.model.attention not in ("xla", "cudnn", "splash"):
        raise PDLMError(f"model.attention must be xla, cudnn or splash, got {cfg.model.attention!r}")
    if cfg.model.vision_pos_embed_init not in VISION_POS_EMBED_INITS:
        raise PDLMError(f"model.vision_pos_embed_init must be one of {VISION_POS_EMBED_INITS}, not "
                        f"{cfg.model.vision_pos_embed_init!r}")
    if not 0.0 <= cfg.data.synthetic_rotated <= 1.0:
        raise PDLMError(f"data.synthetic_rotated is a fraction in [0, 1], got {cfg.data.synthetic_rotated}")
    if not 0.0 <= cfg.optim.noise_t_min < 1.0:
        raise PDLMError(f"optim.noise_t_min must be in [0, 1), got {cfg.optim.noise_t_min}")
    _check_run_data_eval(cfg)
    cfg.lora.check()
    if cfg.lora.enabled and cfg.model.freeze:
        raise PDLMError("model.freeze has no effect with LoRA (lora.rank > 0 trains only the adapters); remove it")
    return cfg


def _check_run_data_eval(cfg: TrainConfig) -> None:
    from train.data import BAD_RECORD_POLICIES

    if cfg.data.on_bad_record not in BAD_RECORD_POLICIES:
        raise PDLMError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, not {cfg.data.on_bad_record!r}")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0 for w in cfg.data.weights):
        raise PDLMError(f"data.weights must be positive numbers, got {list(cfg.data.weights)}")
    if cfg.data.loop and not cfg.run.max_steps:
        raise PDLMError("data.loop repeats the data until run.max_steps: set run.max_steps")
    p = cfg.run.profile_steps
    if p and (len(p) != 2 or not all(isinstance(v, int) for v in p) or not 1 <= p[0] <= p[1]):
        raise PDLMError(f"run.profile_steps must be [first, last] with 1 <= first <= last, got {list(p)}")
    if cfg.eval.every < 0 or (cfg.eval.every and bool(cfg.eval.annotations) == (cfg.eval.synthetic_scenes > 0)):
        raise PDLMError("eval.every > 0 needs held-out data: eval.annotations or (not both) eval.synthetic_scenes")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value parsed as YAML; nested keys with more dots) applied to a dict."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise PDLMError(f"override {item!r}: expected section.key=value, e.g. optim.lr=1e-4")
        value = yaml.safe_load(raw)
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise PDLMError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return d


CONFIG_FILE = "config.yaml"  # the resolved config of a run, in run.output_dir (JSON, which YAML reads)


def read_saved(run_dir: str | Path) -> dict | None:
    """The resolved config a run saved in its output directory (None if there is none)."""
    from pdlm_jax.files import as_path

    path = as_path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PDLMError(f"cannot read {path}: {e}; remove it or use a new run.output_dir") from e


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    d: Any = {}
    if path is not None:
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise PDLMError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise PDLMError(f"config file {path} is not valid YAML: {e}") from e
    return from_dict(apply_overrides(d, list(overrides)))
