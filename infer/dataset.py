"""Resumable batch captioning over region-annotation files (SPEC §13 ParaDLC-Bench, §11.2 training schema).

`pdlm-infer --annotations FILE --image-root DIR --output results.jsonl` captions every region of a file and
appends one JSON line per region to the output:

    {"ann_id", "image_id", "caption", "token_ids", "seconds", "forwards"}     (success)
    {"ann_id", "image_id", "error"}                                          (bad image / RLE / model input)

Batching: images go to the model `--images-per-call` at a time (default: `--batch-size`), as one
`caption_batch` call. It cuts each image's regions into passes of <= prompt_numbers (6) and runs the passes of
one input bucket together, `--batch-size` rows per compiled program, so the rows fill across images. `seconds`
is the wall time of that call (shared by its images) and `forwards` the denoising forwards of the image's passes.

Determinism: an image's captions are those of `caption_regions(image, masks)` on all its decodable regions in
annotation-index order, whatever the batching: passes in descending-area order (ties: the higher annotation
index first, the reference's reversed argsort, SPEC §6.4), pass c seeded with seed + c. The passes are always
formed from *all* decodable regions of the image, whatever is already done or selected, so a region gets the
same caption whether the run was interrupted, limited or sharded (captions of a pass depend on each other).

Resume: the records of a call are written and fsync'd together, so a killed run loses at most the call in
flight. A rerun with the same output keeps the successful records, skips their ids, drops a torn tail (a
partial last line left by a kill) and *retries error records*: errors are usually fixable input (a missing
image copied in later), so the old error lines of the selected ids are removed before the run and re-recorded
only if they fail again. The file therefore ends with at most one line per region.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from infer.file_lock import exclusive_lock
from pdlm_jax.files import atomic_write
from pdlm_jax.annotation_files import ImageRecord, Region, parse_record, read_records, region_mask
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import GenerationSettings, resolve
from pdlm_jax.regions.prompt import DEFAULT_QUESTION

# ----------------------------------------------------------------------------------------------- annotations


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    record: ImageRecord
    source: str  # a file path or a `data:...;base64,` URL

    @property
    def image_id(self) -> str:
        return self.record.image_id

    @property
    def regions(self) -> tuple[Region, ...]:
        return self.record.regions


def load_annotations(path: str | os.PathLike, image_root: str | os.PathLike) -> list[ImageEntry]:
    """Read a ParaDLC-Bench or training-schema annotation file (`pdlm_jax.annotation_files`); PDLMError if the
    file or one of its records is malformed. RLEs are checked when they are decoded, region by region."""
    path = Path(path)
    records = [parse_record(raw, i, path) for i, raw in enumerate(read_records(path))]
    seen: set[str] = set()
    for record in records:
        for region in record.regions:
            if region.ann_id in seen:
                raise PDLMError(f"{record.where}: region id {region.ann_id!r} occurs twice; ids "
                                "(image_id + '_' + index) must be unique for results to be resumable.")
            seen.add(region.ann_id)
    root = Path(image_root)  # an absolute path or a data URL stays as it is
    return [ImageEntry(r, r.image if r.image.startswith("data:") else str(root / r.image)) for r in records]


def load_image(source: str) -> Image.Image:
    """Open a path or data URL as RGB; raises PDLMError if it is missing or unreadable."""
    try:
        if source.startswith("data:"):
            image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        else:
            image = Image.open(source)
        image.load()  # decode now, so truncated files fail here
        return image.convert("RGB")
    except FileNotFoundError as e:
        raise PDLMError(f"image {source}: file not found (check --image-root).") from e
    except (OSError, ValueError, IndexError, Image.DecompressionBombError) as e:
        raise PDLMError(f"image {source[:200]}: cannot read it ({e}).") from e


# ------------------------------------------------------------------------------------------------ results file


class ResultsFile:
    """The JSONL output: recovers from a torn tail, drops error lines to retry, appends whole calls durably."""

    def __init__(self, path: Path, retry_ids: set[str]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.read_bytes() if path.exists() else b""
        records = _parse_results(raw, path)
        kept = [r for r in records if "error" not in r or r["ann_id"] not in retry_ids]
        self.done = {r["ann_id"]: r for r in kept if "error" not in r}
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        if text != raw:  # a torn tail or error lines to retry: rewrite once, atomically
            atomic_write(path, text)
        self._file = open(path, "ab")

    def append(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(r) + "\n" for r in records).encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _parse_results(raw: bytes, path: Path) -> list[dict]:
    """Records of an existing output. A run killed mid-write leaves an unparsable tail (a partial line, or
    garbage after a crash): it is dropped. Unparsable lines *followed by* good ones are corruption -> PDLMError."""
    lines = raw.split(b"\n")
    lines.pop()  # what follows the last newline: b"" or a torn line
    records: list[dict] = []
    bad_at = None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("ann_id"), str)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            bad_at = bad_at or number
        elif bad_at is not None:
            raise PDLMError(f"--output {path}: line {bad_at} is not a result record but later lines are; "
                            "the file is corrupt. Fix or remove that line, or choose a new --output.")
        else:
            records.append(record)
    return records


# --------------------------------------------------------------------------------------------------- running


def add_annotation_args(parser: argparse.ArgumentParser) -> None:
    """The dataset-mode flags of pdlm-infer (the generation flags are the CLI's own)."""
    group = parser.add_argument_group("dataset mode (caption every region of an annotation file)")
    group.add_argument("--annotations", type=Path, metavar="FILE",
                       help="ParaDLC-Bench annotations.json or a training-schema JSON (SPEC §13.1, §11.2)")
    group.add_argument("--image-root", type=Path, metavar="DIR",
                       help="folder of the images (default: the annotation file's folder)")
    try:
        group.add_argument("--output", type=Path, metavar="FILE", help="results JSONL (resumed if it exists)")
    except argparse.ArgumentError:
        pass  # the single-image CLI already has --output; dataset mode reads the same value
    group.add_argument("--limit", type=int, metavar="N",
                       help="only the first N regions of the shard, in file order")
    group.add_argument("--shard", default="0/1", metavar="I/N",
                       help="process images I, I+N, I+2N, ... of the file (0 <= I < N)")
    group.add_argument("--summary", type=Path, metavar="FILE",
                       help="summary JSON (default: summary.json next to --output)")
    group.add_argument("--batch-size", type=int, default=1, metavar="B",
                       help="denoising passes per compiled program call, filled across images (default: 1)")
    group.add_argument("--images-per-call", type=int, metavar="N",
                       help="images per model call and per durable write (default: --batch-size); raise it when "
                            "images differ in size or region count, so each input bucket fills its B rows")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise PDLMError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4.")
    return i, n


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """Everything a dataset run uses, checked when built (PDLMError), so mistakes show before a model loads."""

    annotations: Path
    output: Path  # results JSONL
    image_root: Path
    summary: Path
    shard: tuple[int, int] = (0, 1)  # (I, N): images I, I+N, ...
    limit: int | None = None  # only the first N regions of the shard
    batch_size: int = 1  # rows per compiled program call
    images_per_call: int = 1
    generation: GenerationSettings | None = None  # None: the model's defaults (its sampler.json)
    question: str = DEFAULT_QUESTION
    reference_parser: bool = False

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise PDLMError(f"--limit {self.limit}: expected a positive number of regions.")
        for flag, value in (("--batch-size", self.batch_size), ("--images-per-call", self.images_per_call)):
            if not isinstance(value, int) or value < 1:
                raise PDLMError(f"{flag} {value}: expected a positive integer.")
        if not self.image_root.is_dir():
            raise PDLMError(f"--image-root {self.image_root}: not a folder.")

    @classmethod
    def from_args(cls, args: argparse.Namespace, generation: GenerationSettings | None = None) -> DatasetSettings:
        """From pdlm-infer's flags (the dataset-mode ones of `add_annotation_args`); `generation`: the generation
        flags resolved against the checkpoint (`infer.cli.generation_settings`), else over the defaults."""
        if args.annotations is None:
            raise PDLMError("dataset mode needs --annotations FILE.")
        if args.output is None:
            raise PDLMError("--annotations needs --output results.jsonl (the file is resumed if it exists).")
        return cls(
            annotations=args.annotations, output=args.output,
            image_root=args.image_root if args.image_root is not None else args.annotations.parent,
            summary=args.summary if args.summary is not None else args.output.parent / "summary.json",
            shard=_parse_shard(args.shard), limit=args.limit, batch_size=args.batch_size,
            images_per_call=args.images_per_call if args.images_per_call is not None else args.batch_size,
            generation=generation or resolve(gen_length=args.gen_length, steps=args.steps,
                                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                             cache=args.cache, unmask=args.unmask),
            question=args.prompt, reference_parser=args.reference_parser)

    def caption_kwargs(self) -> dict:
        """The arguments of `caption_batch` after the items."""
        return dict(settings=self.generation, question=self.question, reference_parser=self.reference_parser,
                    batch_size=self.batch_size)


def select_regions(entries: list[ImageEntry], shard: tuple[int, int],
                   limit: int | None) -> list[tuple[ImageEntry, list[str]]]:
    """(image, ids of its selected regions) for the images of this shard (round-robin over the file order),
    keeping only the first `limit` regions in file order."""
    i, n = shard
    selected = []
    budget = limit if limit is not None else sum(len(e.regions) for e in entries)
    for entry in entries[i::n]:
        ids = [r.ann_id for r in entry.regions][:budget]
        budget -= len(ids)
        if ids:
            selected.append((entry, ids))
    return selected


def run_annotations(settings: DatasetSettings, handle) -> int:
    """Caption every selected region of settings.annotations into settings.output. Returns 0, or 1 if some
    regions failed (listed in the summary). Raises PDLMError for an unusable annotation file (exit code 2).

    `handle` is a model handle (`pdlm_jax.load(...)`) or a function returning one, called only after the
    annotation file has been checked and only if there is work (so mistakes show before a large model loads)."""
    started = time.perf_counter()
    selection = select_regions(load_annotations(settings.annotations, settings.image_root), settings.shard,
                               settings.limit)
    with exclusive_lock(settings.output):  # two runs appending to one file would duplicate records
        return _run_selection(settings, handle, selection, started)


def _run_selection(settings: DatasetSettings, handle, selection, started: float) -> int:
    selected_ids = {a for _, ids in selection for a in ids}
    results = ResultsFile(settings.output, retry_ids=selected_ids)
    skipped = len(selected_ids & results.done.keys())
    pending = [(entry, todo) for entry, ids in selection if (todo := set(ids) - results.done.keys())]
    if pending and not hasattr(handle, "caption_batch") and callable(handle):
        from pdlm_jax.api import captioner

        handle = captioner(handle())  # load the model only when there is work

    stats = _Stats()
    bar = tqdm(total=len(selected_ids), initial=skipped, unit="region", desc="captioning", dynamic_ncols=True)
    try:
        for start in range(0, len(pending), settings.images_per_call):
            records = _caption_images(pending[start:start + settings.images_per_call], handle, settings, stats)
            results.append(records)
            results.done.update((r["ann_id"], r) for r in records if "error" not in r)
            stats.errors.extend(r for r in records if "error" in r)
            bar.update(len(records))
    finally:
        bar.close()
        results.close()

    generation_seconds = stats.seconds - stats.compile_seconds
    summary = {
        "annotations": str(settings.annotations), "output": str(settings.output),
        "shard": f"{settings.shard[0]}/{settings.shard[1]}", "limit": settings.limit,
        "images": len(selection),
        "regions": len(selected_ids),
        "captioned": len(selected_ids & results.done.keys()),
        "resumed": skipped,
        "captioned_this_run": stats.captioned,
        "errors": len(stats.errors),
        "calls": stats.calls,
        "call_seconds": stats.seconds,  # wall time of the caption_batch calls, compilation included
        "compile_seconds": stats.compile_seconds,
        "generation_seconds": generation_seconds,
        "forwards": stats.forwards,  # denoising forwards of every pass (a batch of passes shares them)
        "tokens_per_forward": stats.tokens / stats.forwards if stats.forwards else None,
        "regions_per_second": stats.captioned / generation_seconds if generation_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - started,
        "settings": {**_generation_record(settings.generation, handle), "prompt": settings.question,
                     "batch_size": settings.batch_size, "images_per_call": settings.images_per_call},
        "error_list": stats.errors,
    }
    atomic_write(settings.summary, (json.dumps(summary, indent=2) + "\n").encode())
    _print_summary(summary, settings.summary)
    return 1 if stats.errors else 0


def _generation_record(generation: GenerationSettings | None, handle) -> dict:
    """The generation settings of the run as its summary reports them (the CLI's cache / unmask spellings)."""
    generation = generation or getattr(handle, "defaults", None)
    if generation is None:  # no work, so the model was never loaded
        return {}
    record = generation.record()
    return {k: v for k, v in record.items() if k != "mode"} | generation.mode.arguments


class _Stats:
    def __init__(self):
        self.calls = 0
        self.captioned = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0
        self.forwards = 0
        self.tokens = 0
        self.errors: list[dict] = []


@dataclasses.dataclass
class _Job:
    """One image of a call: its decodable regions (annotation-index order), their masks, its records so far."""

    entry: ImageEntry
    todo: set[str]
    image: Image.Image | None = None
    regions: list[Region] = dataclasses.field(default_factory=list)
    masks: list[np.ndarray] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)

    def fail(self, regions, message: str) -> None:
        self.records += [{"ann_id": r.ann_id, "image_id": self.entry.image_id, "error": message}
                         for r in regions if r.ann_id in self.todo]


