"""One record -> one training sample (SPEC §11.3): its mask groups, the chat-template text, tokens and labels.

`Limits` sizes the longest sample of a record the same way, so a record that cannot fit the buckets is refused
when the annotation files load (`train.sources`) rather than mid-training. `SampleBuilder` is the grain transform
that turns an item (record, mask group) into a sample, with randomness seeded by (seed, item index) only.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Sequence

import numpy as np
from flax import struct
from PIL import Image

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.roi_replay import roi_boxes
from pdlm_jax.region_batch import RegionBatch
from pdlm_jax.regions.masks import area_order, mask_box, patch_activity, visual_prompt_tiles
from pdlm_jax.regions.prepare import region_inputs
from pdlm_jax.regions.prompt import ASSISTANT_HEADER, DEFAULT_QUESTION, build_layout, build_prompt_text
from pdlm_jax.regions.tiling import select_grid, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer
from train.config import DataConfig
from train.loss import IGNORE


@dataclasses.dataclass
class Record:
    """What a source yields for one record: the image, its masks and their captions."""

    image: Image.Image
    masks: list[np.ndarray]  # bool (H, W) at the image size
    captions: list[str]


# ---- mask groups (SPEC §11.3.1) --------------------------------------------------------------------------


def groups_per_record(num_masks: int, divisor: float) -> int:
    return max(1, math.ceil(num_masks / divisor))


def mask_group(num_masks: int, record_index: int, epoch: int, group: int, num_groups: int) -> list[int]:
    """Mask indices of group `group` of record `record_index` in `epoch` (the reference's partition)."""
    order = list(range(num_masks))
    random.Random(record_index * 100003 + epoch * 999983).shuffle(order)
    sizes = [num_masks // num_groups + (1 if q < num_masks % num_groups else 0) for q in range(num_groups)]
    start = sum(sizes[:group])
    return order[start:start + sizes[group]]


# ---- one sample (SPEC §11.3) ---------------------------------------------------------------------


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    return mask_box(mask) if mask.any() else (0.0, 0.0, 0.0, 0.0)  # reference: empty mask -> zeros


# LLaDA's EOS: caption decoding drops it, where <|eot_id|> would end the reference parser's text (SPEC §14.9)
CAPTION_FILLER = "<|endoftext|>"


def padded_captions(captions: Sequence[str], tokenizer: Tokenizer, length: int) -> list[str]:
    """Each caption followed by CAPTION_FILLER until it spans `length` tokens (data.caption_padding; 0: as
    they are). The reference trains captions unpadded but gives every region G slots at inference (SPEC
    §14.11): a model never shown a caption shorter than G invents words to fill the slots."""
    return [c + CAPTION_FILLER * max(length - len(tokenizer.encode(c)), 0) for c in captions]


def training_text(num_tiles: int, num_image_tokens: int, captions: Sequence[str], question: str) -> tuple[str, str]:
    """(prefix through the assistant header, answer) of the chat template (SPEC §5.1, §11.3.4)."""
    prompt = build_prompt_text(num_tiles, num_image_tokens, len(captions), 0, question)
    prefix = prompt[: prompt.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)]
    answer = "\n".join(f"<|Mask_Cap_{i}|>{c}" for i, c in enumerate(captions)) + "<|eot_id|>"
    return prefix, answer


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
    caption_padding: int = 0

    @classmethod
    def of(cls, region, tokenizer: Tokenizer, data: DataConfig) -> "Limits":
        """The limits of the data section's question, mask groups and largest buckets."""
        return cls(region, tokenizer, data.question, data.group_divisor, max(data.tile_buckets),
                   max(data.length_buckets), max(data.answer_buckets, default=None), data.caption_padding)

    def longest_sample(self, size: tuple[int, int], captions: Sequence[str]) -> tuple[int, int, int]:
        """(tiles, tokens, answer tokens) of the record's longest possible sample: its largest mask group with
        the captions of most tokens (the answer starts with a special token, so it tokenizes on its own)."""
        cols, rows = select_grid(size[0], size[1], self.region)
        tiles = cols * rows + (1 if self.region.use_thumbnail and cols * rows > 1 else 0)
        k = math.ceil(len(captions) / groups_per_record(len(captions), self.group_divisor))
        longest = sorted(padded_captions(captions, self.tokenizer, self.caption_padding),
                         key=lambda c: len(self.tokenizer.encode(c)), reverse=True)[:k]
        prefix, answer = training_text(tiles, self.region.num_image_tokens, longest, self.question)
        return (tiles, len(self.tokenizer.encode(prefix + answer)) + k * (self.region.roi_tokens - 1),
                len(self.tokenizer.encode(answer)))


@struct.dataclass
class TrainBatch:
    """A training sample (unbatched) or batch (leading axis B): the model's inputs and the training targets.
    A new per-token target is a field here and one line in `build_sample` / `train.batches.Collate`."""

    inputs: RegionBatch  # roi_boxes converted for training (`roi_boxes(..., training=True)`)
    labels: np.ndarray  # (L,) int32 target token per position, IGNORE where there is none
    # (A,) int32 the labelled positions, where the loss computes logits; padded with L to the answer bucket
    answer_positions: np.ndarray


def build_sample(record: Record, mask_indices: Sequence[int], rng: np.random.Generator, cfg: PDLMConfig,
                 tokenizer: Tokenizer, question: str = DEFAULT_QUESTION,
                 random_prompt_ids: bool = True, caption_padding: int = 0) -> TrainBatch:
    """One unpadded training sample for the masks `mask_indices` of `record` (its captions padded to
    `caption_padding` tokens)."""
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

    prefix, answer = training_text(tiled.num_tiles, region.num_image_tokens,
                                   padded_captions(captions, tokenizer, caption_padding), question)
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
    boxes = roi_boxes(np.array([_box(m) for m in masks]), tiled.grid, region, cfg.quirks, training=True)
    inputs = region_inputs(tiled.pixel_values, tiled.grid, mask_patches, prompt_ids, boxes, layout)
    return TrainBatch(inputs=inputs, labels=labels, answer_positions=np.flatnonzero(labels != IGNORE).astype(np.int32))


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
                                  self.data.random_prompt_ids, self.data.caption_padding)
        except PDLMError as e:
            raise PDLMError(f"{self.source.label(record_index)}: {e}") from e
        if len(sample.labels) > max(self.data.length_buckets):
            raise PDLMError(f"{self.source.label(record_index)}: a sample of {len(sample.labels)} tokens "
                            f"exceeds the largest of data.length_buckets ({max(self.data.length_buckets)})")
        return sample
