"""Writing a file so that readers see the old one or the new one, never half of one.

Paths may be local or any etils `epath` URL (`gs://`, `s3://`, `file://`), as the training outputs are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """True for an object-store URL (gs://...); `file://` URLs are local paths."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str: UTF-8) to `path` atomically.

    Local: a temporary file in the target folder, fsync'd, renamed over `path`. mkstemp creates its file
    with mode 0600; the result gets the mode a plain open() would give (0666 less the umask), so other
    users and tools can read it as usual. An object store replaces a whole object in one write anyway.
    """
    data = data.encode() if isinstance(data, str) else data
    if is_url(path):
        epath.Path(os.fspath(path)).write_bytes(data)
        return
    path = Path(os.fspath(path).removeprefix("file://"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj, **dumps) -> None:
    """`obj` as indented JSON (non-ASCII kept as is), atomically; `dumps`: more json.dumps arguments."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, **dumps) + "\n")


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask
