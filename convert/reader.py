"""Open and validate a reference-format (PyTorch safetensors) PerceptionDLM checkpoint directory.

Everything is checked from headers alone, before a single weight is read or any output is created:
shards present and intact, index consistent with the shards, every tensor mapped or explicitly
ignored by `pdlm_jax.keymap`, nothing the model needs missing, shapes consistent with config.json,
dtypes readable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from convert.safetensors_file import NUMPY_DTYPES, TensorInfo, read_header
from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REFERENCE_CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class ReferenceCheckpoint:
    directory: Path
    config: PDLMConfig
    reference_config: dict  # config.json as saved by the reference
    files: tuple[Path, ...]  # weight files (and the index, if any) in reading order
    mapped: dict[str, tuple[TensorInfo, keymap.Match]]  # tensors we convert
    ignored: dict[str, tuple[TensorInfo, keymap.Match]]  # tensors we drop (or keep raw with --keep-unused)

    def leaf_sources(self) -> dict[str, dict[int | None, tuple[TensorInfo, str]]]:
        """{target: {layer (None if not stacked): (tensor, transform)}}."""
        out: dict[str, dict[int | None, tuple[TensorInfo, str]]] = {}
        for info, m in self.mapped.values():
            out.setdefault(m.target, {})[m.layer] = (info, m.transform)
        return out


def reference_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Shape in the reference layout of an array that has `shape` in ours."""
    return keymap.to_reference(np.broadcast_to(np.zeros((), np.uint8), shape), transform).shape


def _list(names: list[str], limit: int = 5) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_weights(directory: Path, what: str = "--src at a reference PerceptionDLM checkpoint directory"
                 ) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    """Every tensor of a safetensors checkpoint directory (index + shards, or one file), from headers alone,
    and its weight files in reading order; `what` says where the flag should point."""
    index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if not index_path.exists():
        if not single.exists():
            raise PDLMError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}; point {what}")
        return read_header(single), (single,)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PDLMError(f"{index_path}: unreadable index ({e}); re-download it") from e
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = [s for s in by_shard if not (directory / s).is_file()]
    if missing:
        s = missing[0]
        raise PDLMError(f"missing shard {directory / s} (listed in {INDEX_FILE} for {len(by_shard[s])} tensors, "
                        f"e.g. {by_shard[s][0]}); download it into {directory}")
    tensors: dict[str, TensorInfo] = {}
    for shard, names in sorted(by_shard.items()):
        header = read_header(directory / shard)
        absent = [n for n in names if n not in header]
        if absent:
            raise PDLMError(f"{INDEX_FILE} says tensor(s) {_list(absent)} are in {directory / shard}, but that shard "
                            "does not contain them; the shard or the index is from a different download, "
                            "re-download both")
        unlisted = sorted(set(header) - set(names))
        if unlisted:
            raise PDLMError(f"{directory / shard} contains tensor(s) {_list(unlisted)} that {INDEX_FILE} does not "
                            "list; the shard or the index is from a different download, re-download both")
        tensors.update(header)
    return tensors, (index_path, *(directory / s for s in sorted(by_shard)))


def open_reference(directory: str | Path) -> ReferenceCheckpoint:
    """Parse and validate a reference checkpoint; raises PDLMError naming the culprit and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PDLMError(f"source checkpoint directory {directory} does not exist")
    config_path = directory / REFERENCE_CONFIG
    if not config_path.exists():
        raise PDLMError(f"{directory} has no {REFERENCE_CONFIG}; a reference checkpoint directory needs the "
                        "config.json saved with its weights")
    cfg = PDLMConfig.from_reference_file(config_path)
    reference_config = json.loads(config_path.read_text())
    tensors, files = read_weights(directory)

    mapped, ignored = map_tensors(cfg, tensors, keymap.reference_names(cfg), directory, config_path)
    return ReferenceCheckpoint(directory, cfg, reference_config, files, mapped, ignored)


def map_tensors(cfg: PDLMConfig, tensors: dict[str, TensorInfo], expected, directory: Path, config_path: Path
                ) -> tuple[dict, dict]:
    """(mapped, ignored): `tensors` (by reference name) placed in our tree by `keymap`, checked against `cfg`.

    PDLMError for a name the layout does not know, a name of `expected` that is absent, a shape `cfg` does not
    imply or a dtype we cannot read; `directory` and `config_path` are named in the message.
    """
    mapped, ignored, unexpected = {}, {}, []
    for name, info in tensors.items():
        m = keymap.match(cfg, name)
        if m is None:
            unexpected.append(name)
        elif m.target is None:
            ignored[name] = (info, m)
        else:
            mapped[name] = (info, m)
    if unexpected:
        where = tensors[unexpected[0]].file
        raise PDLMError(f"unexpected tensor(s) {_list(sorted(tensors[n].name for n in unexpected))} (e.g. in "
                        f"{where}): not part of the PerceptionDLM layout for the architecture in {config_path}; "
                        "check that config.json belongs to these weights (layer counts) or remove the stray tensors")

    missing = [n for n in expected if n not in mapped]
    if missing:
        raise PDLMError(f"missing tensor(s) {_list(missing)} in {directory}: the checkpoint is incomplete; "
                        "re-download or re-export it (or fix config.json if it describes a larger model)")

    shapes = keymap.expected_shapes(cfg)
    for name, (info, m) in mapped.items():
        ours = shapes[m.target][1:] if m.layer is not None else shapes[m.target]
        want = reference_shape(tuple(ours), m.transform)
        if info.shape != want:
            raise PDLMError(f"tensor {info.name} in {info.file} has shape {list(info.shape)}, but {config_path} "
                            f"implies {list(want)}; the weights and config.json are from different models")
        if info.dtype not in NUMPY_DTYPES:
            raise PDLMError(f"tensor {info.name} in {info.file} has dtype {info.dtype}; supported dtypes are "
                            f"{', '.join(NUMPY_DTYPES)}: re-save the checkpoint in bf16 or float32")
    return mapped, ignored
