"""The safetensors file format, read and written without loading whole files.

A file is: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
region; offsets are relative to the start of the data region. Tensors are read through a memory map of just
their byte range that lives as long as the array, so nothing but the tensor in hand is mapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import struct
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from pdlm_jax.errors import PDLMError

# Dtypes we can read as numbers (the only ones a mapped parameter may have).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# Bytes per element of every safetensors dtype, so tensors we do not interpret can still be checked/copied.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


def dtype_name(dtype: np.dtype) -> str:
    """Safetensors name of a numpy dtype we write."""
    for name, dt in NUMPY_DTYPES.items():
        if dt == np.dtype(dtype):
            return name
    raise PDLMError(f"cannot store dtype {dtype} in safetensors; use float32, float16 or bfloat16")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `file`, its absolute byte range, dtype name and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header against its size. Raises PDLMError naming the file."""
    fix = "the file is damaged or incomplete; re-download or re-export it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PDLMError(f"{path}: truncated safetensors file ({size} bytes, no header); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise PDLMError(f"{path}: header length {n} exceeds the file size {size} (truncated or not a "
                                f"safetensors file); {fix}")
            raw = f.read(n)
    except OSError as e:
        raise PDLMError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PDLMError(f"{path}: corrupt safetensors header ({e}); {fix}") from e
    if not isinstance(header, dict):
        raise PDLMError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise PDLMError(f"{path}: corrupt header entry for tensor {name!r} ({e}); {fix}") from e
        if dtype not in ITEMSIZE:
            raise PDLMError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; {fix}")
        if end > data_size:
            raise PDLMError(f"{path}: tensor {name!r} ends at byte {end} of the data region but the file holds only "
                            f"{data_size} data bytes (truncated file); {fix}")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise PDLMError(f"{path}: tensor {name!r} has offsets [{begin}, {end}] inconsistent with "
                            f"{dtype}{list(shape)}; {fix}")
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return out


def tensor_view(info: TensorInfo) -> np.ndarray:
    """Read-only numpy view of one tensor, memory-mapping only its byte range.

    The mapping lives exactly as long as the returned array (and views of it), so a loop that rebinds
    its variable keeps at most one tensor mapped.
    """
    if info.dtype not in NUMPY_DTYPES:
        raise PDLMError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; supported dtypes are "
                        f"{', '.join(NUMPY_DTYPES)} (re-save the checkpoint in bf16 or float32)")
    dtype = NUMPY_DTYPES[info.dtype]
    if info.nbytes == 0:
        return np.empty(info.shape, dtype)
    offset = info.start - info.start % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page aligned
    with open(info.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), info.start + info.nbytes - offset, access=mmap.ACCESS_READ, offset=offset)
    return np.frombuffer(mm, dtype, math.prod(info.shape), info.start - offset).reshape(info.shape)


def copy_raw(info: TensorInfo, out: BinaryIO, block: int = 64 * 2**20) -> None:
    """Copy one tensor's bytes unchanged (any dtype) in bounded blocks."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        left = info.nbytes
        while left:
            chunk = f.read(min(block, left))
            if not chunk:
                raise PDLMError(f"{info.file}: file shrank while reading tensor {info.name!r}")
            out.write(chunk)
            left -= len(chunk)


def write_array(out: BinaryIO, array: np.ndarray, dtype: np.dtype | None = None, block: int = 64 * 2**20) -> None:
    """Write `array` (any strides, e.g. a transposed view) in C order, cast to `dtype`, in bounded blocks."""
    dtype = np.dtype(dtype or array.dtype)
    if array.ndim == 0:
        out.write(np.asarray(array, dtype).tobytes())
        return
    row_bytes = max(1, math.prod(array.shape[1:]) * dtype.itemsize)
    rows = max(1, block // row_bytes)
    for i in range(0, array.shape[0], rows):
        # as bytes: bf16 has no buffer-protocol format code
        out.write(np.ascontiguousarray(array[i:i + rows], dtype=dtype).reshape(-1).view(np.uint8))


@dataclasses.dataclass(frozen=True)
class Entry:
    """A tensor to be written: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class FileWriter:
    """Writes one safetensors file whose tensor list is known up front; data may arrive in any order.

    The header (with every offset) is written first, then `seek(name)` positions the file at a tensor's
    data so the caller can stream it in; every tensor must be written exactly once before `close()`.
    """

    def __init__(self, path: Path, entries: list[Entry]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned, like the safetensors library
        self.path = path
        self._data_start = 8 + len(raw)
        self._offsets = {name: h["data_offsets"] for name, h in header.items() if name != "__metadata__"}
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._data_start + offset)

    def seek(self, name: str) -> BinaryIO:
        self._file.seek(self._data_start + self._offsets[name][0])
        return self._file

    def check(self, name: str) -> None:
        """Assert the bytes just written for `name` filled exactly its slot."""
        if self._file.tell() != self._data_start + self._offsets[name][1]:
            raise AssertionError(f"{self.path}: wrote a wrong number of bytes for {name}")

    def close(self) -> None:
        self._file.close()
