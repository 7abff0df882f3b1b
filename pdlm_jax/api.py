"""Python API: `pdlm_jax.load(checkpoint_dir)` → a handle whose `caption_regions` captions masked regions.

    import pdlm_jax
    model = pdlm_jax.load("checkpoints/perceptiondlm", dtype="bfloat16")  # no argument: the demo model
    result = model.caption_regions("photo.jpg", ["mask0.png", "mask1.png"])  # the checkpoint's gen_length/steps
    for region in result["regions"]:
        print(region["caption"])

The result is the same object `pdlm-infer` writes as JSON (schema in `RegionCaptioner.caption_regions`).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pdlm_jax import compilation_cache as compilation_cache_lib
from pdlm_jax import pipeline, programs, sharding
from pdlm_jax.answering import QuestionAnswerer
from pdlm_jax.asset_paths import DEMO_MODEL
from pdlm_jax.config import DTYPES, PDLMConfig, preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import GenerationSettings, sampler_source
from pdlm_jax.handle import ModelHandle
from pdlm_jax.limits import Limits, position_budget
from pdlm_jax.modeling.layout import model_shardings, param_shardings
from pdlm_jax.modeling.pdm import PerceptionDLM, from_tree
from pdlm_jax.regions.masks import MaskInput, area_order, load_masks
from pdlm_jax.regions.prepare import PreparedRegions, prepare_regions
from pdlm_jax.regions.prompt import ASSISTANT_HEADER, DEFAULT_QUESTION
from pdlm_jax.regions.tiling import ImageInput, TiledImage, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer

log = logging.getLogger("pdlm_jax")



def reference_captions(text: str, num_regions: int) -> list[str]:
    """The reference demo's `split_assistant_blocks` (SPEC §10) on the decoded full sequence.

    Takes the text after the last assistant header, cuts it at the FIRST `<|eot_id|>` (so a caption that
    contains `<|eot_id|>` ends there and every later caption is lost), then splits on the markers.
    """
    pieces = text.split(ASSISTANT_HEADER)
    body = pieces[-1].split("<|eot_id|>")[0] if len(pieces) > 1 else text
    captions = []
    for i in range(num_regions):
        tag = f"<|Mask_Cap_{i}|>"
        start = body.find(tag)
        if start == -1:
            captions.append("")
            continue
        start += len(tag)
        end = body.find(f"<|Mask_Cap_{i + 1}|>", start) if i < num_regions - 1 else len(body)
        captions.append(body[start:(len(body) if end == -1 else end)].strip())
    return captions


@dataclasses.dataclass
class _Pass:
    """One denoising pass: up to prompt_numbers masks of one image (a chunk), prepared on the host."""

    number: int  # position among all passes of the call
    item: int  # index of the (image, masks) pair in the call
    chunk: int
    members: list[int]  # mask indices (in the item's list) of this chunk, input order
    prep: PreparedRegions
    bucket: pipeline.Bucket
    tokens: np.ndarray | None = None  # (k, G) in area order, once run
    forwards: int = 0
    history: np.ndarray | None = None  # (forwards, k, G) slot tokens after each forward, when asked for


class RegionCaptioner(ModelHandle):
    """A loaded region-captioning model, its tokenizer and its compiled programs (one per input bucket).

    `sampler`: the checkpoint's sampler.json values (gen_length and steps when a call gives none; else the
    reference's 32/32). `trace`: wraps the program's lowering (pdlm_jax.quantize for int8 weights);
    `weight_layouts`: see `programs.Program`.
    """

    def __init__(self, cfg: PDLMConfig, model: PerceptionDLM, tokenizer: Tokenizer, mesh: Mesh | None = None,
                 sampler: Mapping | None = None, limits: Limits | None = None, trace=None,
                 weight_layouts: str = "default"):
        program = pipeline.caption_program(model, tokenizer.special.mask, mesh, trace, weight_layouts)
        super().__init__(cfg, tokenizer, program, mesh, sampler, limits)

    def caption_regions(self, image: ImageInput | TiledImage, masks: Sequence[MaskInput] | None = None,
                        settings: GenerationSettings | None = None, *, question: str = DEFAULT_QUESTION,
                        reference_parser: bool = False, batch_size: int | None = None, history: bool = False,
                        **overrides) -> dict:
        """Caption every mask of `image`; returns one JSON-ready dict. Many images: `caption_batch`.

        image: path, PIL image, uint8 array or an already tiled `TiledImage`; masks: paths, PIL images or
        arrays (nonzero = inside), one per region. More than `prompt_numbers` (6) masks are captioned in
        chunks of 6 in descending-area order, one denoising pass per chunk (captions within a chunk depend on
        each other). `question`: the region prompt. Inputs over `self.limits` (positions, masks, pixels) raise
        PDLMError (`TooLarge` for pixels) before any image is decoded or program compiled.

        Generation: `settings` (else the checkpoint's, `self.defaults`) with `overrides` over them (`self.settings`:
        gen_length, steps, temperature, top_p, seed, cache, unmask, mode). `steps` may not exceed k·gen_length
        for the smallest chunk's k. Greedy (temperature 0) reproduces the reference; temperature > 0 samples with
        `seed` (chunk c uses seed + c) and `top_p` nucleus filtering (the reference ignores top_p). `cache` /
        `unmask` select the opt-in fast modes (`generation.Mode.parse`: "prefix", "prefix:R", "threshold:0.9");
        the default is the reference's sampler.

        `masks` is required (its default only serves the error for a call without it).

        Result: {"regions": [one record per mask, in the order given: index, caption, token_ids (its
        gen_length generated ids), bbox (normalised x_min, y_min, x_max, y_max of the inclusive pixel
        extents, as the reference), prompt_id, area, chunk], "image": {width, height, grid, tiles},
        the settings (`GenerationSettings.record`), "question", "parser", "seconds" (wall time of the call,
        compilation included), "compile_seconds", "forwards" (LM forward passes, all chunks),
        "tokens_per_forward" (generated tokens / forwards), "warnings" (e.g. a mask of another size than the
        image, resized as the reference does)}. `reference_parser=True` takes captions from the reference demo's
        string parser (SPEC §10) instead of decoding each block's own tokens without special tokens.

        `history=True` adds "history": the slot tokens after every forward, one entry per forward (all chunks
        in turn), each a list with every region's gen_length ids in input order (the mask id where a slot is
        still masked; regions of later chunks are all masks); its last entry equals the final token_ids.
        """
        if masks is None:
            raise PDLMError("caption_regions(image, masks) captions one image and needs its masks; to caption a "
                            "list of (image, masks) pairs call caption_batch(items), which returns one result each")
        return self.caption_batch([(image, masks)], settings, question=question, reference_parser=reference_parser,
                                  batch_size=batch_size, history=history, **overrides)[0]

    def caption_batch(self, items: Sequence[tuple[ImageInput | TiledImage, Sequence[MaskInput]]],
                      settings: GenerationSettings | None = None, *, question: str = DEFAULT_QUESTION,
                      reference_parser: bool = False, batch_size: int | None = None, history: bool = False,
                      **overrides) -> list[dict]:
        """Caption many images: one result per (image, masks) pair, each as `caption_regions` gives it alone.

        The passes (chunks) of all images are grouped by bucket; the passes of one bucket run together as the
        rows of one jitted program, `batch_size` rows per call (default: all of the bucket's passes; a fixed
        size avoids compiling again for another count). Every image's chunk c uses seed + c. "seconds" and
        "compile_seconds" are those of the whole call; "forwards" counts the forwards of the programs that ran
        the image's passes.
        """
        start = time.perf_counter()
        settings = self.settings(settings, **overrides)
        gen_length = settings.gen_length
        if batch_size is not None and (not isinstance(batch_size, numbers.Integral) or batch_size < 1):
            raise PDLMError(f"batch_size must be a positive integer, got {batch_size!r}")
        per_pass = self.cfg.region.prompt_numbers
        pairs = isinstance(items, (list, tuple)) and all(isinstance(it, (list, tuple)) and len(it) == 2 for it in items)
        if not pairs:
            raise PDLMError("caption_batch takes a list of (image, masks) pairs; for one image call "
                            "caption_regions(image, masks)")
        for image, masks in items:
            settings.check_regions(len(masks), per_pass)
            size = image.size if isinstance(image, TiledImage) else self.limits.check_image(image)
            for j, mask in enumerate(masks):
                self.limits.check_image(mask, f"mask {j}")
            self.limits.check_caption(len(masks), gen_length, question, size)

        images, passes = [], []
        for i, (image, masks) in enumerate(items):
            tiled = image if isinstance(image, TiledImage) else tile_image(image, self.cfg.region)
            notes: list[str] = []
            loaded = load_masks(masks, tiled.size, notes)
            images.append((tiled, len(loaded), notes))
            order = area_order([int(m.sum()) for m in loaded])
            for c in range(0, len(order), per_pass):
                # Members in input order: the pass sorts them by area itself, with the same tie rule as above.
                members = sorted(int(j) for j in order[c:c + per_pass])
                prep = prepare_regions(tiled, [loaded[j] for j in members], self.tokenizer, self.cfg, gen_length,
                                       question)
                bucket = pipeline.choose_bucket(prep.pixel_values.shape[0], len(members), prep.layout.length,
                                                per_pass, settings)
                passes.append(_Pass(len(passes), i, c // per_pass, members, prep, bucket))

        compile_seconds = 0.0
        groups: dict[pipeline.Bucket, list[_Pass]] = {}
        for p in passes:
            groups.setdefault(p.bucket, []).append(p)
        for bucket, group in groups.items():
            size = batch_size or len(group)
            for b in range(0, len(group), size):
                batch = dataclasses.replace(bucket, batch=size, history=history)
                compile_seconds += self._run(group[b:b + size], batch, settings, len(passes))

        results = []
        for i, (tiled, num_masks, notes) in enumerate(images):
            mine = [p for p in passes if p.item == i]
            records: list[dict | None] = [None] * num_masks
            for p in mine:
                captions = self._captions(p.prep, p.tokens, reference_parser)
                for slot, local in enumerate(p.prep.order):
                    j = p.members[local]
                    records[j] = {"index": j, "caption": captions[slot], "token_ids": p.tokens[slot].tolist(),
                                  "bbox": [float(v) for v in p.prep.boxes[slot]],
                                  "prompt_id": int(p.prep.prompt_ids[slot]), "area": int(p.prep.areas[slot]),
                                  "chunk": p.chunk}
            forwards = sum(p.forwards for p in mine)
            results.append({
                "regions": records,
                "image": {"width": tiled.size[0], "height": tiled.size[1], "grid": list(tiled.grid),
                          "tiles": tiled.num_tiles},
                **settings.record(), "question": question,
                "parser": "reference" if reference_parser else "blocks",
                "seconds": time.perf_counter() - start,
                "compile_seconds": compile_seconds,
                "forwards": int(forwards),
                "tokens_per_forward": num_masks * gen_length / forwards,
                "warnings": notes,
            })
            if history:
                results[-1]["history"] = self._history(mine, num_masks, gen_length).tolist()
        return results

    def _run(self, group: list[_Pass], bucket: pipeline.Bucket, settings: GenerationSettings, total: int) -> float:
        """Run the passes of one bucket as the rows of one call; fills their tokens; returns compile seconds."""
        rows = [pipeline.pass_inputs(p.prep, bucket, self.cfg, self.tokenizer.special.eot, settings.seed + p.chunk)
                for p in group]
        schedules = [(p.prep.layout.num_regions * bucket.gen_length, settings.steps) for p in group]
        inputs = pipeline.batch_inputs(rows, schedules, bucket, settings)
        (tokens, forwards, *history), compile_seconds = self.program.run(bucket, inputs)
        shape = (bucket.batch, bucket.regions, bucket.gen_length)
        tokens, forwards = np.asarray(tokens).reshape(shape), int(forwards)
        if bucket.history:  # the slot tokens after each forward
            history = np.asarray(history[0])[:forwards].reshape(forwards, *shape)
        for row, (p, t) in enumerate(zip(group, tokens)):
            p.tokens, p.forwards = t[:p.prep.layout.num_regions], forwards
            if bucket.history:
                p.history = history[:, row, :p.prep.layout.num_regions]
            log.info("pass %d/%d: %d region(s), %d forwards%s", p.number + 1, total, len(p.members), forwards,
                     f" (batch of {len(group)})" if bucket.batch > 1 else "")
        if compile_seconds:
            log.info("compiled in %.1f s", compile_seconds)
        return compile_seconds

    def _history(self, passes: list[_Pass], num_masks: int, gen_length: int) -> np.ndarray:
        """(forwards, num_masks, G): one image's slot tokens after each forward of its passes, in chunk order."""
        current = np.full((num_masks, gen_length), self.tokenizer.special.mask, np.int32)
        steps = []
        for p in passes:
            regions = [p.members[local] for local in p.prep.order]  # area-order slot -> input index
            for tokens in p.history:
                current[regions] = tokens
                steps.append(current.copy())
        return np.stack(steps)

    def full_sequence(self, prep: PreparedRegions, tokens: np.ndarray) -> np.ndarray:
        """The reference's returned ids: the RoI-expanded prompt with the generated slots filled in."""
        ids = prep.layout.input_ids[: prep.layout.length].copy()
        ids[prep.layout.gen_positions] = tokens
        return ids

    def _captions(self, prep: PreparedRegions, tokens: np.ndarray, reference_parser: bool) -> list[str]:
        if reference_parser:
            text = self.tokenizer.decode(self.full_sequence(prep, tokens), skip_special_tokens=False)
            return reference_captions(text, len(tokens))
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


