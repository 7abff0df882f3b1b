"""TensorBoard event files on any filesystem etils `epath` handles: local, `file://`, `gs://`, `s3://`, ...

Run paths themselves go through `pdlm_jax.files.as_path` (Orbax checkpoints through the same `epath` paths).
"""

from __future__ import annotations

import io
import os

from etils import epath



class _EpathEventFile:
    """tensorboardX record writer for a cloud path: buffers the event file and rewrites it on each flush
    (objects in a bucket cannot be appended to; tensorboardX's S3 writer does the same)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathWriterFactory:
    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def summary_writer(logdir: epath.Path, purge_step: int | None = None):
    """A tensorboardX SummaryWriter for `logdir` on any epath filesystem. `purge_step`: a resumed run's
    first step; TensorBoard then drops the events an interrupted run logged after it."""
    import tensorboardX
    from tensorboardX import record_writer

    scheme = os.fspath(logdir).split("://")[0] if "://" in os.fspath(logdir) else None
    if scheme is not None:
        record_writer.register_writer_factory(scheme, _EpathWriterFactory())
    return tensorboardX.SummaryWriter(os.fspath(logdir), purge_step=purge_step, flush_secs=30)
