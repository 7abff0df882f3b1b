"""PerceptionDLM-Base (the reference's DMLLM): answer a question about a whole image (SPEC-base).

    import pdlm_jax
    model = pdlm_jax.load("checkpoints/perceptiondlm-base")
    print(model.answer("photo.jpg", "What is in the picture?")["answer"])

Host side: tiles (SPEC §6), `chat`'s prompt (§B3), the tokenizer. Device side, one jitted program per
bucket: vision tower and projector on every tile, the vision rows scattered into the `<IMG_CONTEXT>`
positions, then the block sampler (`block_sampling`) over the G answer positions appended after the prompt.
The sequence is right-padded to a multiple of `programs.LENGTH_MULTIPLE` (padded keys are masked out), so
questions of similar length share a program (`programs.Program`).

`cache="prefix"` (opt-in, approximate) is Fast-dLLM's block cache: the first step of every block is a full
forward that refreshes every position's keys/values (prompt, finished blocks, later blocks); the block's
other steps run the LM over the block's B rows only and read every other position from that cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from pdlm_jax import block_sampling
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import EXACT, GenerationSettings, Mode
from pdlm_jax.handle import ModelHandle
from pdlm_jax.limits import Limits
from pdlm_jax.modeling.llada import put_rows, take_rows
from pdlm_jax.modeling.pdm import PerceptionDLM
from pdlm_jax.programs import Program, padded_length
from pdlm_jax.regions.prompt import build_question_text
from pdlm_jax.regions.tiling import ImageInput, TiledImage, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer


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
    mode: Mode = EXACT  # the sampler (`Mode.static`: the threshold is an input)


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


@struct.dataclass
class QuestionInputs:
    """What one call of the answering program takes: a batch of questions (one row each)."""

    pixel_values: np.ndarray  # (Bt, T, C, H, W) float32 tiles
    input_ids: np.ndarray  # (Bt, L) int32 prompt, right-padded
    image_positions: np.ndarray  # (Bt, T·n) int32 positions of <IMG_CONTEXT>
    answer_positions: np.ndarray  # (Bt, G) int32
    valid: np.ndarray  # (Bt, L) bool: prompt and answer rows (padded keys are masked out)
    threshold: np.ndarray  # () float32 of threshold unmasking


def question_inputs(prep: PreparedQuestion, bucket: Bucket, pad_id: int, threshold: float = 0.9) -> QuestionInputs:
    """Device inputs of one question (a batch of one row); `threshold`: of threshold unmasking."""
    P = len(prep.input_ids)
    ids = np.full(bucket.length, pad_id, np.int32)
    ids[:P] = prep.input_ids
    return QuestionInputs(
        pixel_values=prep.tiled.pixel_values[None].astype(np.float32),
        input_ids=ids[None],
        image_positions=prep.image_positions[None],
        answer_positions=(P + np.arange(bucket.gen_length, dtype=np.int32))[None],
        valid=(np.arange(bucket.length) < P + bucket.gen_length)[None],
        threshold=np.float32(threshold),
    )


def _answer_program(graphdef, state, x: QuestionInputs, *, cfg: PDLMConfig, mask_id: int, bucket: Bucket):
    """Answer tokens (Bt, G), the tokens after every forward (F, Bt, G; threshold unmasking: G entries, the first
    `forwards` filled) and the forwards run, for a batch of questions."""
    model = nnx.merge(graphdef, state)
    lm, B = model.lm, bucket.block_length

    def row_embeddings(pixel_values, input_ids, image_positions):
        vision = model.encode_tiles(pixel_values.astype(model.dtype))
        h = vision.shape[-1]
        return lm.embed(input_ids).at[image_positions].set(vision.reshape(-1, h).astype(model.dtype), mode="drop")

    embeds = jax.vmap(row_embeddings)(x.pixel_values, x.input_ids, x.image_positions)
    answer = x.answer_positions
    keys = x.valid[:, None, None, :]  # (Bt, 1, 1, L): padded keys are masked out, nothing else is

    def block_rows(block):
        return jax.lax.dynamic_slice_in_dim(answer, block * B, B, axis=1)

    def with_answer(embeds, tokens):  # every answer row: earlier blocks' final commits included
        return put_rows(embeds, answer, lm.embed(tokens))

    def full_forward(embeds, block):
        hidden, cache = lm.prefill(embeds, keys)
        return lm.logits(take_rows(hidden, block_rows(block))), cache

    if bucket.mode.cache == "prefix":
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
    if bucket.mode.unmask == "threshold":
        return block_sampling.denoise_blocks_threshold(logits_fn, embeds.shape[0], bucket.gen_length, B, x.threshold,
                                                       mask_id=mask_id, banned=banned, carry=carry)
    _, counts = block_sampling.block_schedule(bucket.gen_length, B, bucket.steps)
    tokens, history = block_sampling.denoise_blocks(logits_fn, embeds.shape[0], bucket.gen_length, B, counts,
                                                    mask_id=mask_id, banned=banned, carry=carry)
    return tokens, history, jnp.int32(history.shape[0])


def answer_program(model: nnx.Module | tuple, cfg: PDLMConfig, mask_id: int, mesh: Mesh | None = None,
                   trace: Callable[[Callable], Callable] | None = None, weight_layouts: str = "default") -> Program:
    """The answering program of `model` (one executable per `Bucket`; it takes `QuestionInputs`)."""
    return Program("answering", functools.partial(_answer_program, cfg=cfg, mask_id=mask_id), model, mesh, trace,
                   weight_layouts)


class QuestionAnswerer(ModelHandle):
    """A loaded PerceptionDLM-Base model, its tokenizer and its compiled programs (one per bucket). `trace` and
    `weight_layouts`: of a quantized model, as for `api.RegionCaptioner`."""

    def __init__(self, cfg: PDLMConfig, model: PerceptionDLM, tokenizer: Tokenizer, mesh: Mesh | None = None,
                 sampler: Mapping | None = None, limits: Limits | None = None, trace=None,
                 weight_layouts: str = "default"):
        if not cfg.is_base:
            raise PDLMError("QuestionAnswerer needs a PerceptionDLM-Base checkpoint (config variant 'base')")
        program = answer_program(model, cfg, tokenizer.special.mask, mesh, trace, weight_layouts)
        super().__init__(cfg, tokenizer, program, mesh, sampler, limits)

    def answer(self, image: ImageInput | TiledImage, question: str, settings: GenerationSettings | None = None, *,
               return_steps: bool = False, **overrides) -> dict:
        """Answer `question` about `image` (path, PIL image, uint8 array or `TiledImage`) as the reference's
        `demo/infer_dmllm.py` does (greedy). `settings` (else the checkpoint's `sampler.json`, else 128/128/128)
        with `overrides` over them: gen_length, block_length, steps, cache, unmask, mode (`self.settings`).
        `cache="prefix"` and `unmask="threshold:TAU"` are the opt-in fast modes (module docstring and
        `block_sampling.denoise_blocks_threshold`); with a threshold, `steps` only has to divide as usual.

        Result: {"answer" (the demo's text), "response_raw" (the G tokens decoded with special tokens),
        "token_ids" (the G generated ids), "question", "prompt_length", "image": {width, height, grid, tiles},
        "gen_length", "block_length", "steps", "mode", "seconds" (wall time, compilation included),
        "compile_seconds", "forwards", "tokens_per_forward"}; with `return_steps`, also "step_states": the G
        answer ids after every forward (the mask id where still masked).
        """
        start = time.perf_counter()
        settings = self.settings(settings, **overrides)
        if not isinstance(question, str) or not question.strip():
            raise PDLMError("question must be a non-empty string")
        size = image.size if isinstance(image, TiledImage) else self.limits.check_image(image)
        self.limits.check_answer(settings.gen_length, settings.steps, question, size)
        prep = prepare_question(image, question, self.tokenizer, self.cfg)
        P = len(prep.input_ids)
        bucket = Bucket(tiles=prep.tiled.num_tiles, length=padded_length(P + settings.gen_length),
                        gen_length=settings.gen_length, block_length=settings.block_length, steps=settings.steps,
                        mode=settings.mode.static)
        inputs = question_inputs(prep, bucket, self.tokenizer.special.eot, settings.mode.threshold)
        (tokens, history, forwards), compile_seconds = self.program.run(bucket, inputs)
        ids, forwards = np.asarray(tokens[0]), int(forwards)
        answer, raw = answer_text(self.tokenizer, ids)
        result = {
            "answer": answer, "response_raw": raw, "token_ids": ids.tolist(), "question": question,
            "prompt_length": P,
            "image": {"width": prep.tiled.size[0], "height": prep.tiled.size[1], "grid": list(prep.tiled.grid),
                      "tiles": prep.tiled.num_tiles},
            **settings.record(),
            "seconds": time.perf_counter() - start, "compile_seconds": compile_seconds,
            "forwards": forwards, "tokens_per_forward": settings.gen_length / forwards,
        }
        if return_steps:
            result["step_states"] = np.asarray(history)[:forwards, 0].tolist()
        return result
