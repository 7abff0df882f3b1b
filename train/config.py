"""Training configuration: a YAML file plus `key=value` command-line overrides -> frozen dataclasses.

Sections: `model` (architecture / initial weights / precision / freezing), `data` (DataConfig),
`optim` (AdamW + cosine schedule, SPEC §11.4 defaults), `run` (mesh, output, logging, checkpoints,
TensorBoard, profiling), `eval` (periodic held-out evaluation), `lora` (pdlm_jax.lora.LoraConfig: rank > 0
trains LoRA adapters only).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from pdlm_jax.config import PDLMConfig, Quirks, RegionConfig, SamplerConfig, preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path
from pdlm_jax.lora import LoraConfig
from pdlm_jax.regions.prompt import DEFAULT_QUESTION

SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
MODULE_GROUPS = ("vision", "mask_embed", "projector", "lm")  # top-level parameter groups (freezable)


VISION_POS_EMBED_INITS = ("random", "sincos")
MODEL_KINDS = ("region", "base")  # PerceptionDLM (region captioning) or PerceptionDLM-Base (questions)
BAD_RECORD_POLICIES = ("error", "skip")  # data.on_bad_record


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    init_from: str | None = None  # pdlm-jax checkpoint directory (pdlm-convert output or an export)
    # one of MODEL_KINDS; default: init_from's kind (else region). "region" from a Base checkpoint is the
    # reference's PerceptionDLM initialisation (SPEC-train-base T7): every Base tensor plus a new mask-id embedding
    kind: str | None = None
    preset: str | None = None  # or a preset name (random init)...
    config: dict | None = None  # ...with these fields merged over it (PDLMConfig.to_dict layout)
    tokenizer: str | None = None  # directory with tokenizer.json; default: init_from
    dtype: str = "bfloat16"  # compute dtype; parameters (master weights) are float32
    remat: bool = True  # recompute each layer's activations in the backward pass
    # the LM's attention kernel: xla (ours), cudnn (GPU), splash (Pallas, TPU); pdlm_jax.ops.attention
    attention: str = "xla"
    # subset of MODULE_GROUPS kept fixed, held in model.dtype with no optimizer state (the region model trains
    # all; the Base stages freeze the vision tower, stage 1 the LM too)
    freeze: tuple[str, ...] = ()
    # std of a new mask-id embedding (random init, or a region model from Base); 1.0 = nn.Embedding, as the reference
    mask_embed_init_std: float = 1.0
    # one of VISION_POS_EMBED_INITS: "random" (flax default) or "sincos" (a 2-D sine-cosine start)
    vision_pos_embed_init: str = "random"
    sampler: dict | None = None  # SamplerConfig fields stored with exported checkpoints (pdlm-infer defaults)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # JSON files in the SPEC §11.2 schema (local, file:// or gs:// paths); for a PerceptionDLM-Base model,
    # conversation files (JSON or JSONL, train.conversations)
    annotations: tuple[str, ...] = ()
    synthetic_scenes: int = 0  # >0: that many scenes of the synthetic task (train.synthetic), alone or mixed in
    # Mixing: one weight per annotation file, then one for the synthetic task (if any); items are drawn from
    # the sources in these proportions (grain MapDataset.mix). Empty: the annotation files as one source.
    weights: tuple[float, ...] = ()
    # A bad annotation record (missing image, corrupt or empty RLE, too long for the buckets, ...): "error"
    # stops before training, naming file and record; "skip" leaves it out and logs how many were skipped.
    on_bad_record: str = "error"
    # When the data runs out before run.max_steps: false trains on what there is (the lr schedule sized for
    # it) and exits with code 3; true repeats the data (reshuffled each pass) until run.max_steps.
    loop: bool = False
    synthetic_seed: int = 0
    synthetic_rotated: float = 0.0  # fraction of synthetic squares and triangles drawn at any angle
    synthetic_task: str = "shapes"  # train.synthetic.TASKS: "shapes" ("a red circle") or "sentences"
    # Base models: the fraction of synthetic samples asking "Describe the image." (every shape's caption) instead
    # of one question: a sentence of supervision about every shape, where a question gives a word or two
    synthetic_describe: float = 0.0
    # Base models: different questions about each synthetic scene in one sample, in rounds of one of each type
    # the scene admits (train.synthetic.pick_questions). With more than one the image prompt is held once and
    # each question with its answer follows it, attending to the prompt and itself only, at the positions it
    # would have alone: the sample trains as that many one-question samples of the image would, for one image
    # forward (train.conversations, train.loss)
    synthetic_questions: int = 1
    image_root: str | None = None  # relative image paths: tried against cwd, this, then the JSON's folder
    batch_size: int = 8  # global batch (all processes, before gradient accumulation)
    epochs: int = 1
    seed: int = 0
    # Items per image: ceil(n_masks / group_divisor); the reference uses (1 + prompt_numbers) / 2 = 3.5,
    # i.e. at most 4 masks per sample. The demo raises it to train with up to 6 masks like inference.
    group_divisor: float = 3.5
    # The reference gives each sample's masks a random permutation of the prompt ids (§11.3.5); inference
    # uses id = area rank (§6.4.4). False trains like inference.
    random_prompt_ids: bool = True
    # Region models: pad every caption with LLaDA's EOS (<|endoftext|>) to this many tokens; set it to the
    # sampler's gen_length. 0, the reference: captions unpadded, so one shorter than the G slots each region
    # gets at inference is filled with invented words (SPEC §14.11).
    caption_padding: int = 0
    tile_buckets: tuple[int, ...] = (7,)  # padded tile counts (must cover max_tiles + thumbnail)
    length_buckets: tuple[int, ...] = (512,)  # padded sequence lengths
    # Padded answer lengths: the loss computes logits (A × vocab) at the answer positions only, A the smallest
    # of these that fits the batch (at most its length bucket). Empty: A = the length bucket.
    answer_buckets: tuple[int, ...] = ()
    question: str = DEFAULT_QUESTION
    # Base conversations: extend the final answer with <|eot_id|> to this many tokens, attended and supervised,
    # as LLaDA's SFT pads with EOS (SPEC-train-base T8.4: the reference, 0, never teaches a model to fill the
    # block sampler's G-token canvas; LLaDA-initialised models learned it before). Set it to the gen_length.
    answer_padding: int = 0
    # Base conversations: "training", the reference's training template (SPEC-train-base T5.1), or "chat", the
    # prompt the model is asked with (SPEC-base §B3), for a model that learns the prompt format from scratch
    template: str = "training"
    workers: int = 0  # grain worker processes (0 = in-process)
    threads: int = 2  # grain reader threads per process (each builds whole batches)
    prefetch: int = 4  # batches read ahead per process (each worker too)



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
    # caption slots per region and denoising steps; default: the exported model's (TrainConfig.sampler)
    gen_length: int | None = None
    steps: int | None = None


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
        if m.kind is not None:
            base = with_kind(base, m.kind, from_checkpoint=bool(m.init_from))
        if not m.config:
            return base
        return PDLMConfig.from_dict(_merge(base.to_dict(), m.config))

    def tokenizer_dir(self) -> str:
        from pdlm_jax.files import local_directory

        path = self.model.tokenizer or self.model.init_from
        if not path:
            raise PDLMError("model.tokenizer: give the directory holding tokenizer.json")
        return str(local_directory(path, "model.tokenizer"))  # a bucket folder or hf:// id: its local copy

    def sampler(self, model_cfg: PDLMConfig | None = None) -> SamplerConfig:
        """Generation settings of the trained model, stored with its export and used by periodic evaluation:
        the sampler.json of the model training started from (model.init_from), with model.sampler's fields
        over it, else the reference's. A model learns captions of the lengths it was trained on and pdlm-infer
        gives every region gen_length slots: more slots than it learned to fill garble captions. `model_cfg`:
        `model_config()`, where the caller has it."""
        from pdlm_jax.checkpoint import read_sampler

        stored = read_sampler(self.model.init_from) if self.model.init_from else {}
        # a region model started from Base keeps its G and S, not the block sampler's block_length
        is_base = (model_cfg or self.model_config()).is_base
        fields = SAMPLER_FIELDS if is_base else set(SAMPLER_FIELDS) - {"block_length"}
        stored = {k: v for k, v in stored.items() if k in fields}
        return SamplerConfig(**{**stored, **(self.model.sampler or {})})

    def exported_sampler(self, model_cfg: PDLMConfig) -> SamplerConfig | None:
        """The sampler.json an export carries: `sampler()`; a Base model's only where model.sampler sets it (the
        block sampler has its own defaults, generation.BASE_DEFAULTS)."""
        return self.sampler(model_cfg) if not model_cfg.is_base or self.model.sampler else None


def with_kind(cfg: PDLMConfig, kind: str, from_checkpoint: bool = False) -> PDLMConfig:
    """`cfg` as a model of `kind`. A region model from Base geometry gets the region model's own vision code
    (Quirks defaults) and its 6 prompt ids (T7.2); a Base model reads HF's hidden-state list (SPEC-base §B2)."""
    if kind == cfg.variant:
        return cfg
    if kind == "region":
        region = dataclasses.replace(cfg.region, prompt_numbers=RegionConfig().prompt_numbers)
        return cfg.replace(variant="region", quirks=Quirks(), region=region).validate()
    if from_checkpoint:
        raise PDLMError("model.kind: base from a region checkpoint is not supported (the recipe goes Base -> "
                        "region); start Base training from a Base checkpoint or a preset")
    return cfg.replace(variant="base", quirks=Quirks(select_layer_skips_embeddings=False)).validate()


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
    types = typing.get_type_hints(cls)
    for name, value in values.items():
        default = getattr(cls(), name)
        optional = types[name] == int | None  # None: "not set"
        integer = (types[name] is int or optional) and not isinstance(default, bool)
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
        elif integer and not (value is None and optional) and (isinstance(value, bool) or not isinstance(value, int)):
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
    if not isinstance(cfg.model.sampler or {}, dict) or set(cfg.model.sampler or {}) - set(SAMPLER_FIELDS):
        raise PDLMError(f"model.sampler must be a mapping of {list(SAMPLER_FIELDS)}, got {cfg.model.sampler!r}")
    bad = set(cfg.model.freeze) - set(MODULE_GROUPS)
    if bad:
        raise PDLMError(f"model.freeze: unknown modules {sorted(bad)}; choose from {MODULE_GROUPS}")
    if cfg.model.kind not in (None, *MODEL_KINDS):
        raise PDLMError(f"model.kind must be one of {MODEL_KINDS}, not {cfg.model.kind!r}")
    if cfg.model.dtype not in ("bfloat16", "float32"):
        raise PDLMError(f"model.dtype must be bfloat16 or float32, got {cfg.model.dtype!r}")
    if cfg.model.attention not in ("xla", "cudnn", "splash"):
        raise PDLMError(f"model.attention must be xla, cudnn or splash, got {cfg.model.attention!r}")
    if cfg.model.vision_pos_embed_init not in VISION_POS_EMBED_INITS:
        raise PDLMError(f"model.vision_pos_embed_init must be one of {VISION_POS_EMBED_INITS}, not "
                        f"{cfg.model.vision_pos_embed_init!r}")
    if not 0.0 <= cfg.data.synthetic_rotated <= 1.0:
        raise PDLMError(f"data.synthetic_rotated is a fraction in [0, 1], got {cfg.data.synthetic_rotated}")
    if not 0.0 <= cfg.data.synthetic_describe <= 1.0:
        raise PDLMError(f"data.synthetic_describe is a fraction in [0, 1], got {cfg.data.synthetic_describe}")
    if cfg.data.synthetic_describe and cfg.model.kind == "region":
        raise PDLMError("data.synthetic_describe asks Base models to describe a scene; a region model "
                        "(model.kind: region) learns captions from the scenes' masks: remove it")
    if cfg.data.synthetic_questions > 1 and cfg.model.kind == "region":
        raise PDLMError("data.synthetic_questions packs Base questions about a scene; a region model "
                        "(model.kind: region) learns captions: remove it")
    if not 0.0 <= cfg.optim.noise_t_min < 1.0:
        raise PDLMError(f"optim.noise_t_min must be in [0, 1), got {cfg.optim.noise_t_min}")
    _check_run_data_eval(cfg)
    cfg.lora.check()
    if cfg.lora.enabled and cfg.model.freeze:
        raise PDLMError("model.freeze has no effect with LoRA (lora.rank > 0 trains only the adapters); remove it")
    return cfg


