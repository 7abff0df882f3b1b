"""Training data: annotation records -> samples (SPEC §11.2–11.3) -> fixed-shape padded batches (grain).

Pipeline: records (annotation JSON or the synthetic task) are expanded into items (record, group) of at
most ⌈(1+P)/2⌉ masks; a grain `MapDataset` shuffles the items per epoch and turns item `i` into a sample
with randomness seeded by (seed, i) only, so the iterator is deterministic and its state (a position)
is all a checkpoint needs. Batches are padded to the smallest configured (tiles, length) bucket that
fits, so the jitted step sees a handful of shapes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import math
import random
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np
from flax import struct
from PIL import Image

from pdlm_jax import annotation_files
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.roi_replay import roi_boxes
from pdlm_jax.region_batch import RegionBatch, stack
from pdlm_jax.regions.masks import area_order, mask_box, patch_activity, visual_prompt_tiles
from pdlm_jax.regions.prompt import ASSISTANT_HEADER, DEFAULT_QUESTION, build_layout, build_prompt_text
from pdlm_jax.regions.tiling import select_grid, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer
from train.loss import IGNORE
from pdlm_jax.files import as_path

MIN_IMAGE_SIDE = 10  # the reference skips smaller images


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # JSON files in the SPEC §11.2 schema (local, file:// or gs:// paths); for a PerceptionDLM-Base model,
    # conversation files (JSON or JSONL, train.conversations)
    annotations: tuple[str, ...] = ()
    synthetic_scenes: int = 0  # >0: that many scenes of the synthetic task (train.synthetic), alone or mixed in
    # Mixing: one weight per annotation file, then one for the synthetic task (if any); items are drawn from
    # the sources in these proportions (grain MapDataset.mix). Empty: the annotation files as one source.
    weights: tuple[float, ...] = ()
    # A bad annotation record (missing image, corrupt or empty RLE, too long for the buckets, ...): "error"
    # stops before training, naming file and record; "skip" leaves it out and logs how many were skipped.
    on_bad_record: str = "error"
    # When the data runs out before run.max_steps: false trains on what there is (the lr schedule sized for
    # it) and exits with code 3; true repeats the data (reshuffled each pass) until run.max_steps.
    loop: bool = False
    synthetic_seed: int = 0
    synthetic_rotated: float = 0.0  # fraction of synthetic squares and triangles drawn at any angle
    synthetic_task: str = "shapes"  # train.synthetic.TASKS: "shapes" ("a red circle") or "sentences"
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
    # Padded answer lengths: the loss computes logits (A × vocab) at the answer positions only, A the smallest
    # of these that fits the batch (at most its length bucket). Empty: A = the length bucket.
    answer_buckets: tuple[int, ...] = ()
    question: str = DEFAULT_QUESTION
    # Base conversations: extend the final answer with <|eot_id|> to this many tokens, attended and supervised,
    # as LLaDA's SFT pads with EOS (SPEC-train-base T8.4: the reference, 0, never teaches a model to fill the
    # block sampler's G-token canvas; LLaDA-initialised models learned it before). Set it to the gen_length.
    answer_padding: int = 0
    # Base conversations: "training", the reference's training template (SPEC-train-base T5.1), or "chat", the
    # prompt the model is asked with (SPEC-base §B3), for a model that learns the prompt format from scratch
    template: str = "training"
    workers: int = 0  # grain worker processes (0 = in-process)
    threads: int = 2  # grain reader threads per process (each builds whole batches)
    prefetch: int = 4  # batches read ahead per process (each worker too)


@dataclasses.dataclass
class Record:
    image: Image.Image
    masks: list[np.ndarray]  # bool (H, W) at the image size
    captions: list[str]


# ---- sources ------------------------------------------------------------------------------------


BAD_RECORD_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What every sample of a record must fit into (checked when the annotation files load)."""

    region: Any  # RegionConfig
    tokenizer: Tokenizer
    question: str
    group_divisor: float
    max_tiles: int
    max_length: int
    max_answer: int | None = None  # the largest of data.answer_buckets, if any

    def longest_sample(self, size: tuple[int, int], captions: Sequence[str]) -> tuple[int, int, int]:
        """(tiles, tokens, answer tokens) of the record's longest possible sample: its largest mask group with
        the captions of most tokens (the answer starts with a special token, so it tokenizes on its own)."""
        cols, rows = select_grid(size[0], size[1], self.region)
        tiles = cols * rows + (1 if self.region.use_thumbnail and cols * rows > 1 else 0)
        k = math.ceil(len(captions) / groups_per_record(len(captions), self.group_divisor))
        longest = sorted(captions, key=lambda c: len(self.tokenizer.encode(c)), reverse=True)[:k]
        prefix, answer = training_text(tiles, self.region.num_image_tokens, longest, self.question)
        return (tiles, len(self.tokenizer.encode(prefix + answer)) + k * (self.region.roi_tokens - 1),
                len(self.tokenizer.encode(answer)))


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
            with _open_image_file(image) as im:  # reads the header only
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
        with _open_image_file(image_ref) as im:
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
def _open_image_file(ref: Any):
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


