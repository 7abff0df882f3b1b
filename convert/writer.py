"""Reference safetensors checkpoint -> our checkpoint directory (see pdlm_jax.checkpoint for the layout).

Streaming: each leaf of our tree is built on its own (stacked leaves layer by layer into one
preallocated array, reading each source tensor through a memory map of just its bytes), handed to
Orbax, and dropped before the next one. Peak memory is about the largest leaf, whatever the model size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from convert.reader import ReferenceCheckpoint, open_reference
from convert.safetensors_file import Entry, FileWriter, TensorInfo, copy_raw, tensor_view
from pdlm_jax import checkpoint, keymap
from pdlm_jax.config import DTYPES
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import is_url, uploaded_on_success

CONVERTER_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class Summary:
    mapped: int  # source tensors converted
    ignored: int  # source tensors dropped (or kept raw)
    kept_unused: bool
    leaves: int
    parameters: int
    bytes: int  # bytes of params written
    dtype: str
    seconds: float

    def format(self) -> str:
        kept = " (kept raw in unused.safetensors)" if self.kept_unused else ""
        return (f"tensors: {self.mapped} mapped into {self.leaves} leaves, {self.ignored} ignored{kept}\n"
                f"parameters: {self.parameters:,} ({self.dtype}, {self.bytes / 1e9:.3f} GB)\n"
                f"time: {self.seconds:.2f} s ({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)")


def sha256(path: Path, block: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def copy_into(dst: np.ndarray, src: np.ndarray, block: int = 256) -> None:
    """dst[...] = src with dtype conversion; a transposed 2-D source is copied in column blocks so that
    both sides stay cache-friendly (about 2x faster than one strided copy)."""
    if src.ndim == 2 and not src.flags.c_contiguous:
        for i in range(0, src.shape[1], block):
            np.copyto(dst[:, i:i + block], src[:, i:i + block], casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")


def build_leaf(shape: tuple[int, ...], sources: dict[int | None, tuple[TensorInfo, str]], dtype: np.dtype
               ) -> np.ndarray:
    """One leaf of our tree from its source tensor(s): a single tensor, or one per layer stacked on axis 0."""
    leaf = np.empty(shape, dtype)
    if None in sources:
        info, transform = sources[None]
        copy_into(leaf, keymap.to_ours(tensor_view(info), transform))
    else:
        for layer in range(shape[0]):
            info, transform = sources[layer]
            copy_into(leaf[layer], keymap.to_ours(tensor_view(info), transform))
    return leaf


def resolve_dtype(ref: ReferenceCheckpoint, name: str) -> np.dtype:
    """'auto' keeps bf16 checkpoints in bf16 and stores everything else (F32, F16, mixed) as float32."""
    if name == "auto":
        dtypes = {info.dtype for info, _ in ref.mapped.values()}
        return DTYPES["bfloat16"] if dtypes == {"BF16"} else DTYPES["float32"]
    if name not in DTYPES:
        raise PDLMError(f"--dtype {name!r} is not supported; choose auto, bfloat16 or float32")
    return DTYPES[name]


def _write_unused(ref: ReferenceCheckpoint, path: Path) -> None:
    names = sorted(ref.ignored)
    writer = FileWriter(path, [Entry(n, ref.ignored[n][0].dtype, ref.ignored[n][0].shape) for n in names])
    try:
        for name in names:
            copy_raw(ref.ignored[name][0], writer.seek(name))
            writer.check(name)
    finally:
        writer.close()


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "auto",
    force: bool = False,
    keep_unused: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Summary:
    """Convert the reference checkpoint in `src` into our checkpoint directory `dst` (atomically; a bucket URL:
    uploaded when complete)."""
    src = Path(src).resolve()
    if not is_url(dst):
        dst = Path(dst).resolve()
        if src == dst or src in dst.parents:
            raise PDLMError(f"--dst {dst} must not be (inside) the source directory {src}")
    ref = open_reference(src)  # validates everything before any output exists
    if not (src / "tokenizer.json").exists():
        raise PDLMError(f"{src} has no tokenizer.json; copy the reference tokenizer files next to the weights")
    tokenizer = [src / name for name in checkpoint.TOKENIZER_FILES if (src / name).exists()]
    side_files = {p.name: p.read_bytes() for p in tokenizer}
    side_files[checkpoint.REFERENCE_CONFIG_FILE] = (src / "config.json").read_bytes()
    sources = [src / "config.json", *ref.files, *tokenizer]
    return write(ref, dst, dtype=dtype, force=force, keep_unused=keep_unused, log=log, side_files=side_files,
                 sources=sources, provenance={"source_dir": str(src)})


def write(
    ref: ReferenceCheckpoint,
    dst: str | Path,
    *,
    dtype: str,
    force: bool,
    keep_unused: bool,
    log: Callable[[str], None],
    side_files: dict[str, bytes],
    sources: list[Path],
    provenance: dict,
    initialised: dict[str, np.ndarray] | None = None,
) -> Summary:
    """Write our checkpoint `dst` (atomically) from the validated source tensors of `ref`: every leaf built from
    its source tensors, or taken from `initialised` (leaves no source holds); `side_files` (name -> bytes) are
    written beside the params, and `sources` are hashed into provenance.json. A bucket URL `dst` is written
    locally and uploaded, provenance.json (the mark of a complete checkpoint) last."""
    if is_url(dst):
        with uploaded_on_success(os.fspath(dst), force, last=checkpoint.PROVENANCE_FILE) as local:
            return write(ref, local, dtype=dtype, force=force, keep_unused=keep_unused, log=log,
                         side_files=side_files, sources=sources, provenance=provenance, initialised=initialised)
    start = time.perf_counter()
    cfg, out_dtype = ref.config, resolve_dtype(ref, dtype)
    initialised = initialised or {}
    shapes = keymap.expected_shapes(cfg)
    leaf_sources = ref.leaf_sources()
    with checkpoint.checkpoint_writer(dst, force) as out:
        # Hash the sources on a second thread while converting (hashlib releases the GIL).
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            digests = {str(p): pool.submit(sha256, p) for p in sources}
            for i, (target, shape) in enumerate(shapes.items()):
                log(f"[{i + 1}/{len(shapes)}] {target} {list(shape)}")
                leaf = (initialised[target].astype(out_dtype) if target in initialised
                        else build_leaf(tuple(shape), leaf_sources[target], out_dtype))
                out.params.add(target, leaf)
            source_files = {_short_name(p, sources): {"sha256": d.result(), "bytes": Path(p).stat().st_size}
                            for p, d in digests.items()}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a failed run does not wait for the hashes
        if keep_unused and ref.ignored:
            _write_unused(ref, Path(out.dir) / checkpoint.UNUSED_FILE)
        out.write_config(cfg)
        for name, data in side_files.items():
            out.write(name, data)
        provenance = {
            "converter": "pdlm-convert",
            "converter_version": CONVERTER_VERSION,
            **provenance,
            "source_files": source_files,
            "dtype": out_dtype.name,
            # Per-tensor source dtype, so export can write each tensor back exactly as it came.
            "source_dtypes": {name: info.dtype for name, (info, _) in sorted(ref.mapped.items())},
            "ignored": sorted(ref.ignored),
            "kept_unused": bool(keep_unused and ref.ignored),
        }
        out.commit(provenance)

    parameters = sum(int(np.prod(s)) for s in shapes.values())
    return Summary(mapped=len(ref.mapped), ignored=len(ref.ignored), kept_unused=provenance["kept_unused"],
                   leaves=len(shapes), parameters=parameters, bytes=parameters * out_dtype.itemsize,
                   dtype=out_dtype.name, seconds=time.perf_counter() - start)


def _short_name(path: str, sources: list[Path]) -> str:
    """A source file's name in provenance.json: its file name, or its path when sources share a name (the
    config.json of two components)."""
    names = [Path(p).name for p in sources]
    return Path(path).name if names.count(Path(path).name) == 1 else str(path)
