"""PerceptionDLM-Base (the reference's DMLLM): answer a question about a whole image (SPEC-base).

    import pdlm_jax
    model = pdlm_jax.load("checkpoints/perceptiondlm-base")
    print(model.answer("photo.jpg", "What is in the picture?")["answer"])

Host side: tiles (SPEC §6), `chat`'s prompt (§B3), the tokenizer. Device side, one jitted program per
bucket: vision tower and projector on every tile, the vision rows scattered into the `<IMG_CONTEXT>`
positions, then the block sampler (`block_sampling`) over the G answer positions appended after the prompt.
The sequence is right-padded to a multiple of `LENGTH_MULTIPLE` (padded keys are masked out), so questions
of similar length share a program.

`cache="prefix"` (opt-in, approximate) is Fast-dLLM's block cache: the first step of every block is a full
forward that refreshes every position's keys/values (prompt, finished blocks, later blocks); the block's
other steps run the LM over the block's B rows only and read every other position from that cache.
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
from jax.sharding import Mesh

from pdlm_jax import block_sampling, sharding
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.limits import Limits
from pdlm_jax.modeling.llada import put_rows, take_rows
from pdlm_jax.modeling.pdm import PerceptionDLM
from pdlm_jax.pipeline import Mode
from pdlm_jax.regions.prompt import build_question_text
from pdlm_jax.regions.tiling import ImageInput, TiledImage, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer

log = logging.getLogger("pdlm_jax")

LENGTH_MULTIPLE = 64
DEFAULTS = {"gen_length": 128, "block_length": 128, "steps": 128}  # the reference demo's settings
CACHE_MODES = ("none", "prefix")


def answer_defaults(sampler: dict | None = None) -> dict:
    """gen_length, block_length and steps: a checkpoint's sampler.json values over the reference demo's (a
    block_length it leaves unset is its gen_length: one block)."""
    stored = {k: v for k, v in (sampler or {}).items() if k in DEFAULTS and v is not None}
    return {**DEFAULTS, "block_length": stored.get("gen_length", DEFAULTS["block_length"]), **stored}


def answer_text(tokenizer: Tokenizer, ids: np.ndarray) -> tuple[str, str]:
    """(answer, raw): the demo's answer (cut at the first <|eot_id|>, stripped, `<think>\\n\\n</think>` removed,
    stripped) and the raw decoded G tokens (SPEC-base §B6)."""
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    answer = raw.split("<|eot_id|>")[0].strip()
    return answer.replace("<think>\n\n</think>", "").strip(), raw


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Static shape of one compiled program."""

    tiles: int
    length: int  # padded sequence length (prompt + answer + padding)
    gen_length: int
    block_length: int
    steps: int
    cache: str = "none"
    unmask: str = "remask"  # or "threshold" (its value is a runtime input)


@dataclasses.dataclass(frozen=True)
class PreparedQuestion:
    tiled: TiledImage
    prompt_text: str
    input_ids: np.ndarray  # (P,) int32
    image_positions: np.ndarray  # (T·n,) positions of <IMG_CONTEXT>


def prepare_question(image: ImageInput | TiledImage, question: str, tokenizer: Tokenizer,
                     cfg: PDLMConfig) -> PreparedQuestion:
    if not isinstance(question, str) or not question.strip():
        raise PDLMError("question must be a non-empty string")
    special = tokenizer.special
    tiled = image if isinstance(image, TiledImage) else tile_image(image, cfg.region)
    # The reference drops tiles whose normalised pixels sum to exactly 0 (meant for padding tiles, but a
    # half black, half white tile qualifies too) and then silently repeats other tiles' features or
    # crashes (SPEC-base §B2). We refuse such input instead. The float64 sum of these float32 values is exact.
    zero = [i for i, t in enumerate(tiled.pixel_values) if t.astype(np.float64).sum() == 0]
    if zero:
        raise PDLMError(f"image tile(s) {zero} sum to exactly 0 after normalisation; the reference would drop "
                        "them as padding and misplace the image features. Crop or pad the image slightly")
    n = tiled.num_tiles * cfg.region.num_image_tokens
    text = build_question_text(question, tiled.num_tiles, cfg.region.num_image_tokens)
    ids = tokenizer.encode(text)
    image_positions = np.flatnonzero(ids == special.image_context).astype(np.int32)
    if len(image_positions) != n:  # the question itself holds <IMG_CONTEXT>: the reference misplaces features
        raise PDLMError(f"the question contains {len(image_positions) - n} '<IMG_CONTEXT>' token(s), reserved for "
                        "image features; remove them from the question")
    return PreparedQuestion(tiled, text, ids, image_positions)