@struct.dataclass
class TrainBatch:
    """A training sample (unbatched) or batch (leading axis B): the model's inputs and the training targets.
    A new per-token target is a field here and one line in `build_sample` / `Collate`."""

    inputs: RegionBatch  # roi_boxes converted for training (`roi_boxes(..., training=True)`)
    labels: np.ndarray  # (L,) int32 target token per position, IGNORE where there is none
    # (A,) int32 the labelled positions, where the loss computes logits; padded with L to the answer bucket
    answer_positions: np.ndarray


def build_sample(record: Record, mask_indices: Sequence[int], rng: np.random.Generator, cfg: PDLMConfig,
                 tokenizer: Tokenizer, question: str = DEFAULT_QUESTION,
                 random_prompt_ids: bool = True) -> TrainBatch:
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
    inputs = RegionBatch(
        pixel_values=tiled.pixel_values,
        mask_patches=mask_patches,
        prompt_ids=prompt_ids,
        grid=np.asarray(tiled.grid, np.int32),
        num_tiles=np.int32(tiled.num_tiles),
        roi_boxes=roi_boxes(np.array([_box(m) for m in masks]), tiled.grid, region, cfg.quirks, training=True),
        input_ids=layout.input_ids,
        image_positions=layout.image_positions,
        roi_positions=layout.roi_positions,
        block_id=layout.block_id,
        roi_owner=layout.roi_owner,
        prefix_visible=layout.prefix_visible,
        valid=layout.valid,
    )
    return TrainBatch(inputs=inputs, labels=labels, answer_positions=np.flatnonzero(labels != IGNORE).astype(np.int32))


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
    """Pad a list of samples to the smallest (tile, length, answer) bucket that fits all of them and stack."""

    tile_buckets: tuple[int, ...]
    length_buckets: tuple[int, ...]
    max_regions: int
    pad_id: int
    answer_buckets: tuple[int, ...] = ()  # () = the length bucket

    def __call__(self, samples: Sequence[TrainBatch]) -> TrainBatch:
        T = _bucket(max(s.inputs.pixel_values.shape[0] for s in samples), self.tile_buckets, "tile")
        L = _bucket(max(s.inputs.input_ids.shape[0] for s in samples), self.length_buckets, "length")
        answer = max(s.answer_positions.shape[0] for s in samples)
        A = min(_bucket(answer, self.answer_buckets, "answer"), L) if self.answer_buckets else L
        return stack([TrainBatch(inputs=s.inputs.padded(T, self.max_regions, L, self.pad_id),
                                 labels=_pad(s.labels, (L,), IGNORE),
                                 answer_positions=_pad(s.answer_positions, (A,), L)) for s in samples])


# ---- the grain pipeline ------------------------------------------------------------------------------


class SampleBuilder:
    """grain MapWithIndex transform: (global index, item) -> sample. Picklable for worker processes."""

    def __init__(self, source, data: DataConfig, model: PDLMConfig, tokenizer_path: str, num_items: int):
        self.source, self.data, self.model = source, data, model
        self.tokenizer_path, self.num_items = tokenizer_path, num_items
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, index: int, item: np.ndarray) -> TrainBatch:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        record_index, group, num_groups = (int(v) for v in item)
        epoch = index // self.num_items
        try:
            record = self.source[record_index]
            chosen = mask_group(len(record.masks), record_index, epoch, group, num_groups)
            rng = np.random.default_rng([self.data.seed, index])
            sample = build_sample(record, chosen, rng, self.model, self._tokenizer, self.data.question,
                                  self.data.random_prompt_ids)
        except PDLMError as e:
            raise PDLMError(f"{self.source.label(record_index)}: {e}") from e
        if len(sample.labels) > max(self.data.length_buckets):
            raise PDLMError(f"{self.source.label(record_index)}: a sample of {len(sample.labels)} tokens "
                            f"exceeds the largest of data.length_buckets ({max(self.data.length_buckets)})")
        return sample