# (setting, test, what it must be): value checks a config passes before anything is loaded
RANGES = (
    ("optim.lr", lambda v: v > 0, "a positive learning rate"),
    ("optim.warmup_ratio", lambda v: 0 <= v <= 1, "a fraction of the run in [0, 1]"),
    ("optim.end_lr_ratio", lambda v: v >= 0, "at least 0"),
    ("optim.clip_norm", lambda v: v > 0, "positive"),
    ("optim.weight_decay", lambda v: v >= 0, "at least 0"),
    ("optim.grad_accum", lambda v: v >= 1, "at least 1"),
    ("run.max_steps", lambda v: v is None or v >= 1, "at least 1 (or left out: the epochs of data)"),
    ("run.save_every", lambda v: v >= 1, "at least 1"),
    ("run.log_every", lambda v: v >= 1, "at least 1"),
    ("run.keep", lambda v: v >= 1, "at least 1"),
    ("data.batch_size", lambda v: v >= 1, "at least 1"),
    ("data.epochs", lambda v: v >= 1, "at least 1"),
    ("data.workers", lambda v: v >= 0, "at least 0 (0 = load in the training process)"),
    ("data.threads", lambda v: v >= 1, "at least 1"),
    ("data.prefetch", lambda v: v >= 0, "at least 0"),
    ("data.synthetic_scenes", lambda v: v >= 0, "at least 0"),
    ("data.synthetic_questions", lambda v: v >= 1, "at least 1"),
    ("data.answer_padding", lambda v: v >= 0, "at least 0 (0: no padding)"),
    ("data.caption_padding", lambda v: v >= 0, "at least 0 (0: no padding)"),
    ("data.group_divisor", lambda v: v > 0, "positive"),
    ("eval.batch_size", lambda v: v >= 1, "at least 1"),
    ("eval.max_records", lambda v: v >= 0, "at least 0"),
    ("eval.gen_length", lambda v: v is None or v >= 1, "at least 1"),
    ("eval.steps", lambda v: v is None or v >= 1, "at least 1"),
)