# What `load` returns: the checkpoint's kind decides which. Both are `ModelHandle`s (cfg, tokenizer, limits,
# generation settings, compiled program), but their methods differ (caption_regions/caption_batch vs answer);
# a caller that needs one kind says so with `captioner(handle)` or `answerer(handle)`, which raise a clear
# PDLMError for the other kind.
Handle = RegionCaptioner | QuestionAnswerer


def captioner(handle: Handle) -> RegionCaptioner:
    """`handle` itself, if it captions regions; PDLMError for a PerceptionDLM-Base checkpoint."""
    if not isinstance(handle, RegionCaptioner):
        raise PDLMError("this is a PerceptionDLM-Base checkpoint: it answers questions about the whole image "
                        "(answer(image, question)); region captioning needs a PerceptionDLM checkpoint")
    return handle


def answerer(handle: Handle) -> QuestionAnswerer:
    """`handle` itself, if it answers questions; PDLMError for a region-captioning checkpoint."""
    if not isinstance(handle, QuestionAnswerer):
        raise PDLMError("this is a PerceptionDLM region-captioning checkpoint: give masks to caption_regions; "
                        "answering questions about a whole image needs a PerceptionDLM-Base checkpoint")
    return handle


def load(checkpoint_dir: str | Path = DEMO_MODEL, dtype: str = "auto", compilation_cache: str | Path | None = None,
         mesh: str | dict | Mesh | None = None, attention: str = "auto", adapter: str | Path | None = None,
         quantize: str | None = None) -> Handle:
    """Load a checkpoint converted by `pdlm-convert` (config, weights, tokenizer) for region captioning (or, for
    a PerceptionDLM-Base checkpoint, question answering). `checkpoint_dir`: a folder, a bucket URL (`gs://...`,
    copied into a local cache once) or `hf://ORG/NAME[@REVISION]` of a Hub repository that holds a pdlm-jax
    checkpoint (a reference-format repository such as MSALab/PerceptionDLM is converted with
    `pdlm-convert --src hf://...` first).

    With no argument: the embedded demo model (`DEMO_MODEL`). The handle's gen_length / steps defaults come
    from the checkpoint's sampler.json, as in pdlm-infer.

    dtype: "auto" (the dtype the weights are stored in: bf16 for the released model, float32 for float32
    sources, so converted reference checkpoints reproduce the reference's own run), "bfloat16" or "float32".
    compilation_cache: a folder for JAX's persistent compilation cache, so later processes skip compiling
    the same buckets. mesh: shard over devices, e.g. "data:2,fsdp:2,tensor:2" (`sharding.make_mesh`; one size
    may be -1): parameters are restored straight into their shardings (a dimension that does not divide its
    mesh axes is replicated) and batches are split over data × fsdp. attention: see `attention_implementation`.
    adapter: a LoRA adapter directory (pdlm-train's run.output_dir/adapter) trained on this checkpoint; its
    weights are merged into the base on load, and its tokenizer (if it has one) replaces the base's.
    quantize: "int8" stores every linear kernel as int8 with per-channel scales, "int4" as int4 with a scale
    per output channel and group of 128 input rows (pdlm_jax.quantize).
    The handle's `limits` take the position budget from the checkpoint (`pdlm_jax.limits`).

    A checkpoint whose files are damaged (a truncated or missing array file, a wrong dtype or shape on
    disk) raises PDLMError naming it, before any weight is used.
    """
    from pdlm_jax.checkpoint import load_config, params_metadata, read_sampler, restore_params, tokenizer_path
    from pdlm_jax.files import local_directory

    # A bucket URL or hf:// id becomes a local folder once (a cached copy / the Hub snapshot).
    checkpoint_dir = local_directory(checkpoint_dir, "checkpoint")
    adapter = None if adapter is None else local_directory(adapter, "adapter")

    if dtype == "auto":
        stored = {np.dtype(d) for _, d in params_metadata(checkpoint_dir).values()}
        dtype = "float32" if np.dtype(np.float32) in stored else "bfloat16"
    if dtype not in DTYPES:
        raise PDLMError(f"dtype must be one of auto, {', '.join(sorted(DTYPES))}; got {dtype!r}")
    mesh = _as_mesh(mesh)
    shardings = None if mesh is None else model_shardings(load_config(checkpoint_dir), mesh)
    # PDLMError if not a converted checkpoint
    if quantize is not None:
        from pdlm_jax import quantize as quantize_lib
        quantize_lib.check_mode(quantize)
    cfg, tree = restore_params(checkpoint_dir, dtype=DTYPES[dtype], shardings=shardings)
    tokenizer = Tokenizer(tokenizer_path(checkpoint_dir), base=cfg.is_base)
    if adapter is not None:
        from pdlm_jax import lora
        lora_cfg, adapters = lora.load_adapter(adapter, cfg)
        if mesh is not None:
            adapters = jax.device_put(adapters, sharding.replicated(mesh))
        tree = lora.merge(tree, adapters, lora_cfg)
        if (Path(adapter) / "tokenizer.json").exists():
            tokenizer = Tokenizer(Path(adapter) / "tokenizer.json", base=cfg.is_base)
    if compilation_cache is not None:
        compilation_cache_lib.enable(compilation_cache)
    model = from_tree(cfg, tree, dtype=DTYPES[dtype],
                      attention_implementation=attention_implementation(attention, DTYPES[dtype]))
    limits = Limits(cfg, tokenizer, position_budget(checkpoint_dir))
    sampler = read_sampler(sampler_source(checkpoint_dir, adapter))
    trace = None
    if quantize is not None:
        model, trace = quantize_lib.quantize_model(model, quantize)
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    # PerceptionDLM-Base answers questions (pdlm_jax.answering), the region model captions regions
    handle = QuestionAnswerer if cfg.is_base else RegionCaptioner
    return handle(cfg, model, tokenizer, mesh, sampler, limits, trace, programs.weight_layouts(quantize, platform))