@dataclasses.dataclass
class Pipeline:
    dataset: grain.IterDataset
    num_items: int  # items in one pass over all sources
    steps_per_epoch: int
    steps_available: int | None  # batches before the data runs out (None: data.loop repeats it forever)
    skipped: list[str]  # messages of the annotation records left out (data.on_bad_record: skip)
    records: dict[str, int]  # usable records per source (annotation files or "synthetic task")


def _grain_flags_parsed() -> None:
    """Grain reads its absl flags (e.g. --grain_enable_multiprocess_worker_profiling) when it starts worker
    processes, which fails unless absl parsed them; a program that is not an absl app never does, so they keep
    their defaults (grain settings go through `grain.config.update`)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(data: DataConfig, model: PDLMConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                   process_count: int = 1, grad_accum: int = 1, batch_name: str = "data.batch_size") -> Pipeline:
    """Deterministic, checkpointable iterator of per-process batches of one update: data.batch_size x
    `grad_accum` samples in all processes together, batch / process_count in each. `batch_name`: the setting
    data.batch_size came from, for messages."""
    batch = data.batch_size * grad_accum
    batch_text = f"{batch}" + (f" = {batch_name} {data.batch_size} x optim.grad_accum {grad_accum}"
                               if grad_accum > 1 else f" ({batch_name})")
    if batch % process_count:
        raise PDLMError(f"a batch of {batch_text} does not divide by the number of processes {process_count}")
    if model.is_base:  # image + conversation records (train.conversations)
        from train import conversations

        sources, builder = conversations.make_sources(data, model, tokenizer), conversations.SampleBuilder
    else:
        limits = Limits(model.region, tokenizer, data.question, data.group_divisor, max(data.tile_buckets),
                        max(data.length_buckets), max(data.answer_buckets, default=None))
        sources, builder = make_sources(data, limits), SampleBuilder
    per_source, one_pass = [], []
    for i, source in enumerate(sources):
        items = source.items() if model.is_base else build_items(source, data.group_divisor)
        shuffled = grain.MapDataset.source(items).shuffle(seed=data.seed + i)
        one_pass.append(shuffled)
        ds = shuffled.repeat(None if data.loop else data.epochs)
        per_source.append(ds.map_with_index(builder(source, data, model, str(tokenizer.file), len(items))))
    if len(sources) == 1:
        ds, epoch_items = per_source[0], len(one_pass[0])
    else:
        ds, epoch_items = grain.MapDataset.mix(per_source, data.weights), len(grain.MapDataset.mix(one_pass, data.weights))
    steps_per_epoch = epoch_items // batch
    if steps_per_epoch == 0:
        raise PDLMError(f"{epoch_items} training items are fewer than one batch of {batch_text}: add data or "
                        "make the batch smaller")
    per_process = batch // process_count
    steps_available = None if data.loop else (len(ds) // process_count) // per_process
    # batched before the iterator: worker w of data.workers builds whole batches w, w + workers, ... and grain
    # interleaves them back in order, so the batches do not depend on the number of workers
    ds = ds[process_index::process_count].batch(
        per_process, drop_remainder=True,
        batch_fn=Collate(tuple(data.tile_buckets), tuple(data.length_buckets),
                         0 if model.is_base else model.region.prompt_numbers, tokenizer.special.eot,
                         tuple(data.answer_buckets)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.threads, prefetch_buffer_size=data.prefetch))
    if data.workers > 0:
        _grain_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    skipped = [m for s in sources for m in getattr(s, "skipped", [])]
    records = {source.name: len(source) for source in sources}
    return Pipeline(it, sum(len(p) for p in one_pass), steps_per_epoch, steps_available, skipped, records)
