"""Output files of the infer tools: atomic writes with normal permissions, and an exclusive lock on an output."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from pdlm_jax.errors import PDLMError


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the target folder, fsync, then rename: readers never see half a file.

    mkstemp creates its file with mode 0600; the result gets the mode a plain open() would give (0666 less
    the umask), so other users and tools can read it as usual.
    """
    path = Path(path)
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


def write_json_atomic(path: str | Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def exclusive_lock(output: Path, flag: str = "--output") -> Iterator[None]:
    """Hold an exclusive lock on `output` (an fcntl lock on OUTPUT.lock, which records the holder's pid).

    A second holder fails at once with a PDLMError naming the file and the pid of the run that holds it,
    before it writes anything. The lock goes with the process: a killed run leaves no stale lock behind.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.with_name(output.name + ".lock")
    with open(lock_path, "a+") as lock:  # "a+": create if missing, never truncate before holding the lock
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise PDLMError(f"{flag} {output} is in use by another run (pid {holder}, lock file {lock_path}); "
                            "wait for it to finish or choose another output") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
