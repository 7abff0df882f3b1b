"""LoRA adapters with qwix: configuration, adapter parameters, the adapted forward, merging, adapter files.

A LoRA adapter adds `kernel_lora_a` (in, r) and `kernel_lora_b` (r, out) next to the kernel of every
`nnx.Linear` whose module path ('lm/layers/attn/q', as in our parameter paths) fully matches
`LoraConfig.target`; the layer then computes x·W + (x·A)·B · alpha/rank. qwix computes that term
(`qwix.LoraProvider` intercepts each matching layer's dot_general and reads the adapter it finds on the
module). We create the adapter parameters ourselves rather than by qwix's create-on-first-call: our
layers are stacked and run by one `lax.scan`, so each adapter needs the same leading layer axis as its
kernel, which qwix would not see from inside one scanned layer.

An adapter directory (written by `save_adapter`, read by `load_adapter` / `pdlm_jax.load(adapter=...)`):

    adapter.json      LoraConfig fields and the base model's config (checked against the base on load)
    params/           Orbax tree of the adapter parameters only (paths '<module>/kernel_lora_a|b')
    sampler.json      the generation defaults the adapter was trained for
    tokenizer.json    the training tokenizer, which replaces the base one (e.g. with a word added)
    provenance.json   who wrote it (pdlm-train: its config and steps), pdlm-jax version, date
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import local_directory
from pdlm_jax import quantize
from pdlm_jax.qwix_tracing import module_path, tag_paths

ADAPTER_FILE = "adapter.json"
# How training holds the frozen base: "auto" in the compute dtype (model.dtype), "f32" / "bf16" as such, or
# "int8" / "int4" with every linear kernel quantized once at load (QLoRA; pdlm_jax.quantize) and the other
# base weights in the compute dtype.
BASES = ("auto", "f32", "bf16", "int8", "int4")
# LLaDA's attention and MLP projections (peft's usual choice for Llama blocks)
DEFAULT_TARGET = r"lm/layers/(attn/[qkvo]|mlp/(gate|up|down))"
SUFFIXES = ("kernel_lora_a", "kernel_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no LoRA (full fine-tuning, or model.freeze)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    target: str = DEFAULT_TARGET  # regex, full match, over the module paths of nnx.Linear layers
    base: str = "auto"  # storage of the frozen base weights during training (BASES)
    # No dropout: qwix draws LoRA dropout masks from an nnx.Rngs stored on each module, which a layer stack
    # run by lax.scan over split state cannot carry.

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise PDLMError(f"lora.rank must be a non-negative integer (0 = off), got {self.rank!r}")
        if not self.alpha > 0:
            raise PDLMError(f"lora.alpha must be positive, got {self.alpha!r}")
        if self.base not in BASES:
            raise PDLMError(f"lora.base must be one of {', '.join(BASES)}, got {self.base!r}")
        try:
            re.compile(self.target)
        except re.error as e:
            raise PDLMError(f"lora.target {self.target!r} is not a valid regular expression: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def quantized_base(self) -> str | None:
        """"int8" / "int4" when the frozen base's kernels are quantized (pdlm_jax.quantize modes), else None."""
        return self.base if self.base in ("int8", "int4") else None

    def base_float_dtype(self, compute_dtype) -> jnp.dtype:
        """The dtype of the frozen base's float leaves (all of them, or those left unquantized)."""
        named = {"f32": jnp.float32, "bf16": jnp.bfloat16}
        return jnp.dtype(named.get(self.base, compute_dtype))


# ---- adapter parameters ----------------------------------------------------------------------------


def targets(model: nnx.Module, lora: LoraConfig) -> list[tuple[str, nnx.Linear]]:
    """The adaptable nnx.Linear layers whose module path fully matches `lora.target` (PDLMError if none)."""
    # qwix adds the adapter inside Linear.__call__, so only nnx.Linear layers are candidates (not SigLIP's
    # attention output, modeling/siglip.HeadsProjection)
    linears = [(module_path(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
    chosen = [(p, m) for p, m in linears if re.fullmatch(lora.target, p)]
    if not chosen:
        raise PDLMError(f"lora.target {lora.target!r} matches no linear layer; module paths are e.g. "
                        + ", ".join(p for p, _ in linears[:12]))
    return chosen


def init_adapters(shapes: dict[str, tuple], lora: LoraConfig, seed: int = 0) -> dict:
    """Initial adapters for {'<module>/kernel_lora_a' | '<module>/kernel_lora_b': shape} (leading axes =
    stacked layers): A from qwix's LoraRule initializer (he-uniform), drawn per layer; B zeros, so the
    adapted model starts equal to the base. Float32 (master weights). Returns a nested tree."""
    from pdlm_jax.trees import nest

    a_init = rule(lora).lora_a_initializer
    out = {}
    for i, path in enumerate(sorted(shapes)):
        *lead, rows, cols = shapes[path]
        if path.endswith("/kernel_lora_b"):
            out[path] = jnp.zeros(shapes[path], jnp.float32)
            continue
        init = functools.partial(a_init, shape=(rows, cols), dtype=jnp.float32)
        for _ in lead:
            init = jax.vmap(init)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), int(np.prod(lead, dtype=int)))
        out[path] = init(keys.reshape(*lead))
    return nest(out)


def add_adapters(model: nnx.Module, lora: LoraConfig, seed: int = 0) -> nnx.Module:
    """Give every targeted layer its LoRA pair (`init_adapters`) and tag every module with its path, which
    qwix matches LoraRule.module_path against. Works on abstract models (nnx.eval_shape) too."""
    chosen = targets(model, lora)
    shapes = {}
    for path, linear in chosen:
        *lead, n_in, n_out = linear.kernel.shape
        shapes[f"{path}/kernel_lora_a"] = (*lead, n_in, lora.rank)
        shapes[f"{path}/kernel_lora_b"] = (*lead, lora.rank, n_out)
    values = flat(init_adapters(shapes, lora, seed))
    for path, linear in chosen:
        for name in SUFFIXES:
            setattr(linear, name, nnx.LoRAParam(values[f"{path}/{name}"]))
    tag_paths(model)
    return model


def adapter_shapes(model: nnx.Module) -> dict[str, tuple]:
    """{'<module>/kernel_lora_a': shape, ...} of a model with adapters (concrete or abstract)."""
    return {path: tuple(x.shape) for path, x in flat(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))).items()}


