"""Where training records come from: annotation files (every record validated when the files load) and the
synthetic task; `make_sources` picks them from the data config. A source is a random-access list of `Record`s;
`build_items` splits each record into the mask groups (items) the pipeline shuffles.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pdlm_jax import annotation_files
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path
from train.config import DataConfig
from train.samples import Limits, Record, groups_per_record

MIN_IMAGE_SIDE = 10  # the reference skips smaller images


class AnnotationSource:
    """Records of one or more annotation files (`pdlm_jax.annotation_files`), every one validated when loaded:
    image readable and large enough, RLEs well-formed and non-empty, one non-empty caption per mask, and (given
    `limits`) the longest sample within the largest buckets. A bad record raises a PDLMError naming its file
    and record, or with on_bad_record="skip" is left out and counted in `skipped`."""

    def __init__(self, paths: Sequence[str | Path], image_root: str | None = None, limits: Limits | None = None,
                 on_bad_record: str = "error"):
        self.name = ", ".join(map(str, paths))
        self.records: list[tuple[annotation_files.ImageRecord, Any]] = []  # (record, image path or data URL)
        self.skipped: list[str] = []  # messages of the records left out
        self.image_root = image_root
        for path in paths:
            path = as_path(path)
            for i, raw in enumerate(annotation_files.read_records(path)):
                with bad_record_policy(on_bad_record, self.skipped):
                    record = annotation_files.parse_record(raw, i, path)
                    self.records.append((record, self._validate(record, path.parent, limits)))

    def _validate(self, record: annotation_files.ImageRecord, base, limits: Limits | None) -> Any:
        """The record's image (path or data URL) if the record is usable for training, else PDLMError."""
        if not record.regions:
            raise PDLMError(f"{record.where}: no masks; a training record needs at least one")
        annotation_files.check_masks(record)
        captions = [r.caption for r in record.regions]
        if all(c is None for c in captions):
            raise PDLMError(f"{record.where}: no captions; give 'captions' with 'mask_rles', or a 'caption' in "
                            "each of 'annotations'")
        for region in record.regions:
            if not isinstance(region.caption, str) or not region.caption.strip():
                raise PDLMError(f"{record.where}: caption {region.index} must be a non-empty string, not "
                                f"{region.caption!r}")
        try:
            image = resolve_image(record.image, base, self.image_root)
            with open_image_file(image) as im:  # reads the header only
                w, h = im.size
            if min(w, h) < MIN_IMAGE_SIDE:
                raise PDLMError(f"image is {w}x{h}; images must be at least {MIN_IMAGE_SIDE} px per side")
            if limits is not None:
                tiles, length, answer = limits.longest_sample((w, h), captions)
                if tiles > limits.max_tiles:
                    raise PDLMError(f"the image needs {tiles} tiles but the largest of data.tile_buckets is "
                                    f"{limits.max_tiles}")
                if length > limits.max_length:
                    raise PDLMError(f"its longest sample has {length} tokens but the largest of "
                                    f"data.length_buckets is {limits.max_length}; add a larger bucket or shorten "
                                    "the captions")
                if limits.max_answer is not None and answer > limits.max_answer:
                    raise PDLMError(f"its longest answer has {answer} tokens but the largest of data.answer_buckets "
                                    f"is {limits.max_answer}; add a larger bucket or shorten the captions")
        except PDLMError as e:
            raise PDLMError(f"{record.where}: {e}") from None
        return image

    def __len__(self) -> int:
        return len(self.records)

    def label(self, index: int) -> str:
        return self.records[index][0].where

    def num_masks(self, index: int) -> int:
        return len(self.records[index][0].regions)

    def __getitem__(self, index: int) -> Record:
        record, image_ref = self.records[index]
        with open_image_file(image_ref) as im:
            try:
                image = im.convert("RGB")
            except OSError as e:
                raise PDLMError(f"{record.where}: cannot read the image ({e})") from e
        hw = (image.height, image.width)
        masks = [annotation_files.region_mask(record, r, hw, resize=True) for r in record.regions]
        return Record(image, masks, [r.caption for r in record.regions])


@contextlib.contextmanager
def bad_record_policy(on_bad_record: str, skipped: list[str]):
    """Around the reading of one record: a PDLMError stops (naming the policy), or with "skip" is kept in
    `skipped` and the record left out."""
    try:
        yield
    except PDLMError as e:
        if on_bad_record != "skip":
            raise PDLMError(f"{e} (data.on_bad_record: skip leaves bad records out)") from e
        skipped.append(str(e))