def _check_run_data_eval(cfg: TrainConfig) -> None:

    for key, ok, requirement in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise PDLMError(f"{key} must be {requirement}, got {value!r}")
    for key in ("data.tile_buckets", "data.length_buckets", "data.answer_buckets"):
        values = getattr(cfg.data, key.split(".")[1])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise PDLMError(f"{key} must be a list of positive integers, got {list(values)}")

    if cfg.data.on_bad_record not in BAD_RECORD_POLICIES:
        raise PDLMError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, not {cfg.data.on_bad_record!r}")
    from train.conversations import TEMPLATES
    from train.synthetic import TASKS

    if cfg.data.synthetic_task not in TASKS:
        raise PDLMError(f"data.synthetic_task must be one of {TASKS} (train.synthetic), not "
                        f"{cfg.data.synthetic_task!r}")
    if cfg.data.template not in TEMPLATES:
        raise PDLMError(f"data.template must be one of {TEMPLATES} (the reference's training template, or the "
                        f"inference prompt), not {cfg.data.template!r}")
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
            d = yaml.safe_load(as_path(path).read_text()) or {}
        except OSError as e:
            raise PDLMError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise PDLMError(f"config file {path} is not valid YAML: {e}") from e
    return from_dict(apply_overrides(d, list(overrides)))