def program_inputs(prep: PreparedQuestion, bucket: Bucket, pad_id: int,
                   threshold: float = 0.9) -> dict[str, np.ndarray]:
    """Device inputs of one question (a batch of one row); `threshold`: of threshold unmasking."""
    P = len(prep.input_ids)
    ids = np.full(bucket.length, pad_id, np.int32)
    ids[:P] = prep.input_ids
    return dict(
        pixel_values=prep.tiled.pixel_values[None].astype(np.float32),
        input_ids=ids[None],
        image_positions=prep.image_positions[None],
        answer_positions=(P + np.arange(bucket.gen_length, dtype=np.int32))[None],
        valid=(np.arange(bucket.length) < P + bucket.gen_length)[None],
        threshold=np.float32(threshold),
    )


def _answer_program(graphdef, state, x: dict, *, cfg: PDLMConfig, mask_id: int, bucket: Bucket):
    """Answer tokens (Bt, G), the tokens after every forward (F, Bt, G; threshold unmasking: G entries, the first
    `forwards` filled) and the forwards run, for a batch of questions."""
    model = nnx.merge(graphdef, state)
    lm, B = model.lm, bucket.block_length

    def row_embeddings(pixel_values, input_ids, image_positions):
        vision = model.encode_tiles(pixel_values.astype(model.dtype))
        h = vision.shape[-1]
        return lm.embed(input_ids).at[image_positions].set(vision.reshape(-1, h).astype(model.dtype), mode="drop")

    embeds = jax.vmap(row_embeddings)(x["pixel_values"], x["input_ids"], x["image_positions"])
    answer = x["answer_positions"]
    keys = x["valid"][:, None, None, :]  # (Bt, 1, 1, L): padded keys are masked out, nothing else is

    def block_rows(block):
        return jax.lax.dynamic_slice_in_dim(answer, block * B, B, axis=1)

    def with_answer(embeds, tokens):  # every answer row: earlier blocks' final commits included
        return put_rows(embeds, answer, lm.embed(tokens))

    def full_forward(embeds, block):
        hidden, cache = lm.prefill(embeds, keys)
        return lm.logits(take_rows(hidden, block_rows(block))), cache

    if bucket.cache == "prefix":
        def logits_fn(tokens, block, step, carry):
            embeds, cache = with_answer(carry[0], tokens), carry[1]

            def from_cache(embeds, cache):
                rows = block_rows(block)
                hidden = lm.forward_rows(take_rows(embeds, rows), rows, keys, cache)
                return lm.logits(hidden), cache

            logits, cache = jax.lax.cond(step == 0, full_forward, lambda e, b: from_cache(e, cache), embeds, block)
            return logits, (embeds, cache)

        cache_shape = jax.eval_shape(full_forward, embeds, 0)[1]
        carry = (embeds, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shape))
    else:
        def logits_fn(tokens, block, step, embeds):
            embeds = with_answer(embeds, tokens)
            return full_forward(embeds, block)[0], embeds

        carry = embeds

    banned = block_sampling.banned_ids(cfg.lm.vocab_size, mask_id)
    if bucket.unmask == "threshold":
        return block_sampling.denoise_blocks_threshold(logits_fn, embeds.shape[0], bucket.gen_length, B, x["threshold"],
                                                       mask_id=mask_id, banned=banned, carry=carry)
    _, counts = block_sampling.block_schedule(bucket.gen_length, B, bucket.steps)
    tokens, history = block_sampling.denoise_blocks(logits_fn, embeds.shape[0], bucket.gen_length, B, counts,
                                                    mask_id=mask_id, banned=banned, carry=carry)
    return tokens, history, jnp.int32(history.shape[0])


