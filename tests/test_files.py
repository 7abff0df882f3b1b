"""pdlm_jax.files: atomic writes of files and folders (the one helper every tool's outputs go through)."""

from __future__ import annotations

import json
import os

import pytest

from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path, atomic_directory, atomic_write, write_json_atomic


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"caption": "ein Würfel"})
    atomic_write(f"file://{tmp_path / 'b.txt'}", "text")  # file:// URLs are local paths
    umask = os.umask(0o22)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    assert json.loads(path.read_text()) == {"caption": "ein Würfel"} and (tmp_path / "b.txt").read_text() == "text"
    with pytest.raises(TypeError):  # a failed write keeps the old file and leaves no temporary file
        atomic_write(path, 3)
    assert json.loads(path.read_text()) == {"caption": "ein Würfel"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "out.json"]


def test_atomic_directory_swaps_in_only_finished_folders(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(dst) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(PDLMError, match="already exists.*--force"):
        with atomic_directory(dst):
            pass
    with atomic_directory(dst, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in dst.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_as_path_keeps_urls_and_makes_local_paths_absolute():
    assert str(as_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(as_path("file:///tmp/x")) == "/tmp/x" and os.path.isabs(str(as_path("rel")))
