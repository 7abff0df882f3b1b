"""Our checkpoint directory: Orbax params + our config + tokenizer files, written by `pdlm-convert` and
`pdlm-train` (its export), both through `CheckpointWriter`.

Layout of a checkpoint directory:

    config.json             our PDLMConfig (PDLMConfig.to_json)
    params/                 Orbax checkpoint of the parameter tree (nested dict, paths of
                            keymap.expected_shapes: stacked layers on axis 0, kernels (in, out))
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, processor_settings.json, ...
    reference_config.json   the source checkpoint's config.json, written back on export
    provenance.json         who wrote it and from what (converter: source files and their sha256, dtypes;
                            pdlm-train: its config and steps), pdlm-jax version, date; written last
    sampler.json            optional: generation defaults (SamplerConfig fields) the model was trained for
    unused.safetensors      optional: source tensors we do not use, kept raw (--keep-unused)

Params are written leaf by leaf with Orbax partial saves, so writing never holds more than the leaf
in hand (plus a small batch of small leaves); restore reads straight into the requested shardings.
Each leaf is stored as a single uncompressed chunk: Orbax writes that without copying it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from etils import epath

import pdlm_jax
from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig, SamplerConfig, check_remasking
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path, atomic_directory, is_url, local_directory
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


class CheckpointWriter:
    """Writes the files of one checkpoint directory (the layout above; pdlm_jax.lora's adapter directory too)
    into `dir`, the folder `checkpoint_writer` gives it. Collective: every process of a multi-host job makes one
    for the same folder and adds the same params (Orbax saves in lockstep); process 0 alone writes the side
    files."""

    def __init__(self, dir: epath.Path, dst: epath.Path):
        self.dir, self.dst, self.main, self.committed = dir, dst, jax.process_index() == 0, False
        self.params = ParamsWriter(self.dir / PARAMS_DIR)

    def write(self, name: str, data: bytes | str) -> None:
        """A side file of the directory (process 0 writes it; the others skip)."""
        if self.main:
            (self.dir / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write(name, json.dumps(obj, indent=2, default=str) + "\n")

    def write_config(self, cfg: PDLMConfig) -> None:
        self.write(CONFIG_FILE, cfg.to_json() + "\n")

    def write_sampler(self, sampler: SamplerConfig) -> None:
        self.write_json(SAMPLER_FILE, dataclasses.asdict(sampler))

    def copy_tokenizer(self, src_dir: str | os.PathLike) -> list[epath.Path]:
        """Copy the TOKENIZER_FILES that `src_dir` holds (tokenizer.json is required); returns their sources."""
        if not (as_path(src_dir) / "tokenizer.json").exists():
            raise PDLMError(f"{src_dir} has no tokenizer.json; give the directory of the model's tokenizer files")
        sources = [as_path(src_dir) / name for name in TOKENIZER_FILES if (as_path(src_dir) / name).exists()]
        for src in sources:
            self.write(src.name, src.read_bytes())
        return sources

    def commit(self, provenance: dict) -> epath.Path:
        """Finish the params and write provenance.json (with the date and our version), the last file; the
        folder moves into place when the `checkpoint_writer` block ends."""
        self.params.close()
        self.write_json(PROVENANCE_FILE, {
            **provenance, "pdlm_jax_version": pdlm_jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        self.committed = True
        return self.dst


@contextlib.contextmanager
def checkpoint_writer(dst: str | os.PathLike, force: bool = False) -> Iterator[CheckpointWriter]:
    """A CheckpointWriter for `dst`, which appears complete or not at all (replacing an existing `dst` only
    with `force`); the block must end with `commit`.

    Local: the files go into a temporary folder beside `dst` (`files.atomic_directory`, one name on every
    process) that becomes `dst` when the block succeeds. An object store (gs://...) has no rename: the files
    are written in place and provenance.json, written last, marks the checkpoint complete."""
    dst_path, main = as_path(dst), jax.process_index() == 0
    if is_url(dst):
        if dst_path.exists() and not force:
            raise PDLMError(f"output {dst} already exists; choose another output or pass --force to replace it")
        if main:
            if dst_path.exists():
                dst_path.rmtree()
            dst_path.mkdir(parents=True)
        folder = contextlib.nullcontext(dst_path)
    else:
        folder = atomic_directory(dst_path, force, token=_shared_token(), owner=main)
    with folder as tmp:
        _sync("pdlm-checkpoint-begin")
        writer = CheckpointWriter(epath.Path(tmp), dst_path)
        yield writer
        if not writer.committed:
            raise PDLMError(f"checkpoint {dst}: the writer's block ended without commit()")
        _sync("pdlm-checkpoint-written")  # every process has written its part before process 0 moves it
    _sync("pdlm-checkpoint-end")


def _shared_token() -> str:
    """A random name suffix, the same on every process (they write one folder)."""
    token = np.random.default_rng().integers(2**31 - 1, dtype=np.int32)  # int32: JAX's default width
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(token):08x}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- reading -------------------------------------------------------------------------------------

def _require_checkpoint(ckpt_dir: str | Path) -> Path:
    """The local folder of a checkpoint given as a folder, a bucket URL or an hf:// id (`files.local_directory`),
    checked to be ours."""
    ckpt_dir = local_directory(ckpt_dir, "checkpoint").absolute()  # Orbax needs absolute paths
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
    problems += [f"{p}: dtype {d} is not a float type" for p, (_, d) in stored.items()
                 if p in expected and not np.issubdtype(d, np.floating) and d.name != "bfloat16"]
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
    try:
        with _context():
            params = ocp.load(ckpt_dir / PARAMS_DIR, abstract)
    except Exception as e:  # TensorStore reports a truncated/missing array file as a bare Exception
        reason = str(e).split(". See full")[0].splitlines()[0][:200] if str(e) else type(e).__name__
        raise PDLMError(f"checkpoint {ckpt_dir} is damaged: its weights in {PARAMS_DIR}/ cannot be read "
                        f"({reason}); re-run pdlm-convert (or pdlm-train's export) to write it again") from None
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
    path = local_directory(ckpt_dir, "checkpoint") / name
    return json.loads(path.read_text()) if path.exists() else None


def read_sampler(ckpt_dir: str | Path) -> dict:
    """The generation defaults stored with a checkpoint or adapter (its sampler.json; {} if it has none).

    A remasking rule our sampler does not implement is a PDLMError naming the file, never silently ignored.
    """
    values = read_json(ckpt_dir, SAMPLER_FILE) or {}
    if "remasking" in values:
        check_remasking(values["remasking"], f"{ckpt_dir}/{SAMPLER_FILE}")
    return values