class QuestionAnswerer:
    """A loaded PerceptionDLM-Base model, its tokenizer and its compiled programs (one per bucket)."""

    def __init__(self, cfg: PDLMConfig, model: PerceptionDLM, tokenizer: Tokenizer, mesh: Mesh | None = None,
                 defaults: dict | None = None, limits: Limits | None = None):
        if not cfg.is_base:
            raise PDLMError("QuestionAnswerer needs a PerceptionDLM-Base checkpoint (config variant 'base')")
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.limits = limits or Limits(cfg, tokenizer)  # positions and pixels one call may use
        self.defaults = answer_defaults(defaults)
        self.graphdef, self.state = nnx.split(model)
        self._compiled: dict[Bucket, jax.stages.Compiled] = {}

    def answer(self, image: ImageInput | TiledImage, question: str, gen_length: int | None = None,
               block_length: int | None = None, steps: int | None = None, cache: str = "none",
               unmask: str = "remask", return_steps: bool = False) -> dict:
        """Answer `question` about `image` (path, PIL image, uint8 array or `TiledImage`) as the reference's
        `demo/infer_dmllm.py` does (greedy; defaults 128/128/128 or the checkpoint's `sampler.json`).
        `cache="prefix"` and `unmask="threshold:TAU"` are the opt-in fast modes (module docstring and
        `block_sampling.denoise_blocks_threshold`); with a threshold, `steps` only has to divide as usual.

        Result: {"answer" (the demo's text), "response_raw" (the G tokens decoded with special tokens),
        "token_ids" (the G generated ids), "question", "prompt_length", "image": {width, height, grid, tiles},
        "gen_length", "block_length", "steps", "mode", "seconds" (wall time, compilation included),
        "compile_seconds", "forwards", "tokens_per_forward"}; with `return_steps`, also "step_states": the G
        answer ids after every forward (the mask id where still masked).
        """
        start = time.perf_counter()
        gen_length = self.defaults["gen_length"] if gen_length is None else gen_length
        block_length = self.defaults["block_length"] if block_length is None else block_length
        steps = self.defaults["steps"] if steps is None else steps
        if not isinstance(question, str) or not question.strip():
            raise PDLMError("question must be a non-empty string")
        size = image.size if isinstance(image, TiledImage) else self.limits.check_image(image)
        self.limits.check_answer(gen_length, steps, question, size)
        block_sampling.block_schedule(gen_length, block_length, steps)  # PDLMError for settings that do not divide
        if cache not in CACHE_MODES:
            raise PDLMError(f"cache mode must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        mode = Mode.parse(cache, unmask)
        prep = prepare_question(image, question, self.tokenizer, self.cfg)
        P = len(prep.input_ids)
        bucket = Bucket(tiles=prep.tiled.num_tiles, length=-(-(P + gen_length) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE,
                        gen_length=gen_length, block_length=block_length, steps=steps, cache=cache, unmask=mode.unmask)
        inputs = self._place(program_inputs(prep, bucket, self.tokenizer.special.eot, mode.threshold))
        exe, compile_seconds = self._program(bucket, inputs)
        tokens, history, forwards = jax.device_get(exe(self.state, inputs))
        ids, forwards = np.asarray(tokens[0]), int(forwards)
        answer, raw = answer_text(self.tokenizer, ids)
        result = {
            "answer": answer, "response_raw": raw, "token_ids": ids.tolist(), "question": question,
            "prompt_length": P,
            "image": {"width": prep.tiled.size[0], "height": prep.tiled.size[1], "grid": list(prep.tiled.grid),
                      "tiles": prep.tiled.num_tiles},
            "gen_length": gen_length, "block_length": block_length, "steps": steps,
            "mode": mode.name,
            "seconds": time.perf_counter() - start, "compile_seconds": compile_seconds,
            "forwards": forwards, "tokens_per_forward": gen_length / forwards,
        }
        if return_steps:
            result["step_states"] = np.asarray(history)[:forwards, 0].tolist()
        return result

    def _place(self, inputs: dict) -> dict:
        if self.mesh is None:
            return inputs
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.shape)) for k, v in inputs.items()}

    def _program(self, bucket: Bucket, inputs: dict) -> tuple[jax.stages.Compiled, float]:
        if bucket in self._compiled:
            return self._compiled[bucket], 0.0
        log.info("compiling the answering program for %s (once per bucket)", bucket)
        start = time.perf_counter()
        fn = jax.jit(functools.partial(_answer_program, self.graphdef, cfg=self.cfg,
                                       mask_id=self.tokenizer.special.mask, bucket=bucket),
                     out_shardings=None if self.mesh is None else sharding.replicated(self.mesh))
        self._compiled[bucket] = fn.lower(self.state, inputs).compile()
        return self._compiled[bucket], time.perf_counter() - start
