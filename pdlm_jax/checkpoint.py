"""Our checkpoint directory: Orbax params + our config + tokenizer files, written by `pdlm-convert`.

Layout of a checkpoint directory:

    config.json             our PDLMConfig (PDLMConfig.to_json)
    params/                 Orbax checkpoint of the parameter tree (nested dict, paths of
                            keymap.expected_shapes: stacked layers on axis 0, kernels (in, out))
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, processor_settings.json, ...
    reference_config.json   the source checkpoint's config.json, written back on export
    provenance.json         source files and their sha256, dtypes, converter version, date
    unused.safetensors      optional: source tensors we do not use, kept raw (--keep-unused)

Params are written leaf by leaf with Orbax partial saves, so writing never holds more than the leaf
in hand (plus a small batch of small leaves); restore reads straight into the requested shardings.
Each leaf is stored as a single uncompressed chunk: Orbax writes that without copying it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from etils import epath

from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig, SamplerConfig, check_remasking
from pdlm_jax.errors import PDLMError
from pdlm_jax.trees import flatten, nest

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
REFERENCE_CONFIG_FILE = "reference_config.json"
PROVENANCE_FILE = "provenance.json"
SAMPLER_FILE = "sampler.json"  # generation defaults the model was trained for (SamplerConfig fields)
UNUSED_FILE = "unused.safetensors"
# Copied from the source checkpoint when present (tokenizer.json is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "processor_settings.json", "preprocessor_config.json")

_CONVERT_HINT = "convert a reference checkpoint with `pdlm-convert --src REFERENCE_DIR --dst OUR_DIR`"


# ---- writing -------------------------------------------------------------------------------------

def _context() -> ocp.Context:
    ctx = ocp.Context()
    # Leaves are never modified while being written: skip Orbax's defensive copy (it doubles peak RAM).
    ctx.memory.deepcopy_host_arrays = False
    # Trained weights barely compress and zstd halves write speed.
    ctx.array.saving.use_compression = False
    # Keep each leaf one chunk: a leaf split into chunks (Orbax does so above 2 GiB by default) is
    # encoded through a full copy, which would double peak RAM for the largest leaves.
    ctx.array.saving.ocdbt_target_data_file_size = 0
    return ctx


class ParamsWriter:
    """Writes a parameter tree into `params_dir` one leaf (or a small batch of leaves) at a time.

    `add` may be called with numpy arrays of any size; arrays are handed to Orbax as soon as the
    pending batch reaches `flush_bytes`, and the caller should drop its reference afterwards.
    `close` finalizes the Orbax checkpoint; until then `params_dir` does not exist.
    """

    def __init__(self, params_dir: str | Path, flush_bytes: int = 256 * 2**20):
        self.params_dir = epath.Path(params_dir)  # also gs:// and other epath URLs (pdlm-train exports)
        self.flush_bytes = flush_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._ctx = _context()
        self._saved_any = False

    def add(self, path: str, array: np.ndarray) -> None:
        self._pending[path] = array
        if sum(a.nbytes for a in self._pending.values()) >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self._ctx:
                ocp.partial.save(self.params_dir, nest(self._pending))
            self._pending = {}
            self._saved_any = True

    def close(self) -> None:
        self.flush()
        if self._saved_any:
            with self._ctx:
                ocp.partial.finalize(self.params_dir)


def write_config(ckpt_dir: str | Path, cfg: PDLMConfig) -> None:
    (epath.Path(ckpt_dir) / CONFIG_FILE).write_text(cfg.to_json() + "\n")


# ---- reading -------------------------------------------------------------------------------------

def _require_checkpoint(ckpt_dir: str | Path) -> Path:
    ckpt_dir = Path(ckpt_dir).absolute()  # Orbax needs absolute paths
    if not ckpt_dir.is_dir():
        raise PDLMError(f"checkpoint directory {ckpt_dir} does not exist; {_CONVERT_HINT}")
    config = ckpt_dir / CONFIG_FILE
    if (ckpt_dir / "model.safetensors.index.json").exists() or (ckpt_dir / "model.safetensors").exists():
        raise PDLMError(f"{ckpt_dir} is a reference (PyTorch safetensors) checkpoint, not a pdlm-jax one; "
                        f"{_CONVERT_HINT}")
    if not config.exists() or not (ckpt_dir / PARAMS_DIR).is_dir():
        raise PDLMError(f"{ckpt_dir} is not a pdlm-jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/); "
                        f"{_CONVERT_HINT}")
    return ckpt_dir


def load_config(ckpt_dir: str | Path) -> PDLMConfig:
    """Our model config stored in a checkpoint directory."""
    return PDLMConfig.from_json_file(_require_checkpoint(ckpt_dir) / CONFIG_FILE)


def tokenizer_path(ckpt_dir: str | Path) -> Path:
    """The checkpoint's tokenizer.json."""
    path = _require_checkpoint(ckpt_dir) / "tokenizer.json"
    if not path.exists():
        raise PDLMError(f"{ckpt_dir} has no tokenizer.json; re-run pdlm-convert from a reference checkpoint "
                        "that includes its tokenizer files")
    return path


