"""Region-captioning passes as one jitted program per static bucket (SPEC §0 steps 3–7).

Host code (`pdlm_jax.regions`) turns an image and ≤ prompt_numbers masks into fixed-shape arrays (one *row*:
the model's `RegionBatch` and the caption slots, `PassInputs`); this module pads rows to a `Bucket`, stacks the
rows of one bucket into a batch, compiles the program once per bucket and runs it:

    per row: vision tower + projector (once per image) → RoI replay → embedding assembly
    (`PerceptionDLM.embed_inputs`, as in training) → structured mask; then the denoising loop over the whole batch (`sampling`), each step
    re-embedding only the generation slots and computing logits only at those slots.

Buckets: the tile count T is exact (it fixes the vision work); the region count is padded up to
`REGION_BUCKETS` (padded regions have no mask patches, no sequence positions and no valid slots, so they
are no-ops); the sequence is right-padded to a multiple of `LENGTH_MULTIPLE` (padded keys are masked out);
the batch size is static. The tile grid, schedules, temperature, top-p, seeds and the fast-mode knobs are
runtime values, so images of the same bucket reuse the compiled program.

Modes (`Mode`): the default reproduces the reference. `cache="prefix"` keeps the keys/values of every
position from the last full forward (refreshed every `refresh` steps, else only at step 0) and runs the other
steps over the caption rows only — approximate, because in the reference the prefix rows also attend to the
captions (SPEC §8.6). `unmask="threshold"` is the confidence-threshold sampler (`sampling.denoise_threshold`).
With a mesh, parameters arrive already sharded and the batch axis of the inputs is split over
('data', 'fsdp') when it divides (replicated otherwise); XLA partitions the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from pdlm_jax import sampling, sharding
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.llada import put_rows, take_rows
from pdlm_jax.region_batch import RegionBatch, stack
from pdlm_jax.regions.prepare import PreparedRegions

log = logging.getLogger(__name__)

REGION_BUCKETS = (1, 2, 4, 6)
LENGTH_MULTIPLE = 64
_NEVER = 2**30  # prefix refresh period meaning "only at step 0"


@dataclasses.dataclass(frozen=True)
class Mode:
    """How the denoising loop runs; the default is the reference's exact sampler.

    cache: "none" (full forward every step) or "prefix" (see the module docstring); refresh: recompute the
    prefix keys/values every `refresh` steps (None = only at step 0; 1 = every step, i.e. exact).
    unmask: "remask" (the reference's low-confidence re-masking schedule) or "threshold" (commit every slot
    with p > `threshold`, at least one per caption block per step).
    """

    cache: str = "none"
    refresh: int | None = None
    unmask: str = "remask"
    threshold: float = 0.9

    def __post_init__(self):
        if self.cache not in ("none", "prefix"):
            raise PDLMError(f"cache mode must be 'none' or 'prefix[:R]', got {self.cache!r}")
        if self.unmask not in ("remask", "threshold"):
            raise PDLMError(f"unmask mode must be 'remask' or 'threshold:TAU', got {self.unmask!r}")
        if self.refresh is not None and self.refresh < 1:
            raise PDLMError(f"prefix refresh period must be a positive number of steps, got {self.refresh}")
        if not 0 < self.threshold < 1:
            raise PDLMError(f"unmask threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def parse(cls, cache: str = "none", unmask: str = "remask") -> "Mode":
        """From the CLI spellings: cache 'none' | 'prefix' | 'prefix:R'; unmask 'remask' | 'threshold:TAU'."""
        cache_name, _, refresh = str(cache).partition(":")
        unmask_name, _, tau = str(unmask).partition(":")
        try:
            return cls(cache=cache_name, refresh=int(refresh) if refresh else None, unmask=unmask_name,
                       threshold=float(tau) if tau else cls.threshold)
        except ValueError:
            raise PDLMError(f"cannot parse cache {cache!r} / unmask {unmask!r}; use e.g. 'prefix:4' and "
                            "'threshold:0.9'") from None

    @classmethod
    def from_name(cls, name: str) -> "Mode":
        """The inverse of `name`: 'exact', or 'prefix[:R]' and/or 'threshold[:TAU]' joined by '+'."""
        parts = {}
        for part in ([] if name == "exact" else str(name).split("+")):
            kind = part.partition(":")[0]
            if kind not in ("prefix", "threshold") or kind in parts:
                raise PDLMError(f"{name!r} is not a sampler mode: use exact, prefix[:R], threshold[:TAU] or "
                                "prefix[:R]+threshold[:TAU]")
            parts[kind] = part
        return cls.parse(parts.get("prefix", "none"), parts.get("threshold", "remask"))

    @property
    def arguments(self) -> dict[str, str]:
        """The `cache` and `unmask` spellings of this mode (`caption_regions` arguments; `parse` reads them)."""
        return {"cache": "none" if self.cache == "none" else "prefix" + (f":{self.refresh}" if self.refresh else ""),
                "unmask": "remask" if self.unmask == "remask" else f"threshold:{self.threshold!r}"}

    @property
    def static(self) -> "Mode":
        """What a compiled program depends on: the kinds of cache and unmasking. The refresh period and the
        threshold are runtime inputs (`batch_inputs`), so they are left at their defaults."""
        return Mode(cache=self.cache, unmask=self.unmask)

    @property
    def exact(self) -> bool:
        return self.cache == "none" and self.unmask == "remask"

    def forward_split(self, forwards: int) -> tuple[int, int]:
        """(full forwards, caption-rows-only forwards) of a pass that ran `forwards` forwards."""
        if self.cache != "prefix":
            return forwards, 0
        full = -(-forwards // self.refresh) if self.refresh else 1
        return full, forwards - full

    @property
    def name(self) -> str:
        parts = []
        if self.cache == "prefix":
            parts.append("prefix" + (f":{self.refresh}" if self.refresh else ""))
        if self.unmask == "threshold":
            parts.append(f"threshold:{self.threshold:g}")
        return "+".join(parts) or "exact"


EXACT = Mode()


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


def choose_bucket(num_tiles: int, num_regions: int, gen_length: int, length: int, prompt_numbers: int,
                  temperature: float, top_p: float, mode: Mode = EXACT) -> Bucket:
    sizes = [r for r in REGION_BUCKETS if r < prompt_numbers] + [prompt_numbers]
    regions = next(r for r in sizes if r >= num_regions)
    sample = temperature > 0
    return Bucket(tiles=num_tiles, regions=regions, gen_length=gen_length,
                  length=-(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, sample=sample,
                  nucleus=sample and top_p < 1.0, mode=mode.static)


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


def batch_inputs(rows: list[PassInputs], schedules: list[tuple[int, int]], bucket: Bucket, mode: Mode,
                 temperature: float, top_p: float) -> ProgramInputs:
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
        temperature=np.float32(temperature),
        top_p=np.float32(top_p),
        refresh=np.int32(mode.refresh or _NEVER),
        threshold=np.float32(mode.threshold),
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


class CaptionProgram:
    """Compiled passes of one model, one executable per bucket (ahead-of-time compiled, kept in memory).

    With a `mesh`, the model's parameters must already be placed in their shardings (`api.load(mesh=...)`).
    """

    def __init__(self, model: nnx.Module | tuple, mask_id: int, mesh: Mesh | None = None,
                 trace: Callable[[Callable], Callable] | None = None):
        # or an already split (graphdef, state): pdlm-aot's abstract int8 model would not survive a merge + split
        self.graphdef, self.state = model if isinstance(model, tuple) else nnx.split(model)
        self.mask_id, self.mesh = mask_id, mesh
        self.trace = trace  # wraps the tracing of each program (qwix interception for a quantized model)
        self._compiled: dict[Bucket, jax.stages.Compiled] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    @property
    def executables(self) -> dict[Bucket, jax.stages.Compiled]:
        """The compiled programs so far, by bucket (e.g. for XLA's memory and cost analyses)."""
        return dict(self._compiled)

    def input_sharding(self, value) -> jax.sharding.NamedSharding:
        """An input's place on the mesh: leading batch axis over ('data', 'fsdp') where it divides, else replicated."""
        return sharding.batch_sharding(self.mesh, value.shape) if np.ndim(value) else sharding.replicated(self.mesh)

    def place(self, inputs: ProgramInputs) -> ProgramInputs:
        """Inputs on the mesh (`input_sharding`)."""
        if self.mesh is None:
            return inputs
        return jax.tree.map(lambda v: jax.device_put(v, self.input_sharding(v)), inputs)

    def compiled(self, bucket: Bucket, inputs: ProgramInputs) -> tuple[jax.stages.Compiled, float]:
        """The executable for `bucket` and the seconds spent compiling it now (0 when cached)."""
        if bucket in self._compiled:
            return self._compiled[bucket], 0.0
        log.info("compiling the captioning program for %s (once per bucket)", bucket)
        start = time.perf_counter()
        self._compiled[bucket] = self.lower(bucket, inputs).compile()
        return self._compiled[bucket], time.perf_counter() - start

    def lower(self, bucket: Bucket, inputs: ProgramInputs) -> jax.stages.Lowered:
        """The pass of `bucket` traced and lowered for these inputs (abstract ones will do: `pdlm-aot` plans with
        it), not compiled."""
        fn = jax.jit(functools.partial(_caption_pass, self.graphdef, mask_id=self.mask_id, bucket=bucket),
                     out_shardings=None if self.mesh is None else sharding.replicated(self.mesh))
        lower = lambda: fn.lower(self.state, inputs)  # noqa: E731
        return self.trace(lower)() if self.trace else lower()

    def run(self, bucket: Bucket, inputs: ProgramInputs) -> tuple[np.ndarray, int, float]:
        """Slot tokens (batch, regions, G) int32, forwards run, compile seconds.

        With `bucket.history` a fourth result: the slot tokens after each forward, (forwards, batch, regions, G).
        """
        inputs = self.place(inputs)
        exe, compile_seconds = self.compiled(bucket, inputs)
        tokens, forwards, *history = exe(self.state, inputs)
        shape = (bucket.batch, bucket.regions, bucket.gen_length)
        tokens, forwards = np.asarray(jax.device_get(tokens)).reshape(shape), int(forwards)
        if bucket.history:
            return tokens, forwards, compile_seconds, np.asarray(jax.device_get(history[0]))[:forwards].reshape(
                forwards, *shape)
        return tokens, forwards, compile_seconds
