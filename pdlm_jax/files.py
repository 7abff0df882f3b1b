"""Where a user's path points, and writing there so that readers see the old file or the new one, never half.

One place resolves every path the tools take (checkpoints, `pdlm-convert --src/--lm/--vision`, `init_from`,
annotations, images, `run.output_dir`):

- local paths and `file://` URLs;
- bucket URLs (`gs://`, `s3://`, `az://`), read and written through etils `epath` and fsspec; the filesystem
  package is an extra (`pip install 'pdlm-jax[gcs]'` for gcsfs), named in a PDLMError when missing;
- `hf://ORG/NAME[@REVISION]`: a Hugging Face Hub repository, as a local snapshot from `huggingface_hub`
  (its cache, `HF_HOME` / `HF_HUB_CACHE`, and its offline mode `HF_HUB_OFFLINE=1`).

`local_directory` turns any of them into a local folder (a bucket folder is copied into a local cache once),
which is what readers of whole checkpoints need: Orbax, safetensors memory maps, the tokenizer.
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


HUB_PREFIX = "hf://"
# What a snapshot of a Hub repository brings: configs and tokenizers, safetensors weights, a pdlm-jax
# checkpoint's Orbax params.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "params/*")
# The fsspec package behind each bucket scheme epath reads, and the extra that installs it.
BUCKET_FILESYSTEMS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None), "az": ("adlfs", None)}


def as_path(path: str | os.PathLike) -> epath.Path:
    """A user-given path as an absolute epath.Path: `file://` URLs become local paths (Orbax needs absolute
    paths); bucket URLs (`gs://...`) are kept (pathlib would turn them into a local `gs:/bucket` folder), and
    a PDLMError says which package to install when their filesystem is missing."""
    text = os.fspath(path).removeprefix("file://")
    if text.startswith(HUB_PREFIX):
        raise PDLMError(f"{text}: a Hugging Face id names a whole model folder; give it where a checkpoint "
                        "directory is expected (pdlm-convert --src/--lm/--vision, init_from, pdlm_jax.load)")
    if "://" in text:
        _check_filesystem(text.split("://", 1)[0], text)
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def is_url(path: str | os.PathLike) -> bool:
    """True for an object-store URL (gs://...); `file://` URLs are local paths."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def _check_filesystem(scheme: str, url: str) -> None:
    import fsspec
    from etils.epath import backend

    if scheme not in BUCKET_FILESYSTEMS:
        raise PDLMError(f"{url}: unsupported URL scheme {scheme}://; use a local path, file://, "
                        f"{', '.join(s + '://' for s in BUCKET_FILESYSTEMS)} or hf://ORG/NAME")
    # etils picks a backend per path (fsspec, TensorFlow's gfile, a test's mock); only fsspec needs gcsfs & co.
    if getattr(epath.Path(url), "_backend", None) is not backend.fsspec_backend:
        return
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        package, extra = BUCKET_FILESYSTEMS[scheme]
        how = f"pip install 'pdlm-jax[{extra}]'" if extra else f"pip install {package}"
        raise PDLMError(f"{url}: {scheme}:// paths need the {package} package, which is not installed: {how}")


def local_directory(path: str | os.PathLike, flag: str = "path", hub_patterns: tuple[str, ...] = HUB_PATTERNS
                    ) -> Path:
    """A local folder holding the files of `path`: the folder itself (local or file://), the snapshot of a
    Hugging Face repository (`hf://ORG/NAME[@REVISION]`; only its files matching `hub_patterns`), or a cached
    copy of a bucket folder (`gs://...`). `flag` names the argument in error messages."""
    text = os.fspath(path)
    if text.startswith(HUB_PREFIX):
        return hub_snapshot(text, flag, hub_patterns)
    if is_url(text):
        return bucket_copy(text, flag)
    return Path(os.fspath(as_path(text)))


def hub_snapshot(ref: str, flag: str = "path", patterns: tuple[str, ...] = HUB_PATTERNS) -> Path:
    """The local snapshot of `hf://ORG/NAME[@REVISION]` (its files matching `patterns`) from huggingface_hub's
    cache, downloading what is missing unless HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, _, revision = ref[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or ("@" in ref and not revision):
        raise PDLMError(f"{flag} {ref}: a Hugging Face id is hf://ORG/NAME or hf://ORG/NAME@REVISION")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise PDLMError(f"{flag} {ref}: not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                            "HF_HUB_OFFLINE=1; download it once online (unset HF_HUB_OFFLINE, or "
                            f"`huggingface-cli download {repo}`) or point HF_HOME at the cache that has it") from e
        raise PDLMError(f"{flag} {ref}: cannot reach the Hugging Face Hub and it is not in the cache "
                        f"{constants.HF_HUB_CACHE} ({e}); check the network or download it elsewhere") from e
    except GatedRepoError as e:
        raise PDLMError(f"{flag} {ref}: the repository is gated; accept its terms on huggingface.co and log in "
                        "(`huggingface-cli login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise PDLMError(f"{flag} {ref}: no such Hugging Face repository (or it is private: log in with "
                        "`huggingface-cli login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise PDLMError(f"{flag} {ref}: the repository has no revision {revision!r}") from e
    except HfHubHTTPError as e:
        raise PDLMError(f"{flag} {ref}: the Hugging Face Hub refused the download ({e})") from e


def cache_root() -> Path:
    """Where copies of bucket folders are kept: $PDLM_CACHE, else $XDG_CACHE_HOME/pdlm-jax or ~/.cache/pdlm-jax."""
    if os.environ.get("PDLM_CACHE"):
        return Path(os.environ["PDLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdlm-jax"


def _listing(folder: epath.Path, prefix: str = "") -> dict[str, int]:
    """{relative path: size} of every file under `folder` (a bucket has no recursive glob)."""
    out = {}
    for child in folder.iterdir():
        name = prefix + child.name
        if child.is_dir():
            out.update(_listing(child, name + "/"))
        else:
            out[name] = child.stat().length
    return out


def bucket_copy(url: str, flag: str = "path") -> Path:
    """A local copy of the bucket folder `url` under `cache_root()`, made once and made again only when the
    folder's listing (names and sizes) changes; the copy appears whole or not at all."""
    src = as_path(url)
    if not src.is_dir():
        raise PDLMError(f"{flag} {url} does not exist or is not a folder")
    listing = _listing(src)
    scheme, rest = url.rstrip("/").split("://", 1)
    dst = cache_root() / "buckets" / scheme / rest
    stamp = dst / ".pdlm-source.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"url": url, "files": listing}:
        return dst
    with atomic_directory(dst, force=True) as tmp:
        for name in listing:
            _copy_file(src / name, tmp / name)
        (tmp / stamp.name).write_text(json.dumps({"url": url, "files": listing}))
    return dst


def _copy_file(src, dst) -> None:
    """Copy one file between any two epath/pathlib paths, in bounded blocks."""
    epath.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(src).open("rb") as f_in, epath.Path(dst).open("wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 16 * 2**20)


@contextlib.contextmanager
def uploaded_on_success(url: str, force: bool = False, last: str | None = None) -> Iterator[Path]:
    """For an output folder on a bucket: yield a local path (not yet existing) to write the folder at; when the
    block succeeds, its files are uploaded to `url`, `last` (the folder's completion mark) after all others.
    An existing `url` is an error before any work unless `force` (then it is replaced after the work)."""
    remote = as_path(url)
    if remote.exists() and not force:
        raise PDLMError(f"output {url} already exists; choose another output or pass --force to replace it")
    staging = cache_root() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        local = Path(tmp) / "out"
        yield local
        if remote.exists():
            remote.rmtree()
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
            _copy_file(path, remote / path.relative_to(local).as_posix())


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
def atomic_directory(dst: str | os.PathLike, force: bool = False, token: str | None = None,
                     owner: bool = True) -> Iterator[Path]:
    """Yield a temporary local folder beside `dst` that becomes `dst` only if the block succeeds.

    Several processes writing one folder (a multi-host checkpoint) pass the same `token`, which names the
    temporary folder; only the `owner` creates it and moves it into place (or removes it on an error)."""
    dst = Path(os.fspath(as_path(dst)))
    if dst.exists() and not force:
        raise PDLMError(f"output {dst} already exists; choose another output or pass --force to replace it")
    tmp = dst.parent / f".{dst.name}.tmp-{token or uuid.uuid4().hex[:8]}"
    if owner:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        yield tmp
        if owner:
            replace_directory(tmp, dst)
    finally:
        if owner and tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask
