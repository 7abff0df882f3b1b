"""An exclusive lock on an output file of the infer tools (atomic writes: pdlm_jax.files)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from pdlm_jax.errors import PDLMError


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
