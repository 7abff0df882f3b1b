"""One region-captioning pass as one jitted program per static bucket (SPEC §0 steps 3–7).

Host code (`pdlm_jax.regions`) turns an image and ≤ prompt_numbers masks into fixed-shape arrays; this
module pads them to a `Bucket`, compiles the program once per bucket and runs it:

    vision tower + projector (once) → RoI replay → embedding assembly → structured mask (from the
    per-token segment arrays) → denoising loop (`sampling.denoise`), each step re-embedding only the
    generation slots and computing logits only at those slots.

Buckets: the tile count T is exact (it fixes the vision work); the region count is padded up to
`REGION_BUCKETS` (padded regions have no mask patches, no sequence positions and no valid slots, so they
are no-ops); the sequence is right-padded to a multiple of `LENGTH_MULTIPLE` (padded keys are masked out).
The tile grid, schedule, temperature, top-p and seed are runtime values, so images of the same bucket
reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdlm_jax import sampling
from pdlm_jax.config import PDLMConfig
from pdlm_jax.ops.roi_replay import assemble_embeddings, roi_boxes, roi_replay
from pdlm_jax.ops.structured_mask import allowed_mask
from pdlm_jax.regions.prepare import PreparedRegions

log = logging.getLogger(__name__)

REGION_BUCKETS = (1, 2, 4, 6)
LENGTH_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Static shape of one compiled program."""

    tiles: int
    regions: int  # padded region count
    gen_length: int
    length: int  # padded sequence length
    sample: bool  # temperature > 0
    nucleus: bool  # top_p < 1 while sampling

    @property
    def slots(self) -> int:
        return self.regions * self.gen_length


def choose_bucket(num_tiles: int, num_regions: int, gen_length: int, length: int, prompt_numbers: int,
                  temperature: float, top_p: float) -> Bucket:
    sizes = [r for r in REGION_BUCKETS if r < prompt_numbers] + [prompt_numbers]
    regions = next(r for r in sizes if r >= num_regions)
    sample = temperature > 0
    return Bucket(tiles=num_tiles, regions=regions, gen_length=gen_length,
                  length=-(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, sample=sample,
                  nucleus=sample and top_p < 1.0)


def pass_inputs(prep: PreparedRegions, bucket: Bucket, cfg: PDLMConfig, pad_id: int, steps: int,
                temperature: float, top_p: float, seed: int) -> dict[str, np.ndarray]:
    """The padded device inputs of one pass (the schedule of `steps` included)."""
    k, g, L = prep.layout.num_regions, bucket.gen_length, bucket.length
    layout = prep.layout.padded(L, pad_id)
    extra = bucket.regions - k

    def pad_regions(a: np.ndarray, value) -> np.ndarray:
        return np.concatenate([a, np.full((extra, *a.shape[1:]), value, a.dtype)])

    # Padded regions/slots point past the end of the sequence: scatters drop them, gathers are ignored.
    gen_positions = pad_regions(layout.gen_positions, L).reshape(-1)
    counts, forwards = sampling.schedule_array([(k * g, steps)], bucket.slots)
    return dict(
        pixel_values=prep.pixel_values.astype(np.float32),
        mask_patches=pad_regions(prep.mask_patches, False),
        prompt_ids=pad_regions(prep.prompt_ids, 0),
        grid=np.asarray(prep.grid, np.int32),
        roi_boxes=pad_regions(roi_boxes(prep.boxes, prep.grid, cfg.region, cfg.quirks), 0.0),
        input_ids=layout.input_ids,
        image_positions=layout.image_positions,
        roi_positions=pad_regions(layout.roi_positions, L),
        gen_positions=gen_positions,
        slot_valid=gen_positions < L,
        block_id=layout.block_id,
        roi_owner=layout.roi_owner,
        prefix_visible=layout.prefix_visible,
        valid=layout.valid,
        counts=counts,
        num_forwards=np.int32(forwards),
        temperature=np.float32(temperature),
        top_p=np.float32(top_p),
        seed=np.uint32(seed),
    )


def _caption_pass(graphdef, state, x: dict, *, cfg: PDLMConfig, mask_id: int, sample: bool, nucleus: bool):
    """The whole pass for one image; returns the slot tokens (1, regions·G) and the forwards run."""
    model = nnx.merge(graphdef, state)
    lm = model.lm
    vision = model.encode_images(x["pixel_values"].astype(model.dtype), x["mask_patches"], x["prompt_ids"])
    rois = roi_replay(vision, x["grid"], x["roi_boxes"], cfg.region, cfg.quirks)
    embeds = assemble_embeddings(lm.embed(x["input_ids"]), vision, rois, x["image_positions"], x["roi_positions"])
    mask = allowed_mask(x["block_id"], x["roi_owner"], x["prefix_visible"], x["valid"])[None, None]
    gen_positions = x["gen_positions"]
    gather_at = jnp.minimum(gen_positions, embeds.shape[0] - 1)

    def logits_fn(tokens, step):
        inputs = embeds.at[gen_positions].set(lm.embed(tokens[0]), mode="drop")
        hidden = lm(inputs[None], mask)
        return lm.logits(hidden[:, gather_at])  # (1, slots, V): never the full L × V matrix

    return sampling.denoise(logits_fn, x["slot_valid"][None], x["counts"], x["num_forwards"], mask_id=mask_id,
                            temperature=x["temperature"], top_p=x["top_p"],
                            key=jax.random.key(x["seed"]), sample=sample, nucleus=nucleus)


class CaptionProgram:
    """Compiled passes of one model, one executable per bucket (ahead-of-time compiled, kept in memory)."""

    def __init__(self, model: nnx.Module, cfg: PDLMConfig, mask_id: int):
        self.graphdef, self.state = nnx.split(model)
        self.cfg, self.mask_id = cfg, mask_id
        self._compiled: dict[Bucket, jax.stages.Compiled] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def compiled(self, bucket: Bucket, inputs: dict) -> tuple[jax.stages.Compiled, float]:
        """The executable for `bucket` and the seconds spent compiling it now (0 when cached)."""
        if bucket in self._compiled:
            return self._compiled[bucket], 0.0
        log.info("compiling the captioning program for %s (once per bucket)", bucket)
        start = time.perf_counter()
        fn = jax.jit(functools.partial(_caption_pass, self.graphdef, cfg=self.cfg, mask_id=self.mask_id,
                                       sample=bucket.sample, nucleus=bucket.nucleus))
        self._compiled[bucket] = fn.lower(self.state, inputs).compile()
        return self._compiled[bucket], time.perf_counter() - start

    def run(self, bucket: Bucket, inputs: dict) -> tuple[np.ndarray, int, float]:
        """Slot tokens (regions, G) int32, forwards run, compile seconds."""
        exe, compile_seconds = self.compiled(bucket, inputs)
        tokens, forwards = exe(self.state, inputs)
        tokens = np.asarray(jax.device_get(tokens)).reshape(bucket.regions, bucket.gen_length)
        return tokens, int(forwards), compile_seconds


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled programs on disk so later processes skip compilation (JAX's persistent cache)."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
