"""Resumable batch captioning over region-annotation files (SPEC §13 ParaDLC-Bench, §11.2 training schema).

`pdlm-infer --annotations FILE --image-root DIR --output results.jsonl` captions every region of a file and
appends one JSON line per region to the output:

    {"ann_id", "image_id", "caption", "token_ids", "seconds", "forwards"}     (success)
    {"ann_id", "image_id", "error"}                                          (bad image / RLE / model input)

`seconds` and `forwards` are those of the `caption_regions` call that captioned the region (one call serves up to
`prompt_numbers` = 6 regions of one image, so they are shared by the regions of a chunk).

Determinism: images are processed in file order; the regions of an image are sorted by mask area (descending;
ties put the higher annotation index first, the reference's reversed argsort, SPEC §6.4) and cut into chunks of
<= 6, exactly as `caption_regions` chunks the masks of one call. Chunks are always formed from *all* decodable regions of
the image, whatever is already done or selected, so a region gets the same caption whether the run was
interrupted, limited or sharded (captions of a chunk depend on each other).

Resume: records are written and fsync'd per chunk, so a killed run loses at most the chunk in flight. A rerun
with the same output keeps the successful records, skips their ids, drops a torn tail (a partial last line left
by a kill) and *retries error records*: errors are usually fixable input (a missing image copied in later), so
the old error lines of the selected ids are removed before the run and re-recorded only if they fail again. The
file therefore ends with at most one line per region.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from infer.files import atomic_write, exclusive_lock
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.masks import decode_rle as strict_decode_rle
from pdlm_jax.regions.tiling import tile_image

REGIONS_PER_CALL = 6  # prompt_numbers of PerceptionDLM (used when the handle does not expose its config)
_TRAINING_IMAGE_KEYS = ("image_file", "image", "image_path")  # SPEC §11.2, in the loader's order
_TRAINING_ID_KEYS = ("image_id", "image_name", "image_key")


# ----------------------------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class Region:
    ann_id: str
    index: int  # tie-break of the area sort
    rle: dict | None  # COCO compressed RLE; None = the whole image (training schema, null segmentation)


@dataclass(frozen=True)
class ImageEntry:
    image_id: str
    source: str  # a file path or a `data:...;base64,` URL
    regions: tuple[Region, ...]


def load_annotations(path: str | os.PathLike, image_root: str | os.PathLike) -> list[ImageEntry]:
    """Read a ParaDLC-Bench or training-schema annotation file; raises PDLMError if it is unusable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PDLMError(f"--annotations {path}: cannot read the file ({e.strerror}).") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PDLMError(f"--annotations {path}: not a JSON file ({e}).") from e
    if not isinstance(data, list):
        raise PDLMError(f"--annotations {path}: expected a JSON list of image records, got {type(data).__name__}.")
    entries = [_parse_record(rec, i, Path(image_root), path) for i, rec in enumerate(data)]
    seen: set[str] = set()
    for entry in entries:
        for region in entry.regions:
            if region.ann_id in seen:
                raise PDLMError(f"--annotations {path}: region id {region.ann_id!r} occurs twice; ids "
                                "(image_id + '_' + index) must be unique for results to be resumable.")
            seen.add(region.ann_id)
    return entries


