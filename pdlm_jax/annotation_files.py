"""Region-annotation files: the one reader of pdlm-train (SPEC §11.2) and the dataset runner (SPEC §13.1).

A file is a JSON list of image records in one of three schemas:

* ParaDLC-Bench: `{file_name, image_id, annotations: [{index, mask_rle, ...}]}`, no captions; the bench
  opens `image_root/basename(file_name)`.
* training, variant A: `{image_file | image | image_path, mask_rles: [RLE] or RLE, captions: [str]}`.
* training, variant B: `{image_file | image | image_path, annotations: [{caption, segmentation}]}`, where a
  null segmentation is the whole image.

Training records may carry `image_id` / `image_name` / `image_key`; without one the record's position is its
id. A region's id is `{image_id}_{index}` (index: ParaDLC's `index`, else the position in the record).

`parse_record` checks the structure; `check_masks` validates every RLE without decoding it and `decode_mask`
decodes one, both strictly (pycocotools decodes a corrupt counts string from uninitialised memory instead of
failing). Every error is a PDLMError naming the file and the record (position and id).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.masks import check_rle, decode_rle

IMAGE_KEYS = ("image_file", "image", "image_path")  # SPEC §11.2, in the reference loader's order
ID_KEYS = ("image_id", "image_name", "image_key")


@dataclasses.dataclass(frozen=True)
class Region:
    index: int  # ParaDLC's `index`, else the position in the record
    ann_id: str  # f"{image_id}_{index}"
    rle: Any  # a COCO compressed RLE (checked by check_masks / decode_mask); None = the whole image
    caption: str | None  # None where the schema has none (ParaDLC-Bench)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    file: str  # the annotation file
    position: int  # in the file
    image_id: str
    image: str  # a path (relative ones: to an image root) or a `data:` URL
    regions: tuple[Region, ...]
    explicit_id: bool = True  # False: the id is the position (not repeated in messages)

    @property
    def where(self) -> str:
        return _where(self.file, self.position, self.image_id if self.explicit_id else None)


def _where(file: Any, position: int, image_id: str | None = None) -> str:
    """How messages name a record: "FILE record I (image_id X)"."""
    return f"{file} record {position}" + (f" (image_id {image_id!r})" if image_id is not None else "")


def read_records(path: Any) -> list:
    """The raw records of an annotation file (a pathlib or epath path); PDLMError if it is unusable."""
    path = path if hasattr(path, "read_text") else Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PDLMError(f"annotation file {path}: cannot read it ({e.strerror or e}).") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PDLMError(f"annotation file {path}: not a JSON file ({e}).") from e
    if not isinstance(data, list):
        raise PDLMError(f"annotation file {path}: expected a JSON list of image records, got {type(data).__name__}.")
    return data


def parse_record(raw: Any, position: int, file: Any) -> ImageRecord:
    """One record of `file` in any of the schemas; PDLMError naming the record if it is malformed."""
    if not isinstance(raw, dict):
        raise PDLMError(f"{_where(file, position)} is not a JSON object.")
    paradlc = "file_name" in raw
    key = "file_name" if paradlc else next((k for k in IMAGE_KEYS if k in raw), None)
    image = raw.get(key)
    if paradlc:  # ids default to the file's stem
        image_id = raw.get("image_id", Path(str(image)).stem)
    else:
        image_id = next((raw[k] for k in ID_KEYS if raw.get(k) is not None), None)
    explicit = image_id is not None
    image_id = str(image_id) if explicit else str(position)
    where = _where(file, position, image_id if explicit else None)
    if key is None:
        raise PDLMError(f"{where} names no image: expected 'file_name' (ParaDLC-Bench) or one of "
                        f"{', '.join(IMAGE_KEYS)} (training schema), a path or data URL.")
    if not isinstance(image, str):
        raise PDLMError(f"{where}: '{key}' must be a path or a data URL string.")
    if paradlc:
        image = os.path.basename(image)
    masks = _masks(raw, where, paradlc)
    regions = tuple(Region(index, f"{image_id}_{index}", rle, caption) for index, rle, caption in masks)
    return ImageRecord(str(file), position, image_id, image, regions, explicit)


def _masks(raw: dict, where: str, paradlc: bool) -> list[tuple[int, Any, str | None]]:
    """(index, RLE or None, caption or None) of each region of a record."""
    if paradlc:
        anns = _objects(raw.get("annotations", []), where)
        out = [(a.get("index", i), a.get("mask_rle"), None) for i, a in enumerate(anns)]
        bad = next((i for i, (index, _, _) in enumerate(out) if not isinstance(index, int)), None)
        if bad is not None:
            raise PDLMError(f"{where}: annotation {bad} has a non-integer 'index' {out[bad][0]!r}.")
        return out
    if "mask_rles" in raw:  # variant A
        rles = raw["mask_rles"] if isinstance(raw["mask_rles"], list) else [raw["mask_rles"]]
        captions = raw.get("captions", [None] * len(rles))
        if not isinstance(captions, list) or len(captions) != len(rles):
            raise PDLMError(f"{where}: 'captions' must be a list with one caption per entry of 'mask_rles'.")
        return [(i, rle, c) for i, (rle, c) in enumerate(zip(rles, captions))]
    if "annotations" in raw:  # variant B
        anns = _objects(raw["annotations"], where)
        return [(i, a.get("segmentation"), a.get("caption")) for i, a in enumerate(anns)]
    raise PDLMError(f"{where}: no masks; give 'mask_rles' (+ 'captions') or 'annotations' "
                    "[{'caption', 'segmentation'}].")


def _objects(anns: Any, where: str) -> list[dict]:
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        raise PDLMError(f"{where}: 'annotations' must be a list of objects.")
    return anns


def check_masks(record: ImageRecord) -> None:
    """Validate every RLE of a record without decoding it: well-formed and not empty (PDLMError otherwise)."""
    for region in record.regions:
        if region.rle is None:
            continue
        try:
            nonempty = check_rle(region.rle)[3]
        except PDLMError as e:
            raise PDLMError(f"{record.where}: mask {region.index}: {e}") from None
        if not nonempty:
            raise PDLMError(f"{record.where}: mask {region.index} is empty (all zeros); every mask must cover "
                            "at least one pixel.")


def decode_mask(rle: Any, image_hw: tuple[int, int], resize: bool = False) -> np.ndarray:
    """A region's (H, W) bool mask; None is the whole image. PDLMError for a corrupt or empty RLE, or one of
    another size than the image unless `resize` (the reference's training loader resizes with NEAREST)."""
    if rle is None:
        return np.ones(image_hw, bool)
    mask = decode_rle(rle)
    if not mask.any():
        raise PDLMError("empty mask: a region needs at least one pixel.")
    if mask.shape != tuple(image_hw):
        if not resize:
            raise PDLMError(f"mask size {mask.shape[0]}x{mask.shape[1]} does not match the image size "
                            f"{image_hw[0]}x{image_hw[1]}.")
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(image_hw[::-1], Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 0
    return mask


def region_mask(record: ImageRecord, region: Region, image_hw: tuple[int, int], resize: bool = False) -> np.ndarray:
    """`decode_mask` of one region of `record`, its errors naming the file, record and mask."""
    try:
        return decode_mask(region.rle, image_hw, resize)
    except PDLMError as e:
        raise PDLMError(f"{record.where}: mask {region.index}: {e}") from None
