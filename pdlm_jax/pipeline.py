"""Region-captioning passes as one jitted program per static bucket (SPEC §0 steps 3–7).

Host code (`pdlm_jax.regions`) turns an image and ≤ prompt_numbers masks into fixed-shape arrays (one *row*:
the model's `RegionBatch` and the caption slots, `PassInputs`); this module pads rows to a `Bucket`, stacks the
rows of one bucket into a batch; `caption_program` compiles it once per bucket (`programs.Program`):

    per row: vision tower + projector (once per image) → RoI replay → embedding assembly
    (`PerceptionDLM.embed_inputs`, as in training) → structured mask; then the denoising loop over the whole batch (`sampling`), each step
    re-embedding only the generation slots and computing logits only at those slots.

Buckets: the tile count T is exact (it fixes the vision work); the region count is padded up to
`REGION_BUCKETS` (padded regions have no mask patches, no sequence positions and no valid slots, so they
are no-ops); the sequence is right-padded to a multiple of `programs.LENGTH_MULTIPLE` (padded keys are masked out);
the batch size is static. The tile grid, schedules, temperature, top-p, seeds and the fast-mode knobs are
runtime values, so images of the same bucket reuse the compiled program.

Modes (`generation.Mode`): the default reproduces the reference. `cache="prefix"` keeps the keys/values of every
position from the last full forward (refreshed every `refresh` steps, else only at step 0) and runs the other
steps over the caption rows only — approximate, because in the reference the prefix rows also attend to the
captions (SPEC §8.6). `unmask="threshold"` is the confidence-threshold sampler (`sampling.denoise_threshold`).
With a mesh, parameters arrive already sharded and the batch axis of the inputs is split over
('data', 'fsdp') when it divides (replicated otherwise); XLA partitions the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from pdlm_jax import sampling
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import EXACT, GenerationSettings, Mode
from pdlm_jax.modeling.llada import put_rows, take_rows
from pdlm_jax.programs import Program, padded_length
from pdlm_jax.region_batch import RegionBatch, stack
from pdlm_jax.regions.prepare import PreparedRegions

REGION_BUCKETS = (1, 2, 4, 6)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Static shape of one compiled program."""

    tiles: int
    regions: int  # padded region count
    gen_length: int
    length: int  # padded sequence length
    sample: bool  # temperature > 0
    nucleus: bool  # top_p < 1 while sampling
    batch: int = 1  # rows (passes) per call
    mode: Mode = EXACT  # the sampler (`Mode.static`: its runtime knobs are inputs)
    history: bool = False  # also return the slot tokens after every step

    @property
    def prefix(self) -> bool:
        """Prefix K/V cache mode."""
        return self.mode.cache == "prefix"

    @property
    def threshold(self) -> bool:
        """Confidence-threshold unmasking."""
        return self.mode.unmask == "threshold"

    @property
    def slots(self) -> int:
        return self.regions * self.gen_length

    @property
    def caption_rows(self) -> int:
        """Rows of the caption blocks: per region its marker, G slots and one separator (`\\n` / `<|eot_id|>`)."""
        return self.regions * (self.gen_length + 2)


def choose_bucket(num_tiles: int, num_regions: int, length: int, prompt_numbers: int,
                  settings: GenerationSettings) -> Bucket:
    sizes = [r for r in REGION_BUCKETS if r < prompt_numbers] + [prompt_numbers]
    regions = next(r for r in sizes if r >= num_regions)
    sample = settings.temperature > 0
    return Bucket(tiles=num_tiles, regions=regions, gen_length=settings.gen_length, length=padded_length(length),
                  sample=sample, nucleus=sample and settings.top_p < 1.0, mode=settings.mode.static)


@struct.dataclass
class PassInputs:
    """The device inputs of one pass (a row; `batch_inputs` stacks rows): the model's inputs and the caption
    slots. Padded regions/slots/rows point past the end of the sequence: scatters drop them, gathers are ignored."""

    regions: RegionBatch
    gen_positions: np.ndarray  # (P·G,) int32 position of each slot, region by region (L when padded)
    slot_valid: np.ndarray  # (P·G,) bool
    caption_positions: np.ndarray  # (caption_rows,) int32 positions of the caption blocks (prefix cache rows)
    slot_rows: np.ndarray  # (P·G,) int32 each slot's row in the caption window (padded slots: row 0, ignored)
    seed: np.ndarray  # () uint32


@struct.dataclass
class ProgramInputs:
    """What one call of a compiled program takes: `bucket.batch` stacked rows and the runtime sampler settings."""

    rows: PassInputs
    counts: np.ndarray  # (B, slots) int32 re-mask counts per step (`sampling.schedule_array`)
    num_forwards: np.ndarray  # () int32
    temperature: np.ndarray  # () float32
    top_p: np.ndarray  # () float32
    refresh: np.ndarray  # () int32 prefix refresh period
    threshold: np.ndarray  # () float32 unmask threshold