def load_random(cfg: PDLMConfig | str, tokenizer_dir: str | Path, dtype: str = "bfloat16", seed: int = 0,
                mesh: str | dict | Mesh | None = None, attention: str = "auto") -> RegionCaptioner:
    """A handle on a model with random weights (benchmarks): `cfg` or a preset name ("perceptiondlm-8b").

    The parameters are initialised by one jitted program straight into their shardings on the device(s),
    never on the host. Any tokenizer whose ids fit the vocabulary serves (the prompt only needs its
    special tokens).
    """
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    if dtype not in DTYPES:
        raise PDLMError(f"dtype must be one of {', '.join(sorted(DTYPES))}; got {dtype!r}")
    tokenizer = Tokenizer(tokenizer_dir)
    if max(tokenizer.vocab_size, *tokenizer.special.all_ids()) > cfg.lm.vocab_size:
        raise PDLMError(f"tokenizer {tokenizer.file} has ids beyond the model's vocabulary of {cfg.lm.vocab_size}")
    mesh = _as_mesh(mesh)
    dt = DTYPES[dtype]
    make = lambda: PerceptionDLM(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(seed),  # noqa: E731
                                 attention_implementation=attention_implementation(attention, dt))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    out = None if mesh is None else param_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=out)()
    return RegionCaptioner(cfg, nnx.merge(graphdef, state), tokenizer, mesh)


def attention_implementation(name: str, dtype) -> str:
    """"auto" → the fused cuDNN kernel of `jax.nn.dot_product_attention` on GPU in bf16 (with the
    structured mask), else "xla" (our reference-rounding attention, the only one that is token-exact on CPU)."""
    if name == "auto":
        return "cudnn" if jax.default_backend() == "gpu" and dtype == jnp.bfloat16 else "xla"
    if name not in ("xla", "cudnn"):
        raise PDLMError(f"attention must be auto, xla or cudnn; got {name!r}")
    return name


def _as_mesh(mesh: str | dict | Mesh | None) -> Mesh | None:
    return mesh if mesh is None or isinstance(mesh, Mesh) else sharding.make_mesh(mesh)
