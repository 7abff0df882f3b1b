"""Writing files and folders so that readers see the old one or the new one, never half of one.

Paths may be local or any etils `epath` URL (`gs://`, `s3://`, `file://`), as the training outputs are.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from etils import epath

from pdlm_jax.errors import PDLMError


def as_path(path: str | os.PathLike) -> epath.Path:
    """A user-given path as an absolute epath.Path: `file://` URLs become local paths (Orbax needs absolute
    paths); cloud URLs (`gs://...`) are kept (pathlib would turn them into a local `gs:/bucket` folder)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    p = epath.Path(text)
    return p if "://" in text else epath.Path(os.path.abspath(text))


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


def replace_directory(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished local folder `tmp` to `dst`. An existing `dst` is renamed away first and deleted
    after, so `dst` is the old folder or the new one, never a mix."""
    tmp, dst = Path(os.fspath(tmp)), Path(os.fspath(dst))
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(dst)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary local folder beside `dst` that becomes `dst` only if the block succeeds."""
    dst = Path(os.fspath(dst))
    if dst.exists() and not force:
        raise PDLMError(f"output {dst} already exists; choose another output or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask
