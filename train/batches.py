"""Samples -> fixed-shape padded batches: the grain pipeline of every source's items and its iterator.

A grain `MapDataset` shuffles each source's items per epoch, mixes the sources by data.weights and turns item
`i` into a sample (`train.samples.SampleBuilder`), so the iterator is deterministic and its state (a position)
is all a checkpoint needs. Batches are padded to the smallest configured (tiles, length, answer) bucket that
fits (`Collate`), so the jitted step sees a handful of shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.region_batch import stack
from pdlm_jax.regions.tokenizer import Tokenizer
from train.config import DataConfig
from train.loss import IGNORE
from train.samples import Limits, SampleBuilder, TrainBatch
from train.sources import build_items, make_sources

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
        sources, builder = make_sources(data, Limits.of(model.region, tokenizer, data)), SampleBuilder
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