def resolve_image(value: str, base, image_root: str | None = None) -> Any:
    """A record's image: a data URL as it is, a path tried against the working directory, image_root, then
    `base` (the annotation file's folder); PDLMError if none exists."""
    if value.startswith("data:"):
        return value
    candidates = [as_path(value)] + ([as_path(image_root) / value] if image_root else []) + [base / value]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise PDLMError(f"image {value!r} not found (looked in the working directory"
                        f"{', data.image_root' if image_root else ''} and {base}); set data.image_root")
    return found


@contextlib.contextmanager
def open_image_file(ref: Any):
    """A lazily opened PIL image from a data URL or an epath path; PDLMError if unreadable."""
    try:
        if isinstance(ref, str):  # data URL
            source = io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))
        else:
            source = io.BytesIO(ref.read_bytes()) if "://" in str(ref) else str(ref)
        with Image.open(source) as im:
            yield im
    except (OSError, ValueError, IndexError, binascii.Error) as e:
        raise PDLMError(f"cannot read the image {str(ref)[:200]} ({e})") from e


class SyntheticRecords:
    """The synthetic demo task (train.synthetic) as records."""

    def __init__(self, num_scenes: int, seed: int = 0, rotated: float = 0.0, task: str = "shapes"):
        from train import synthetic

        self.name = "synthetic task"
        self.scenes = synthetic.SyntheticSource(num_scenes, seed, rotated, task)
        self.max_masks = synthetic.MAX_SHAPES

    def __len__(self) -> int:
        return len(self.scenes)

    def num_masks(self, index: int) -> int:
        return len(self.scenes[index]["masks"])

    def label(self, index: int) -> str:
        return f"synthetic scene {index}"

    def __getitem__(self, index: int) -> Record:
        r = self.scenes[index]
        return Record(Image.fromarray(r["image"]), r["masks"], r["captions"])


def make_sources(cfg: DataConfig, limits: Limits | None = None) -> list[AnnotationSource | SyntheticRecords]:
    """The data sources: all annotation files as one, or (with data.weights) each file on its own, plus the
    synthetic task if data.synthetic_scenes > 0."""
    if not cfg.annotations and cfg.synthetic_scenes <= 0:
        raise PDLMError("no training data: set data.annotations (JSON files) and/or data.synthetic_scenes")
    mixed = bool(cfg.weights)
    n_sources = (len(cfg.annotations) if mixed else min(len(cfg.annotations), 1)) + (cfg.synthetic_scenes > 0)
    if (n_sources > 1 or mixed) and len(cfg.weights) != n_sources:
        raise PDLMError(f"data.weights: give one weight per annotation file{' plus one for the synthetic task' if cfg.synthetic_scenes > 0 else ''} "
                        f"({n_sources} in all) to mix them, got {list(cfg.weights)}")
    files = [[f] for f in cfg.annotations] if mixed else ([list(cfg.annotations)] if cfg.annotations else [])
    sources: list = [AnnotationSource(f, cfg.image_root, limits, cfg.on_bad_record) for f in files]
    for source in sources:
        if not source.records:
            raise PDLMError(f"no usable training records in {source.name}" + (
                f" ({len(source.skipped)} skipped; first: {source.skipped[0]})" if source.skipped else ""))
    if cfg.synthetic_scenes > 0:
        sources.append(SyntheticRecords(cfg.synthetic_scenes, cfg.synthetic_seed, cfg.synthetic_rotated,
                                        cfg.synthetic_task))
    return sources


def build_items(source, divisor: float) -> np.ndarray:
    """(N, 3) int array of (record, group, num_groups): each record split into its mask groups (SPEC §11.3.1)."""
    if isinstance(source, SyntheticRecords) and groups_per_record(source.max_masks, divisor) == 1:
        return np.stack([np.arange(len(source)), np.zeros(len(source), int), np.ones(len(source), int)], 1)
    items = []
    for r in range(len(source)):
        n = groups_per_record(source.num_masks(r), divisor)
        items += [(r, q, n) for q in range(n)]
    return np.asarray(items, dtype=np.int64).reshape(-1, 3)