def params_metadata(ckpt_dir: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of every stored leaf, from the Orbax metadata (no data is read), checked
    against the checkpoint's config."""
    ckpt_dir = _require_checkpoint(ckpt_dir)
    params_dir = ckpt_dir / PARAMS_DIR
    try:
        meta = ocp.metadata(params_dir).metadata
    except Exception as e:  # Orbax raises assorted types for damaged/unfinished checkpoints
        raise PDLMError(f"cannot read the Orbax checkpoint in {params_dir} ({e}); {_CONVERT_HINT}") from e
    stored = {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten(meta).items()}
    expected = keymap.expected_shapes(load_config(ckpt_dir))
    problems = [f"{p}: missing" for p in expected if p not in stored]
    problems += [f"{p}: not in the model" for p in stored if p not in expected]
    problems += [f"{p}: shape {stored[p][0]} != {expected[p]}" for p in expected
                 if p in stored and stored[p][0] != tuple(expected[p])]
    if problems:
        raise PDLMError(f"params in {ckpt_dir} do not match its {CONFIG_FILE}: " + "; ".join(problems[:5])
                        + f"; {_CONVERT_HINT}")
    return stored


def _sharding_lookup(shardings: Any) -> Callable[[str], jax.sharding.Sharding]:
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path: device
    if callable(shardings):
        return shardings
    flat = flatten(shardings)

    def lookup(path: str) -> jax.sharding.Sharding:
        if path not in flat:
            raise PDLMError(f"shardings has no entry for parameter {path!r}; pass a tree with the structure of "
                            "keymap.expected_shapes(cfg) or a callable path -> Sharding")
        return flat[path]

    return lookup


def restore_params(
    ckpt_dir: str | Path,
    *,
    dtype: Any = None,
    shardings: Any = None,
) -> tuple[PDLMConfig, dict]:
    """Load (config, params) from a pdlm-jax checkpoint directory.

    params is a nested dict of jax.Arrays (paths of keymap.expected_shapes). `dtype` casts every leaf
    on read (None keeps the stored dtype). `shardings` is a pytree of jax.sharding.Sharding with the
    structure of params, or a callable path -> Sharding; arrays are created directly in those
    shardings by Orbax, never gathered on one device first. Default: the first device.
    """
    ckpt_dir = _require_checkpoint(ckpt_dir)
    cfg = load_config(ckpt_dir)
    stored = params_metadata(ckpt_dir)
    sharding_for = _sharding_lookup(shardings)
    abstract = nest({
        path: jax.ShapeDtypeStruct(shape, np.dtype(dtype) if dtype is not None else stored_dtype,
                                   sharding=sharding_for(path))
        for path, (shape, stored_dtype) in stored.items()
    })
    with _context():
        params = ocp.load(ckpt_dir / PARAMS_DIR, abstract)
    return cfg, params


def iter_leaves(ckpt_dir: str | Path, paths: list[str], batch_bytes: int = 256 * 2**20
                ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (path, host numpy array in its stored dtype) for the given leaves, reading a batch of at
    most `batch_bytes` (or one bigger leaf) at a time, so memory stays bounded (streaming export)."""
    params_dir = _require_checkpoint(ckpt_dir) / PARAMS_DIR
    meta = flatten(ocp.metadata(params_dir).metadata)
    ctx = _context()
    ctx.pytree.loading.partial_load = True
    batch: list[str] = []

    def load() -> dict[str, np.ndarray]:
        with ctx:
            return flatten(ocp.load(params_dir, nest({p: meta[p] for p in batch})))

    for path in paths:
        nbytes = lambda p: int(np.prod(meta[p].shape)) * np.dtype(meta[p].dtype).itemsize  # noqa: E731
        if batch and sum(map(nbytes, batch)) + nbytes(path) > batch_bytes:
            yield from load().items()
            batch = []
        batch.append(path)
    if batch:
        yield from load().items()


def read_json(ckpt_dir: str | Path, name: str) -> dict | None:
    """A JSON side file of the checkpoint (provenance, reference config), or None if absent."""
    path = Path(ckpt_dir) / name
    return json.loads(path.read_text()) if path.exists() else None


def read_sampler(ckpt_dir: str | Path) -> dict:
    """The generation defaults stored with a checkpoint or adapter (its sampler.json; {} if it has none).

    A remasking rule our sampler does not implement is a PDLMError naming the file, never silently ignored.
    """
    values = read_json(ckpt_dir, SAMPLER_FILE) or {}
    if "remasking" in values:
        check_remasking(values["remasking"], str(Path(ckpt_dir) / SAMPLER_FILE))
    return values


def sampler_defaults(ckpt_dir: str | Path) -> dict:
    """Generation length and steps suited to a checkpoint (its `sampler.json`), else the reference's 32/32."""
    return {"gen_length": SamplerConfig.gen_length, "steps": SamplerConfig.steps, **read_sampler(ckpt_dir)}