def _parse_record(rec, position: int, image_root: Path, path: Path) -> ImageEntry:
    where = f"--annotations {path}: record {position}"
    if not isinstance(rec, dict):
        raise PDLMError(f"{where} is not a JSON object.")
    if "file_name" in rec:  # ParaDLC-Bench (SPEC §13.1); the script opens image_root/basename(file_name)
        anns = rec.get("annotations", [])
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise PDLMError(f"{where}: 'annotations' must be a list of objects.")
        image_id = str(rec.get("image_id", Path(rec["file_name"]).stem))
        regions = []
        for i, ann in enumerate(anns):
            index = ann.get("index", i)
            if not isinstance(index, int):
                raise PDLMError(f"{where}: annotation {i} has a non-integer 'index' {index!r}.")
            regions.append(Region(f"{image_id}_{index}", index, ann.get("mask_rle")))
        return ImageEntry(image_id, str(image_root / os.path.basename(rec["file_name"])), tuple(regions))

    key = next((k for k in _TRAINING_IMAGE_KEYS if k in rec), None)
    if key is None:
        raise PDLMError(f"{where} names no image: expected 'file_name' (ParaDLC-Bench) or one of "
                        f"{', '.join(_TRAINING_IMAGE_KEYS)} (training schema).")
    source = rec[key]
    if not isinstance(source, str):
        raise PDLMError(f"{where}: '{key}' must be a path or a data URL string.")
    if not source.startswith("data:"):
        source = str(image_root / source)  # an absolute path stays as it is
    id_key = next((k for k in _TRAINING_ID_KEYS if rec.get(k) is not None), None)
    image_id = str(rec[id_key]) if id_key else str(position)
    if "mask_rles" in rec:  # variant A: a list of RLEs (or a single one) aligned with 'captions'
        rles = rec["mask_rles"] if isinstance(rec["mask_rles"], list) else [rec["mask_rles"]]
    else:  # variant B: annotations [{caption, segmentation}], null segmentation = whole image
        anns = rec.get("annotations", [])
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise PDLMError(f"{where}: 'annotations' must be a list of objects.")
        rles = [ann.get("segmentation") for ann in anns]
    return ImageEntry(image_id, source, tuple(Region(f"{image_id}_{i}", i, r) for i, r in enumerate(rles)))


def decode_rle(rle: dict | None, image_hw: tuple[int, int]) -> np.ndarray:
    """A region's (H, W) bool mask; None means the whole image. Raises PDLMError for a corrupt or unusable RLE."""
    if rle is None:
        return np.ones(image_hw, bool)
    mask = strict_decode_rle(rle)
    if mask.shape != tuple(image_hw):
        raise PDLMError(f"mask size {mask.shape[0]}x{mask.shape[1]} does not match the image size "
                        f"{image_hw[0]}x{image_hw[1]}.")
    if not mask.any():
        raise PDLMError("empty mask: a region needs at least one pixel.")
    return mask


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
    """The JSONL output: recovers from a torn tail, drops error lines to retry, appends whole chunks durably."""

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


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise PDLMError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4.")
    return i, n


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


def run_annotations(args: argparse.Namespace, handle) -> int:
    """Caption every selected region of args.annotations into args.output. Returns 0, or 1 if some regions
    failed (listed in the summary). Raises PDLMError for unusable arguments or annotation files (exit code 2).

    `handle` is a model handle (`pdlm_jax.load(...)`) or a function returning one, called only after the
    arguments and the annotation file have been checked (so mistakes show before a large model loads)."""
    started = time.perf_counter()
    if args.annotations is None:
        raise PDLMError("dataset mode needs --annotations FILE.")
    if args.output is None:
        raise PDLMError("--annotations needs --output results.jsonl (the file is resumed if it exists).")
    if args.limit is not None and args.limit < 1:
        raise PDLMError(f"--limit {args.limit}: expected a positive number of regions.")
    shard = _parse_shard(args.shard)
    image_root = args.image_root if args.image_root is not None else args.annotations.parent
    if not image_root.is_dir():
        raise PDLMError(f"--image-root {image_root}: not a folder.")
    summary_path = args.summary if args.summary is not None else args.output.parent / "summary.json"

    selection = select_regions(load_annotations(args.annotations, image_root), shard, args.limit)
    with exclusive_lock(Path(args.output)):  # two runs appending to one file would duplicate records
        return _run_selection(args, handle, selection, shard, summary_path, started)


