"""Test helpers: fixture paths and an independent, non-streaming reference-weight loader."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ("tiny_v1", "tiny_v1_roi4", "tiny_v1_wide", "demo512")


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def fixture_config(name: str) -> PDLMConfig:
    return PDLMConfig.from_reference_file(fixture_dir(name) / "config.json")


def fixture_oracle(name: str) -> dict:
    return json.loads((fixture_dir(name) / "oracle.json").read_text())


def fixture_tensors(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir(name) / "tensors.npz") as z:
        return {k: z[k] for k in z.files}


@functools.cache
def fixture_array(name: str, key: str) -> np.ndarray:
    """One tensor of the fixture's tensors.npz (cached)."""
    with np.load(fixture_dir(name) / "tensors.npz") as z:
        return z[key]


@functools.cache
def fixture_tokenizer(name: str):
    from pdlm_jax.regions import Tokenizer

    return Tokenizer(fixture_dir(name))


def fixture_mask_paths(name: str) -> list[Path]:
    """The fixture's mask files in the order the reference was given them."""
    return [fixture_dir(name) / f for f in fixture_oracle(name)["masks"]["files"]]


@functools.cache
def fixture_prepared(name: str):
    """(tiled image, prepare_regions output) of the fixture's image and masks, as the reference run them."""
    from pdlm_jax.regions import prepare_regions, tile_image

    cfg = fixture_config(name)
    tiled = tile_image(fixture_dir(name) / "image.png", cfg.region)
    return tiled, prepare_regions(tiled, fixture_mask_paths(name), fixture_tokenizer(name), cfg,
                                  fixture_oracle(name)["generation"]["gen_length_per_mask"])


def fixture_regions(name: str):
    """The prepare_regions output of the fixture (see fixture_prepared)."""
    return fixture_prepared(name)[1]


def merged_feature_map(vision_embeds, grid: tuple[int, int], region, quirks):
    """The reference's merged map (Hf, Wf, H) = (rows·fh, cols·fw, H), for a static grid (SPEC §7.2.1-2): what
    RoI-Align reads in the reference. The library never builds it (`ops.roi_replay` reads the tiles directly),
    so the tests build it to check against."""
    cols, rows = grid
    f = region.feature_grid
    t, _, h = vision_embeds.shape
    start = 1 if (quirks.roi_tile_shift and t > 1) else 0
    tiles = vision_embeds[start:start + cols * rows].reshape(rows, cols, f, f, h)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * f, cols * f, h)


def load_reference_tree(ckpt_dir: Path, cfg: PDLMConfig) -> dict:
    """Load a reference-format checkpoint into our nested param tree, all in RAM (tests only)."""
    flat: dict[str, dict[int | None, np.ndarray]] = {}
    for shard in sorted(Path(ckpt_dir).glob("*.safetensors")):
        for name, array in load_file(shard).items():
            m = keymap.match(cfg, name)
            assert m is not None, f"unexpected tensor {name}"
            if m.target is not None:
                flat.setdefault(m.target, {})[m.layer] = keymap.to_ours(array, m.transform)
    tree: dict = {}
    for target, by_layer in flat.items():
        value = by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in sorted(by_layer)])
        node = tree
        *parents, leaf = target.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value)
    return tree


def encode_rle(mask: np.ndarray) -> dict:
    """A boolean mask as the COCO RLE of the annotation files ({"size": [h, w], "counts": str}), by pycocotools."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


class FakeDevices:
    """A subprocess with `devices` fake CPU devices (fake_devices_env) that runs the multi-device tests' bodies
    one after another: they share one start (importing JAX and the library takes 10-20 s on a loaded 2-core
    machine) instead of each starting a process. tests/conftest.py holds one for the session (`fake_devices`)."""

    def __init__(self, devices: int):
        self.log = tempfile.TemporaryFile("a+")  # appended to: reading it back never moves where the child writes
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_devices_worker.py")],
                                     cwd=ROOT, env=fake_devices_env(devices), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, module: str, function: str, *args, timeout: float = 1800):
        """`module.function(*args)` (a test file's body; args and result JSON) in the subprocess. An exception
        there fails the caller with the subprocess's traceback and log; `timeout` bounds a hang."""
        assert self.proc.poll() is None, f"the fake-devices process has exited:\n{self._log_tail()}"
        self.proc.stdin.write(json.dumps([module, function, list(args)]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise AssertionError(f"{module}.{function} ran past {timeout} s:\n{self._log_tail()}")
        line = self.proc.stdout.readline()
        assert line, f"the fake-devices process died in {module}.{function}:\n{self._log_tail()}"
        answer = json.loads(line)
        assert "error" not in answer, f"{answer['error']}\n{self._log_tail()}"
        return answer["result"]

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# Compiling is most of a multi-device subprocess's time; these flags cut it by about a third. They change
# how LLVM optimises, not what is computed (no fast-math): the sharded tests stay token-exact.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def fake_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` CPU devices and compiles fast (FAST_COMPILE).

    XLA_FLAGS acts only when JAX starts, so the tests that need several devices run their body in a
    subprocess and the session keeps its one device (most tests assume it: meshes default to all devices).
    """
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE]),
                PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


@contextlib.contextmanager
def memory_bucket():
    """gs:// served by fsspec's in-memory filesystem (no network, no gcsfs): etils epath reads and writes
    gs:// paths through fsspec, which here finds this stand-in. Emptied and unregistered on exit."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry as registry  # fsspec has no unregister

    class MemoryBucket(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}  # its own store, not MemoryFileSystem's
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return super()._strip_protocol(path)

    saved = {name: registry.get(name) for name in MemoryBucket.protocol}
    for name in MemoryBucket.protocol:
        fsspec.register_implementation(name, MemoryBucket, clobber=True)
    type(backend.fsspec_backend)._get_filesystem.cache_clear()  # etils caches the filesystem per scheme
    try:
        yield MemoryBucket.store
    finally:
        for name, cls in saved.items():
            registry.pop(name, None) if cls is None else registry.__setitem__(name, cls)
        type(backend.fsspec_backend)._get_filesystem.cache_clear()


def hub_cache(root: Path, repos: dict[str, Path]) -> Path:
    """A Hugging Face cache laid out as huggingface_hub lays it out: models--ORG--NAME/{blobs/<hash>,
    snapshots/<commit>/<path> -> blobs/<hash> (relative links), refs/main = <commit>}, one repo per folder."""
    import hashlib

    for repo_id, folder in repos.items():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (repo / "blobs").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return root
