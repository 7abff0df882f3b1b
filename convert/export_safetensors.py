"""Our checkpoint directory -> reference-format safetensors (`pdlm-convert --to-safetensors`).

Writes `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (or a single
`model.safetensors`), the reference config.json and the tokenizer files. Streaming like the converter:
one leaf of ours is read from Orbax at a time and its tensors are written into their slots of the
(pre-planned) shard files. Each tensor is written in the dtype it had in the source checkpoint
(recorded in provenance.json), so convert + export reproduces the source bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable


from convert.reader import INDEX_FILE, SINGLE_FILE, reference_shape
from convert.safetensors_file import NUMPY_DTYPES, Entry, FileWriter, copy_raw, dtype_name, read_header, write_array
from pdlm_jax import checkpoint, keymap
from pdlm_jax.config import DTYPES, PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import atomic_directory, is_url, uploaded_on_success

MAX_SHARD_BYTES = 4 * 10**9  # the reference saved with max_shard_size='4GB'


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    tensors: int
    shards: int
    bytes: int
    seconds: float

    def format(self) -> str:
        return (f"wrote {self.tensors} tensors in {self.shards} file(s), {self.bytes / 1e9:.3f} GB, "
                f"{self.seconds:.1f} s")


def reference_config(cfg: PDLMConfig) -> dict:
    """A reference-style config.json for `cfg` (used when the original one was not kept).

    It holds every field `PDLMConfig.from_reference` reads, with the reference's names (SPEC §1).
    """
    v, lm, r = cfg.vision, cfg.lm, cfg.region
    return {
        "architectures": ["PDMLLM"],
        "model_type": "pdmllm",
        "downsample_ratio": r.downsample_ratio,
        "image_size": r.image_size,
        "patch_size": r.patch_size,
        "image_token_id": r.image_token_id,
        "kernel_size": [r.mask_kernel_size, r.mask_kernel_size],
        "num_image_token": r.num_image_tokens,
        "prompt_numbers": r.prompt_numbers,
        "roi_output_size": r.roi_output_size,
        "vision_select_layer": r.vision_select_layer,
        "vision_abstractor_config": {"projection_type": cfg.projector.projection_type},
        "language_model_config": {
            "model_type": "llada",
            "vocab_size": lm.vocab_size,
            "hidden_size": lm.hidden_size,
            "intermediate_size": lm.intermediate_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_kv_heads,
            "rope_theta": lm.rope_theta,
            "rms_norm_eps": lm.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "rope_scaling": None,
        },
        "vision_model_config": {
            "model_type": "siglip",
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
            },
        },
    }


def _natural_key(name: str) -> list:
    """Sort 'layers.10' after 'layers.9', like the reference's module order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy split of `entries` (in order) into files of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def export(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "auto",
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log: Callable[[str], None] = lambda s: None,
) -> ExportSummary:
    """Write our checkpoint `src` as a reference-format checkpoint directory `dst` (atomically).

    dtype 'auto' writes each tensor in its source dtype (else in the stored dtype); 'bfloat16' or
    'float32' casts everything.
    """
    start = time.perf_counter()
    if is_url(dst):  # written locally, uploaded when complete
        with uploaded_on_success(os.fspath(dst), force, last="config.json") as local:
            return export(src, local, dtype=dtype, force=force, max_shard_bytes=max_shard_bytes, log=log)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if src == dst or src in dst.parents:
        raise PDLMError(f"--dst {dst} must not be (inside) the checkpoint directory {src}")
    cfg = checkpoint.load_config(src)
    stored = checkpoint.params_metadata(src)
    if dtype != "auto" and dtype not in DTYPES:
        raise PDLMError(f"--dtype {dtype!r} is not supported; choose auto, bfloat16 or float32")
    source_dtypes = (checkpoint.read_json(src, checkpoint.PROVENANCE_FILE) or {}).get("source_dtypes", {})

    names = keymap.reference_names(cfg)  # {name: (target, layer, transform)}
    entries: dict[str, Entry] = {}
    for name, (target, layer, transform) in names.items():
        shape, stored_dtype = stored[target]
        out = dtype_name(DTYPES[dtype]) if dtype != "auto" else source_dtypes.get(name, dtype_name(stored_dtype))
        entries[name] = Entry(name, out, reference_shape(shape[1:] if layer is not None else shape, transform))
    unused = read_header(src / checkpoint.UNUSED_FILE) if (src / checkpoint.UNUSED_FILE).exists() else {}
    for name, info in unused.items():
        entries[name] = Entry(name, info.dtype, info.shape)

    ordered = [entries[n] for n in sorted(entries, key=_natural_key)]
    shards = plan_shards(ordered, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    file_of = {e.name: k for k, shard in enumerate(shards) for e in shard}

    with atomic_directory(dst, force) as tmp:
        writers = [FileWriter(tmp / f, shard) for f, shard in zip(files, shards)]
        try:
            by_target: dict[str, list[str]] = {}
            for name, (target, _, _) in names.items():
                by_target.setdefault(target, []).append(name)
            for i, (target, leaf) in enumerate(checkpoint.iter_leaves(src, list(by_target))):
                log(f"[{i + 1}/{len(by_target)}] {target}")
                for name in by_target[target]:
                    _, layer, transform = names[name]
                    out = writers[file_of[name]].seek(name)
                    value = leaf[layer] if layer is not None else leaf
                    write_array(out, keymap.to_reference(value, transform), NUMPY_DTYPES[entries[name].dtype])
                    writers[file_of[name]].check(name)
                del leaf, value
            for name, info in unused.items():
                copy_raw(info, writers[file_of[name]].seek(name))
                writers[file_of[name]].check(name)
        finally:
            for w in writers:
                w.close()
        total = sum(e.nbytes for e in ordered)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: files[file_of[n]] for n in sorted(entries)}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if (src / checkpoint.REFERENCE_CONFIG_FILE).exists():
            shutil.copy2(src / checkpoint.REFERENCE_CONFIG_FILE, tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(reference_config(cfg), indent=2, sort_keys=True) + "\n")
        for f in checkpoint.TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
    return ExportSummary(len(entries), len(shards), total, time.perf_counter() - start)