def _run_selection(args: argparse.Namespace, handle, selection, shard, summary_path: Path, started: float) -> int:
    selected_ids = {a for _, ids in selection for a in ids}
    results = ResultsFile(Path(args.output), retry_ids=selected_ids)
    skipped = len(selected_ids & results.done.keys())
    pending = [(entry, todo) for entry, ids in selection if (todo := set(ids) - results.done.keys())]
    if pending and not hasattr(handle, "caption_regions") and callable(handle):
        handle = handle()  # load the model only when there is work

    stats = _Stats()
    bar = tqdm(total=len(selected_ids), initial=skipped, unit="region", desc="captioning", dynamic_ncols=True)
    try:
        for entry, todo in pending:
            _caption_image(entry, todo, handle, args, results, stats, bar)
    finally:
        bar.close()
        results.close()

    generation_seconds = stats.seconds - stats.compile_seconds
    summary = {
        "annotations": str(args.annotations), "output": str(args.output), "shard": f"{shard[0]}/{shard[1]}",
        "limit": args.limit,
        "images": len(selection),
        "regions": len(selected_ids),
        "captioned": len(selected_ids & results.done.keys()),
        "resumed": skipped,
        "captioned_this_run": stats.captioned,
        "errors": len(stats.errors),
        "call_seconds": stats.seconds,  # wall time of the caption_regions calls, compilation included
        "compile_seconds": stats.compile_seconds,
        "generation_seconds": generation_seconds,
        "forwards": stats.forwards,
        "tokens_per_forward": stats.tokens / stats.forwards if stats.forwards else None,
        "regions_per_second": stats.captioned / generation_seconds if generation_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - started,
        "settings": {k: getattr(args, k, None)
                     for k in ("gen_length", "steps", "temperature", "top_p", "prompt", "cache", "unmask")},
        "error_list": stats.errors,
    }
    atomic_write(Path(summary_path), (json.dumps(summary, indent=2) + "\n").encode())
    _print_summary(summary, summary_path)
    return 1 if stats.errors else 0


class _Stats:
    def __init__(self):
        self.captioned = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0
        self.forwards = 0
        self.tokens = 0
        self.errors: list[dict] = []


def _caption_image(entry: ImageEntry, todo: set[str], handle, args, results: ResultsFile, stats: _Stats,
                   bar: tqdm) -> None:
    """Caption the `todo` regions of one image: load and tile it once, then one call per chunk."""

    def fail(ids, error: PDLMError):
        records = [{"ann_id": a, "image_id": entry.image_id, "error": str(error)} for a in ids]
        results.append(records)
        stats.errors.extend(records)
        bar.update(len(records))

    try:
        image = load_image(entry.source)
    except PDLMError as e:
        fail([r.ann_id for r in entry.regions if r.ann_id in todo], e)
        return
    hw = (image.height, image.width)
    masks, areas = {}, {}
    for region in entry.regions:  # every region, so that chunks do not depend on what is already done
        try:
            masks[region.ann_id] = decode_rle(region.rle, hw)
            areas[region.ann_id] = int(masks[region.ann_id].sum())
        except PDLMError as e:
            if region.ann_id in todo:
                fail([region.ann_id], e)
    ordered = sorted((r for r in entry.regions if r.ann_id in masks), key=lambda r: (-areas[r.ann_id], -r.index))
    try:
        tiled = _tile_once(handle, image)
    except PDLMError as e:
        fail([r.ann_id for r in ordered if r.ann_id in todo], e)
        return
    cfg = getattr(handle, "cfg", None)
    per_call = cfg.region.prompt_numbers if cfg is not None else REGIONS_PER_CALL
    for number, start in enumerate(range(0, len(ordered), per_call)):
        chunk = ordered[start:start + per_call]
        if not any(r.ann_id in todo for r in chunk):
            continue
        try:
            out = handle.caption_regions(
                tiled, [masks[r.ann_id] for r in chunk], gen_length=args.gen_length, steps=args.steps,
                temperature=args.temperature, top_p=args.top_p, question=args.prompt,
                seed=getattr(args, "seed", 0) + number,  # as caption_regions seeds its own chunks
                reference_parser=getattr(args, "reference_parser", False),
                cache=getattr(args, "cache", "none"), unmask=getattr(args, "unmask", "remask"))
        except PDLMError as e:
            fail([r.ann_id for r in chunk if r.ann_id in todo], e)
            continue
        records = [
            {"ann_id": r.ann_id, "image_id": entry.image_id, "caption": res["caption"],
             "token_ids": [int(t) for t in res["token_ids"]], "seconds": out["seconds"], "forwards": out["forwards"]}
            for r, res in zip(chunk, out["regions"]) if r.ann_id in todo
        ]
        results.append(records)
        results.done.update((r["ann_id"], r) for r in records)
        stats.captioned += len(records)
        stats.seconds += out["seconds"]
        stats.compile_seconds += out["compile_seconds"]
        stats.forwards += out["forwards"]
        stats.tokens += sum(len(res["token_ids"]) for res in out["regions"])
        bar.update(len(records))


def _tile_once(handle, image: Image.Image):
    """The image tiled once for all its chunks when the handle exposes its config (the real model does)."""
    cfg = getattr(handle, "cfg", None)
    return image if cfg is None else tile_image(image, cfg.region)


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