# ---- the adapted forward (qwix) --------------------------------------------------------------------


def rule(lora: LoraConfig):
    """The qwix rule: adapters on the dot_general of every module whose path matches `lora.target` (whose
    kernel, with a quantized base, is the quantized one)."""
    import qwix

    qtype = quantize.MODES[lora.quantized_base] if lora.quantized_base else None
    return qwix.LoraRule(module_path=lora.target, op_names=("dot_general",), rank=lora.rank, alpha=float(lora.alpha),
                         weight_qtype=qtype)


def provider(lora: LoraConfig, quantized_paths: Sequence[str] = ()):
    """The LoRA forward's qwix provider; with a quantized base, `quantized_paths` (pdlm_jax.quantize's
    `linear_paths`) names the quantized layers: the adapted ones match the LoRA rule first, the rest the
    plain quantization rule."""
    import qwix

    rules = [rule(lora)]
    if lora.quantized_base:
        rules.append(quantize.rule(quantized_paths, lora.quantized_base))
    return qwix.LoraProvider(rules)


def store_base(params: dict, lora: LoraConfig, compute_dtype, quantized_paths: Sequence[str] = ()) -> dict:
    """The frozen base as LoRA training holds it: float leaves in `lora.base_float_dtype`, and with an int8 /
    int4 base the kernels of `quantized_paths` quantized once (laid out as a quantized model's state)."""
    dtype = lora.base_float_dtype(compute_dtype)
    tree = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    if lora.quantized_base:
        tree = quantize.quantize_params(tree, quantized_paths, lora.quantized_base)
    return tree


# ---- merging and files -------------------------------------------------------------------------------


def flat(tree: Any) -> dict[str, Any]:
    from pdlm_jax.trees import flatten

    return flatten(tree)


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
    """Base params with each targeted kernel replaced by W + A·B·alpha/rank (a plain parameter tree)."""
    from pdlm_jax.trees import nest

    merged, pairs = flat(params), flat(adapters)
    for path, a in pairs.items():
        if not path.endswith("/kernel_lora_a"):
            continue
        module = path[: -len("/kernel_lora_a")]
        b = pairs[f"{module}/kernel_lora_b"]
        kernel = merged[f"{module}/kernel"]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * lora.scale
        merged[f"{module}/kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return nest(merged)


def combine(params: dict, adapters: dict) -> dict:
    """One nested tree holding base params and adapter params (the state of a model with adapters)."""
    from pdlm_jax.trees import nest

    return nest({**flat(params), **flat(adapters)})


def save_adapter(out_dir: str | Path, adapters: dict, lora: LoraConfig, base_cfg: PDLMConfig,
                 tokenizer_dir: str | Path, sampler, provenance: dict) -> Path:
    """Write an adapter directory (see the module docstring) with the checkpoint writer (atomic, replacing an
    earlier one): the adapters, the tokenizer of `tokenizer_dir`, `sampler` (a SamplerConfig) and provenance."""
    from pdlm_jax.checkpoint import checkpoint_writer

    with checkpoint_writer(out_dir, force=True) as out:
        for path, leaf in flat(adapters).items():
            out.params.add(path, np.asarray(jax.device_get(leaf), dtype=np.float32))
        out.write_json(ADAPTER_FILE, {"lora": dataclasses.asdict(lora), "base_config": base_cfg.to_dict()})
        out.copy_tokenizer(tokenizer_dir)
        out.write_sampler(sampler)
        return out.commit(provenance)


def load_adapter(adapter_dir: str | Path, base_cfg: PDLMConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapter tree as float32 jax arrays) of an adapter directory made for `base_cfg`."""
    import orbax.checkpoint.experimental.v1 as ocp

    from pdlm_jax.checkpoint import PARAMS_DIR

    adapter_dir = local_directory(adapter_dir, "adapter").absolute()  # Orbax needs absolute paths
    meta_file = adapter_dir / ADAPTER_FILE
    if not meta_file.exists() or not (adapter_dir / PARAMS_DIR).is_dir():
        raise PDLMError(f"{adapter_dir} is not a LoRA adapter directory (needs {ADAPTER_FILE} and {PARAMS_DIR}/); "
                        "pdlm-train writes one to run.output_dir/adapter when lora.rank > 0")
    meta = json.loads(meta_file.read_text())
    lora = LoraConfig(**meta["lora"])
    if PDLMConfig.from_dict(meta["base_config"]) != base_cfg:
        raise PDLMError(f"adapter {adapter_dir} was trained on a different base model (its {ADAPTER_FILE} "
                        "base_config differs from the checkpoint's config.json); use the base it was trained on")
    try:
        tree = ocp.load(adapter_dir / PARAMS_DIR)
    except Exception as e:  # Orbax raises assorted types for damaged checkpoints
        raise PDLMError(f"cannot read the adapter parameters in {adapter_dir / PARAMS_DIR} ({e})") from e
    return lora, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