def pass_inputs(prep: PreparedRegions, bucket: Bucket, cfg: PDLMConfig, pad_id: int, seed: int = 0) -> PassInputs:
    """The padded device inputs of one pass (one batch row; `batch_inputs` stacks rows)."""
    L = bucket.length
    layout = prep.layout
    gen_positions = np.concatenate([layout.gen_positions.reshape(-1),
                                    np.full(bucket.slots - layout.gen_positions.size, L, np.int32)])
    caption = np.flatnonzero(layout.block_id >= 0).astype(np.int32)
    if len(caption) > bucket.caption_rows:
        raise PDLMError(f"the caption blocks span {len(caption)} tokens, more than the {bucket.caption_rows} the "
                        "prefix cache expects; check the tokenizer's <|Mask_Cap_i|> separators")
    return PassInputs(
        regions=prep.inputs().padded(bucket.tiles, bucket.regions, L, pad_id).check(cfg, batched=False),
        gen_positions=gen_positions,
        slot_valid=gen_positions < L,
        caption_positions=np.concatenate([caption, np.full(bucket.caption_rows - len(caption), L, np.int32)]),
        slot_rows=np.searchsorted(caption, gen_positions).clip(max=bucket.caption_rows - 1).astype(np.int32),
        seed=np.uint32(seed),
    )


def batch_inputs(rows: list[PassInputs], schedules: list[tuple[int, int]], bucket: Bucket,
                 settings: GenerationSettings) -> ProgramInputs:
    """Stack `rows` (from `pass_inputs`, one (N, S) schedule each) into the `bucket.batch` rows of one call.

    Missing rows repeat the last one with no valid slot (and a zero schedule), so they change nothing.
    """
    padding = bucket.batch - len(rows)
    if padding < 0:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {bucket.batch}")
    filler = rows[-1].replace(slot_valid=np.zeros_like(rows[-1].slot_valid))
    counts, forwards = sampling.schedule_array(list(schedules) + [(0, 1)] * padding, bucket.slots)
    return ProgramInputs(
        rows=stack(list(rows) + [filler] * padding),
        counts=counts,
        num_forwards=np.int32(forwards),
        temperature=np.float32(settings.temperature),
        top_p=np.float32(settings.top_p),
        refresh=np.int32(settings.mode.refresh_period),
        threshold=np.float32(settings.mode.threshold),
    )


def _caption_pass(graphdef, state, x: ProgramInputs, *, mask_id: int, bucket: Bucket):
    """The whole pass for a batch of rows; returns the slot tokens (B, regions·G) and the forwards run (and with
    `bucket.history`, the slot tokens after every step)."""
    model = nnx.merge(graphdef, state)
    lm = model.lm
    rows = x.rows
    embeds = model.embed_inputs(rows.regions)
    allowed = rows.regions.attention_mask()  # (B, L, L)
    gen_positions = rows.gen_positions

    def with_slots(embeds, tokens):
        return put_rows(embeds, gen_positions, lm.embed(tokens))

    def full_forward(embeds):
        hidden, cache = lm.prefill(embeds, allowed[:, None])
        return lm.logits(take_rows(hidden, gen_positions)), cache  # never the full L × V matrix

    if bucket.prefix:
        caption = rows.caption_positions
        row_mask = take_rows(allowed, caption)[:, None]  # (B, 1, C, L)

        def logits_fn(tokens, step, carry):
            embeds, cache = with_slots(carry[0], tokens), carry[1]

            def from_cache(embeds, cache):
                hidden = lm.forward_rows(take_rows(embeds, caption), caption, row_mask, cache)
                return lm.logits(take_rows(hidden, rows.slot_rows)), cache

            logits, cache = jax.lax.cond(step % x.refresh == 0, lambda e, c: full_forward(e), from_cache,
                                         embeds, cache)
            return logits, (embeds, cache)

        cache_shape = jax.eval_shape(full_forward, embeds)[1]
        carry = (embeds, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shape))
    else:
        def logits_fn(tokens, step, embeds):
            embeds = with_slots(embeds, tokens)  # the loop carries the embeddings: updated in place
            hidden = lm(embeds, allowed[:, None])
            return lm.logits(take_rows(hidden, gen_positions)), embeds

        carry = embeds

    sampler = sampling.Sampler(mask_id=mask_id, temperature=x.temperature, top_p=x.top_p,
                               key=jax.vmap(jax.random.key)(rows.seed), sample=bucket.sample, nucleus=bucket.nucleus,
                               history=bucket.history)
    if bucket.threshold:
        return sampling.denoise_threshold(logits_fn, rows.slot_valid, x.threshold, bucket.gen_length, sampler,
                                          carry)
    return sampling.denoise(logits_fn, rows.slot_valid, x.counts, x.num_forwards, sampler, carry)


def caption_program(model: nnx.Module | tuple, mask_id: int, mesh: Mesh | None = None,
                    trace: Callable[[Callable], Callable] | None = None, weight_layouts: str = "default") -> Program:
    """The captioning pass of `model` as a `Program` (one executable per `Bucket`; it takes `ProgramInputs`).

    Its outputs: slot tokens (batch, regions·G) int32 and the forwards run; with `bucket.history`, also the slot
    tokens after each forward."""
    return Program("captioning", functools.partial(_caption_pass, mask_id=mask_id), model, mesh, trace,
                   weight_layouts)