def _caption_images(window: list[tuple[ImageEntry, set[str]]], handle, settings: DatasetSettings,
                    stats: _Stats) -> list[dict]:
    """Caption the `todo` regions of a few images in one caption_batch call; their records, in file order."""
    jobs = [_prepare(entry, todo) for entry, todo in window]
    _caption([j for j in jobs if any(r.ann_id in j.todo for r in j.regions)], handle, settings, stats)
    return [record for job in jobs for record in job.records]


def _prepare(entry: ImageEntry, todo: set[str]) -> _Job:
    """Load the image and decode *every* region (the passes must not depend on what is already done)."""
    job = _Job(entry, todo)
    try:
        job.image = load_image(entry.source)
    except PDLMError as e:
        job.fail(entry.regions, f"{entry.record.where}: {e}")
        return job
    for region in sorted(entry.regions, key=lambda r: r.index):  # area ties: the higher index first
        try:
            job.masks.append(region_mask(entry.record, region, (job.image.height, job.image.width)))
            job.regions.append(region)
        except PDLMError as e:  # the message names file, record and mask
            job.fail([region], str(e))
    return job


def _caption(jobs: list[_Job], handle, settings: DatasetSettings, stats: _Stats) -> None:
    """One caption_batch call for `jobs`; if it fails, each image alone, so that only the bad ones fail."""
    if not jobs:
        return
    try:
        outs = handle.caption_batch([(job.image, job.masks) for job in jobs], **settings.caption_kwargs())
    except PDLMError as e:
        if len(jobs) == 1:
            jobs[0].fail(jobs[0].regions, f"{jobs[0].entry.record.where}: {e}")
        else:
            for job in jobs:
                _caption([job], handle, settings, stats)
        return
    stats.calls += 1
    stats.seconds += outs[0]["seconds"]  # every result carries the call's seconds
    stats.compile_seconds += outs[0]["compile_seconds"]
    for job, out in zip(jobs, outs):
        stats.forwards += out["forwards"]
        stats.tokens += sum(len(res["token_ids"]) for res in out["regions"])
        # in pass order: chunk, then prompt id (= area rank within the pass)
        for region, res in sorted(zip(job.regions, out["regions"]), key=lambda p: (p[1]["chunk"], p[1]["prompt_id"])):
            if region.ann_id in job.todo:
                job.records.append({"ann_id": region.ann_id, "image_id": job.entry.image_id,
                                    "caption": res["caption"], "token_ids": [int(t) for t in res["token_ids"]],
                                    "seconds": out["seconds"], "forwards": out["forwards"]})
                stats.captioned += 1


def _print_summary(summary: dict, summary_path) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [(k, fmt(v)) for k, v in summary.items() if k not in ("error_list", "settings")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for err in summary["error_list"][:20]:
        print(f"  error {err['ann_id']}: {err['error']}")
    if len(summary["error_list"]) > 20:
        print(f"  ... {len(summary['error_list']) - 20} more errors in {summary_path}")
    print(f"summary written to {summary_path}")
