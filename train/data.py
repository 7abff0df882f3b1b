"""Training data: annotation records -> samples (SPEC §11.2–11.3) -> fixed-shape padded batches (grain).

Pipeline: records (annotation JSON or the synthetic task) are expanded into items (record, group) of at
most ⌈(1+P)/2⌉ masks; a grain `MapDataset` shuffles the items per epoch and turns item `i` into a sample
with randomness seeded by (seed, i) only, so the iterator is deterministic and its state (a position)
is all a checkpoint needs. Batches are padded to the smallest configured (tiles, length) bucket that
fits, so the jitted step sees a handful of shapes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.roi_replay import roi_boxes
from pdlm_jax.regions.masks import area_order, mask_box, patch_activity, visual_prompt_tiles
from pdlm_jax.regions.prompt import DEFAULT_QUESTION, build_layout, build_prompt_text
from pdlm_jax.regions.tiling import open_rgb, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer

IGNORE = -100  # label of positions without a target
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n"
MIN_IMAGE_SIDE = 10  # the reference skips smaller images


@dataclasses.dataclass(frozen=True)
class DataConfig:
    annotations: tuple[str, ...] = ()  # JSON files in the SPEC §11.2 schema
    synthetic_scenes: int = 0  # >0: use that many scenes of the synthetic task instead (train.synthetic)
    synthetic_seed: int = 0
    synthetic_rotated: float = 0.0  # fraction of synthetic squares and triangles drawn at any angle
    image_root: str | None = None  # relative image paths: tried against cwd, this, then the JSON's folder
    batch_size: int = 8  # global batch (all processes, before gradient accumulation)
    epochs: int = 1
    seed: int = 0
    # Items per image: ceil(n_masks / group_divisor); the reference uses (1 + prompt_numbers) / 2 = 3.5,
    # i.e. at most 4 masks per sample. The demo raises it to train with up to 6 masks like inference.
    group_divisor: float = 3.5
    # The reference gives each sample's masks a random permutation of the prompt ids (§11.3.5); inference
    # uses id = area rank (§6.4.4). False trains like inference.
    random_prompt_ids: bool = True
    tile_buckets: tuple[int, ...] = (7,)  # padded tile counts (must cover max_tiles + thumbnail)
    length_buckets: tuple[int, ...] = (512,)  # padded sequence lengths
    question: str = DEFAULT_QUESTION
    workers: int = 0  # grain worker processes (0 = in-process)
    threads: int = 2  # grain reader threads per process
    prefetch: int = 16


@dataclasses.dataclass
class Record:
    image: Image.Image
    masks: list[np.ndarray]  # bool (H, W) at the image size
    captions: list[str]


# ---- sources ------------------------------------------------------------------------------------


def _decode_rle(rle: Any, where: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise PDLMError(f"{where}: a mask must be a COCO compressed RLE dict {{'size': [h, w], 'counts': str}}")
    counts = rle["counts"]
    if isinstance(counts, list):
        raise PDLMError(f"{where}: uncompressed (list) RLE counts are not supported; compress the RLE first")
    try:
        return mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str)
                                  else counts}).astype(bool)
    except Exception as e:  # pycocotools raises bare errors on corrupt counts
        raise PDLMError(f"{where}: cannot decode the RLE mask ({e})") from e


def _image_field(raw: dict) -> Any:
    for key in ("image_file", "image", "image_path"):
        if key in raw:
            return raw[key]
    return None


class AnnotationSource:
    """Records of one or more annotation JSON files (a list of dicts each), validated when loaded."""

    def __init__(self, paths: Sequence[str | Path], image_root: str | None = None):
        self.records: list[tuple[dict, Path]] = []
        self.image_root = image_root
        for path in paths:
            path = Path(path)
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PDLMError(f"cannot read annotation file {path}: {e}") from e
            if not isinstance(data, list):
                raise PDLMError(f"annotation file {path} must hold a JSON list of records")
            for i, raw in enumerate(data):
                self._validate(raw, f"{path} record {i}")
                self.records.append((raw, path.parent))
        if not self.records:
            raise PDLMError("no training records: data.annotations lists no records")

    @staticmethod
    def _validate(raw: Any, where: str) -> None:
        if not isinstance(raw, dict) or _image_field(raw) is None:
            raise PDLMError(f"{where}: each record needs an image ('image_file', 'image' or 'image_path')")
        if "mask_rles" in raw:
            rles = raw["mask_rles"]
            n = 1 if isinstance(rles, dict) else len(rles)
            caps = raw.get("captions")
            if not isinstance(caps, list) or len(caps) != n:
                raise PDLMError(f"{where}: 'captions' must be a list with one caption per entry of 'mask_rles'")
        elif "annotations" in raw:
            anns = raw["annotations"]
            if not isinstance(anns, list) or not anns or any(not isinstance(a, dict) or "caption" not in a
                                                             for a in anns):
                raise PDLMError(f"{where}: 'annotations' must be a non-empty list of {{'caption', 'segmentation'}}")
        else:
            raise PDLMError(f"{where}: no masks — give 'mask_rles' + 'captions' or 'annotations'")

    def __len__(self) -> int:
        return len(self.records)

    def num_masks(self, index: int) -> int:
        raw = self.records[index][0]
        if "mask_rles" in raw:
            return 1 if isinstance(raw["mask_rles"], dict) else len(raw["mask_rles"])
        return len(raw["annotations"])

    def _open_image(self, value: Any, base: Path, where: str) -> Image.Image:
        if isinstance(value, str) and value.startswith("data:"):
            try:
                data = base64.b64decode(value.split(",", 1)[1])
                with Image.open(io.BytesIO(data)) as im:
                    return im.convert("RGB")
            except Exception as e:
                raise PDLMError(f"{where}: cannot decode the base64 image ({e})") from e
        if isinstance(value, str):
            candidates = [Path(value)]
            if self.image_root:
                candidates.append(Path(self.image_root) / value)
            candidates.append(base / value)
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise PDLMError(f"{where}: image {value!r} not found (looked in the working directory"
                                f"{', data.image_root' if self.image_root else ''} and {base}); set data.image_root")
            value = path
        return open_rgb(value, f"{where} image")

    def __getitem__(self, index: int) -> Record:
        raw, base = self.records[index]
        where = f"record {index}"
        image = self._open_image(_image_field(raw), base, where)
        w, h = image.size
        if min(w, h) < MIN_IMAGE_SIDE:
            raise PDLMError(f"{where}: image is {w}x{h}; images must be at least {MIN_IMAGE_SIDE} px per side")
        if "mask_rles" in raw:
            rles = raw["mask_rles"]
            rles = [rles] if isinstance(rles, dict) else rles
            masks = [_decode_rle(r, f"{where} mask {i}") for i, r in enumerate(rles)]
            captions = [str(c) for c in raw["captions"]]
        else:
            masks, captions = [], []
            for i, ann in enumerate(raw["annotations"]):
                seg = ann.get("segmentation")
                masks.append(np.ones((h, w), bool) if seg is None else _decode_rle(seg, f"{where} mask {i}"))
                captions.append(str(ann["caption"]))
        masks = [m if m.shape == (h, w) else  # the reference resizes mismatched masks with NEAREST
                 np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
                 for m in masks]
        return Record(image, masks, captions)


class SyntheticRecords:
    """The synthetic demo task (train.synthetic) as records."""

    def __init__(self, num_scenes: int, seed: int = 0, rotated: float = 0.0):
        from train import synthetic

        self.scenes = synthetic.SyntheticSource(num_scenes, seed, rotated)
        self.max_masks = synthetic.MAX_SHAPES

    def __len__(self) -> int:
        return len(self.scenes)

    def num_masks(self, index: int) -> int:
        return len(self.scenes[index]["masks"])

    def __getitem__(self, index: int) -> Record:
        r = self.scenes[index]
        return Record(Image.fromarray(r["image"]), r["masks"], r["captions"])


def make_source(cfg: DataConfig) -> AnnotationSource | SyntheticRecords:
    if cfg.synthetic_scenes > 0:
        return SyntheticRecords(cfg.synthetic_scenes, cfg.synthetic_seed, cfg.synthetic_rotated)
    if not cfg.annotations:
        raise PDLMError("no training data: set data.annotations (JSON files) or data.synthetic_scenes")
    return AnnotationSource(cfg.annotations, cfg.image_root)


# ---- items: deterministic mask groups (SPEC §11.3.1) --------------------------------------------------


def groups_per_record(num_masks: int, divisor: float) -> int:
    return max(1, math.ceil(num_masks / divisor))


def mask_group(num_masks: int, record_index: int, epoch: int, group: int, num_groups: int) -> list[int]:
    """Mask indices of group `group` of record `record_index` in `epoch` (the reference's partition)."""
    order = list(range(num_masks))
    random.Random(record_index * 100003 + epoch * 999983).shuffle(order)
    sizes = [num_masks // num_groups + (1 if q < num_masks % num_groups else 0) for q in range(num_groups)]
    start = sum(sizes[:group])
    return order[start:start + sizes[group]]


def build_items(source, divisor: float) -> np.ndarray:
    """(N, 3) int array of (record, group, num_groups)."""
    if isinstance(source, SyntheticRecords) and groups_per_record(source.max_masks, divisor) == 1:
        return np.stack([np.arange(len(source)), np.zeros(len(source), int), np.ones(len(source), int)], 1)
    items = []
    for r in range(len(source)):
        n = groups_per_record(source.num_masks(r), divisor)
        items += [(r, q, n) for q in range(n)]
    return np.asarray(items, dtype=np.int64).reshape(-1, 3)


# ---- one sample (SPEC §11.3) ---------------------------------------------------------------------


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    return mask_box(mask) if mask.any() else (0.0, 0.0, 0.0, 0.0)  # reference: empty mask -> zeros


def training_text(num_tiles: int, num_image_tokens: int, captions: Sequence[str], question: str) -> tuple[str, str]:
    """(prefix through the assistant header, answer) of the chat template (SPEC §5.1, §11.3.4)."""
    prompt = build_prompt_text(num_tiles, num_image_tokens, len(captions), 0, question)
    prefix = prompt[: prompt.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)]
    answer = "\n".join(f"<|Mask_Cap_{i}|>{c}" for i, c in enumerate(captions)) + "<|eot_id|>"
    return prefix, answer


def build_sample(record: Record, mask_indices: Sequence[int], rng: np.random.Generator, cfg: PDLMConfig,
                 tokenizer: Tokenizer, question: str = DEFAULT_QUESTION,
                 random_prompt_ids: bool = True) -> dict[str, np.ndarray]:
    """One unpadded training sample for the masks `mask_indices` of `record`."""
    region = cfg.region
    tiled = tile_image(record.image, region)
    masks = [record.masks[i] for i in mask_indices]
    captions = [record.captions[i] for i in mask_indices]
    order = area_order([int(m.sum()) for m in masks])
    masks, captions = [masks[i] for i in order], [captions[i] for i in order]
    k = len(masks)
    if random_prompt_ids:  # random.shuffle(range(P))[:k]
        prompt_ids = rng.permutation(region.prompt_numbers)[:k].astype(np.int32)
    else:
        prompt_ids = np.arange(k, dtype=np.int32)
    mask_patches = np.stack([patch_activity(visual_prompt_tiles(m, int(p), tiled.grid, region), region)
                             for m, p in zip(masks, prompt_ids)])

    prefix, answer = training_text(tiled.num_tiles, region.num_image_tokens, captions, question)
    ids, prefix_ids = tokenizer.encode(prefix + answer), tokenizer.encode(prefix)
    n_prefix = len(prefix_ids)
    if not np.array_equal(ids[:n_prefix], prefix_ids):
        raise PDLMError("the tokenizer merges the assistant header with the answer; use the checkpoint's tokenizer")
    layout = build_layout(ids, tokenizer.special, k, region.roi_tokens, 0, tiled.num_tiles * region.num_image_tokens)
    # labels: after the assistant header through the first <|eot_id|> (RoI expansion happened before it)
    start = n_prefix + k * (region.roi_tokens - 1)
    eots = np.flatnonzero(layout.input_ids[start:] == tokenizer.special.eot)
    labels = np.full(layout.length, IGNORE, np.int32)
    end = start + int(eots[0]) + 1
    labels[start:end] = layout.input_ids[start:end]
    return {
        "pixel_values": tiled.pixel_values,
        "mask_patches": mask_patches,
        "prompt_ids": prompt_ids,
        "roi_boxes": roi_boxes(np.array([_box(m) for m in masks]), tiled.grid, region, cfg.quirks, training=True),
        "grid": np.asarray(tiled.grid, np.int32),
        "num_tiles": np.int32(tiled.num_tiles),
        "input_ids": layout.input_ids,
        "labels": labels,
        "image_positions": layout.image_positions,
        "roi_positions": layout.roi_positions,
        "block_id": layout.block_id,
        "roi_owner": layout.roi_owner,
        "prefix_visible": layout.prefix_visible,
        "valid": layout.valid,
    }


# ---- padding into buckets ---------------------------------------------------------------------------


def _bucket(value: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if value <= b:
            return b
    raise PDLMError(f"a training sample needs {value} {what} but the largest bucket is {max(buckets)}; "
                    f"add a larger value to data.{what.replace(' ', '_')}_buckets")


def _pad(a: np.ndarray, shape: Sequence[int], value) -> np.ndarray:
    out = np.full(tuple(shape), value, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


@dataclasses.dataclass(frozen=True)
class Collate:
    """Pad a list of samples to the smallest (tile, length) bucket that fits all of them and stack."""

    tile_buckets: tuple[int, ...]
    length_buckets: tuple[int, ...]
    max_regions: int
    pad_id: int

    def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        T = _bucket(max(s["pixel_values"].shape[0] for s in samples), self.tile_buckets, "tile")
        L = _bucket(max(s["input_ids"].shape[0] for s in samples), self.length_buckets, "length")
        P = self.max_regions
        batch = []
        for s in samples:
            n_img = s["image_positions"].shape[0] // s["pixel_values"].shape[0]
            k, t = s["mask_patches"].shape[:2]
            batch.append({
                "pixel_values": _pad(s["pixel_values"], (T,) + s["pixel_values"].shape[1:], 0),
                "mask_patches": _pad(s["mask_patches"], (P, T) + s["mask_patches"].shape[2:], False),
                "prompt_ids": _pad(s["prompt_ids"], (P,), 0),
                "roi_boxes": _pad(s["roi_boxes"], (P, 4), 0),
                "grid": s["grid"],
                "num_tiles": s["num_tiles"],
                "input_ids": _pad(s["input_ids"], (L,), self.pad_id),
                "labels": _pad(s["labels"], (L,), IGNORE),
                # positions >= L are dropped by the on-device scatter
                "image_positions": _pad(s["image_positions"], (T * n_img,), L),
                "roi_positions": _pad(s["roi_positions"], (P, s["roi_positions"].shape[1]), L),
                "block_id": _pad(s["block_id"], (L,), -1),
                "roi_owner": _pad(s["roi_owner"], (L,), -1),
                "prefix_visible": _pad(s["prefix_visible"], (L,), False),
                "valid": _pad(s["valid"], (L,), False),
            })
        return {key: np.stack([b[key] for b in batch]) for key in batch[0]}


# ---- the grain pipeline ------------------------------------------------------------------------------


class SampleBuilder:
    """grain MapWithIndex transform: (global index, item) -> sample. Picklable for worker processes."""

    def __init__(self, source, data: DataConfig, model: PDLMConfig, tokenizer_path: str, num_items: int):
        self.source, self.data, self.model = source, data, model
        self.tokenizer_path, self.num_items = tokenizer_path, num_items
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, index: int, item: np.ndarray) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        record_index, group, num_groups = (int(v) for v in item)
        epoch = index // self.num_items
        record = self.source[record_index]
        chosen = mask_group(len(record.masks), record_index, epoch, group, num_groups)
        rng = np.random.default_rng([self.data.seed, index])
        return build_sample(record, chosen, rng, self.model, self._tokenizer, self.data.question,
                            self.data.random_prompt_ids)


@dataclasses.dataclass
class Pipeline:
    dataset: grain.IterDataset
    num_items: int
    steps_per_epoch: int


def build_pipeline(data: DataConfig, model: PDLMConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                   process_count: int = 1) -> Pipeline:
    """Deterministic, checkpointable iterator of per-process batches (global batch / process_count)."""
    if data.batch_size % process_count:
        raise PDLMError(f"data.batch_size {data.batch_size} must divide by the number of processes {process_count}")
    source = make_source(data)
    items = build_items(source, data.group_divisor)
    steps_per_epoch = len(items) // data.batch_size
    if steps_per_epoch == 0:
        raise PDLMError(f"{len(items)} training items are fewer than one batch of {data.batch_size}")
    ds = grain.MapDataset.source(items).shuffle(seed=data.seed).repeat(data.epochs)
    ds = ds.map_with_index(SampleBuilder(source, data, model, str(tokenizer.file), len(items)))
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.threads, prefetch_buffer_size=data.prefetch))
    it = it.batch(data.batch_size // process_count, drop_remainder=True,
                  batch_fn=Collate(tuple(data.tile_buckets), tuple(data.length_buckets),
                                   model.region.prompt_numbers, tokenizer.special.eot))
    if data.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return Pipeline(it, len(items), steps_per_epoch)
