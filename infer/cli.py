"""`pdlm-infer` / `python -m infer`: caption the masked regions of one image (flags of the reference demo)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pdlm_jax.files import write_json_atomic
from pdlm_jax.asset_paths import DEMO_BASE_MODEL, DEMO_MODEL, DEMO_SCENE
from pdlm_jax.errors import PDLMError

log = logging.getLogger("pdlm-infer")


from infer import answer as _answer  # PerceptionDLM-Base checkpoints: --question
from infer import dataset as _dataset  # the dataset mode: --annotations


def build_parser() -> argparse.ArgumentParser:
    from pdlm_jax.regions.prompt import DEFAULT_QUESTION

    p = argparse.ArgumentParser(
        prog="pdlm-infer",
        description="Caption each masked region of an image with PerceptionDLM (all regions denoised together).")
    p.add_argument("--checkpoint",
                   help="converted checkpoint directory (pdlm-convert or pdlm-train); default: the embedded demo "
                        "model, or with --question the embedded Base demo model")
    p.add_argument("--demo", action="store_true",
                   help="caption the bundled demo scene; writes demo_result.json and demo_overlay.png unless "
                        "--output/--visualize say otherwise; with --question: ask about the demo scene")
    p.add_argument("--image", help="input image (any format Pillow reads)")
    p.add_argument("--masks", nargs="+", default=[], metavar="MASK",
                   help="one binary mask image per region (nonzero = inside); results keep this order")
    p.add_argument("--gen-length", type=int,
                   help="caption slots per region, or answer positions on a PerceptionDLM-Base checkpoint "
                        "(default: the checkpoint's sampler.json, else 32; Base: 128)")
    p.add_argument("--steps", type=int,
                   help="denoising steps (default: the checkpoint's sampler.json, else 32; Base: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, the reference's setting")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus filtering when sampling (the reference accepts and ignores it)")
    p.add_argument("--prompt", default=DEFAULT_QUESTION, help=f"question text (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--seed", type=int, default=0, help="random seed for temperature > 0")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype; auto = the dtype the checkpoint stores (bf16 for the released model)")
    p.add_argument("--mesh", metavar="SPEC",
                   help="shard over devices, e.g. data:2,fsdp:2,tensor:2 (sizes multiply to the device count; "
                        "one may be -1); default: one device")
    p.add_argument("--cache", default="none", metavar="MODE",
                   help="opt-in fast mode: 'prefix' computes the prompt's keys/values once ('prefix:R' refreshes "
                        "them every R steps) and runs each step over the caption blocks only (approximate)")
    p.add_argument("--unmask", default="remask", metavar="MODE",
                   help="'remask' (the reference's schedule) or opt-in 'threshold:TAU': commit every slot with "
                        "confidence > TAU, at least one per caption per step (approximate, fewer forwards)")
    p.add_argument("--adapter", metavar="DIR",
                   help="LoRA adapter directory (pdlm-train's run.output_dir/adapter) to apply to --checkpoint; "
                        "its sampler.json and tokenizer take precedence")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="linear-layer weights stored as int8 (per-channel scales; half of bf16) or int4 (scales per "
                        "channel and group of 128 inputs; a quarter of bf16), qwix PTQ")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                   help="attention kernel; auto = cuDNN flash attention on GPU in bf16, else XLA")
    p.add_argument("--output", type=Path, help="write the result JSON here (default: print it)")
    p.add_argument("--visualize", metavar="PNG", help="write an overlay picture of masks and captions")
    p.add_argument("--reference-parser", action="store_true",
                   help="split captions with the reference demo's string parser (cuts at the first <|eot_id|>)")
    p.add_argument("--compilation-cache", metavar="DIR|none",
                   help="persistent JAX compilation cache folder; default: $PDLM_COMPILATION_CACHE, else "
                        "$XDG_CACHE_HOME/pdlm-jax/xla (~/.cache/pdlm-jax/xla); 'none' turns it off")
    p.add_argument("--history", action="store_true",
                   help="add \"history\" to the result: every region's slot tokens after each denoising step")
    p.add_argument("--visualize-steps", metavar="PNG",
                   help="draw the captions after every denoising step as a grid (steps x regions; masked slots "
                        "as boxes, each step's new tokens highlighted); implies --history")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    _dataset.add_annotation_args(p)
    _answer.add_question_args(p)
    return p


def generation_settings(args: argparse.Namespace):
    """The generation flags over the checkpoint's (or adapter's) sampler.json: one `GenerationSettings`,
    checked before any weight loads."""
    from pdlm_jax.generation import for_checkpoint

    return for_checkpoint(args.checkpoint, args.adapter, gen_length=args.gen_length, steps=args.steps,
                          block_length=args.block_length, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, cache=args.cache, unmask=args.unmask)


def _fill_demo_inputs(args: argparse.Namespace) -> None:
    """--demo: the bundled scene and output files where the user gave none."""
    if args.demo:
        args.image = args.image or str(DEMO_SCENE / "image.png")
        args.masks = args.masks or [str(p) for p in sorted(DEMO_SCENE.glob("mask_*.png"))]
        args.output = args.output or Path("demo_result.json")
        args.visualize = args.visualize or "demo_overlay.png"


def _check_single_image_args(args: argparse.Namespace, settings) -> None:
    """Fail fast on bad single-image arguments, before loading a (possibly very large) model."""
    from pdlm_jax.checkpoint import load_config
    from pdlm_jax.limits import for_checkpoint

    if not args.image:
        raise PDLMError("--image is required: the picture whose regions to caption")
    if not args.masks:
        raise PDLMError("--masks is required: give one mask image per region to caption")
    for what, path in [("image", args.image)] + [(f"mask {i}", m) for i, m in enumerate(args.masks)]:
        if not Path(path).is_file():
            raise PDLMError(f"{what} file {path} does not exist")
    for flag, path in (("--output", args.output), ("--visualize", args.visualize),
                       ("--visualize-steps", args.visualize_steps)):
        if path and not Path(path).resolve().parent.is_dir():
            raise PDLMError(f"{flag} {path}: folder {Path(path).resolve().parent} does not exist")
    settings.check_regions(len(args.masks), load_config(args.checkpoint).region.prompt_numbers)
    limits = for_checkpoint(args.checkpoint)
    size = limits.check_image(args.image)
    for i, mask in enumerate(args.masks):
        limits.check_image(mask, f"mask {i}")
    limits.check_caption(len(args.masks), settings.gen_length, args.prompt, size)


def _run(args: argparse.Namespace) -> int:
    args.checkpoint = args.checkpoint or str(DEMO_BASE_MODEL if args.question is not None else DEMO_MODEL)
    import pdlm_jax
    from pdlm_jax import compilation_cache
    from pdlm_jax.api import captioner
    from pdlm_jax.regions.masks import load_masks
    from pdlm_jax.regions.tiling import open_rgb

    def load():
        log.info("loading checkpoint %s (%s)", args.checkpoint, args.dtype)
        compilation_cache.configure(args.compilation_cache)
        return pdlm_jax.load(args.checkpoint, dtype=args.dtype,
                             mesh=args.mesh, attention=args.attention, adapter=args.adapter,
                             quantize=None if args.quantize == "none" else args.quantize)

    base = _answer.wants_answer(args)  # PDLMError for flags of the other kind
    settings = generation_settings(args)
    if base:
        return _answer.run_question(args, settings, load)
    _fill_demo_inputs(args)
    if args.annotations:  # dataset mode checks its own arguments, then calls load()
        return _dataset.run_annotations(_dataset.DatasetSettings.from_args(args, settings), load)
    _check_single_image_args(args, settings)
    handle = captioner(load())  # wants_answer sent Base checkpoints to answering above

    log.info("captioning %d region(s) of %s: %s", len(args.masks), args.image, settings.record())
    result = handle.caption_regions(args.image, args.masks, settings, question=args.prompt,
                                    reference_parser=args.reference_parser,
                                    history=args.history or bool(args.visualize_steps))
    log.info("done in %.2f s (%.2f s compiling), %d forwards, %.2f tokens/forward", result["seconds"],
             result["compile_seconds"], result["forwards"], result["tokens_per_forward"])
    if args.output:  # stdout is free: the captions, one line per region, then the files written
        write_json_atomic(args.output, result)
        for i, region in enumerate(result["regions"]):
            print(f"region {i}: {region['caption']}")
        print(f"wrote {args.output}")
    else:
        for i, region in enumerate(result["regions"]):
            log.info("region %d: %s", i, region["caption"])
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    if args.visualize:
        from infer.visualize import save_overlay

        image = open_rgb(args.image)
        masks = load_masks(args.masks, image.size)
        save_overlay(args.visualize, image, masks, [r["caption"] for r in result["regions"]])
        print(f"wrote {args.visualize}", file=sys.stdout if args.output else sys.stderr)
    if args.visualize_steps:
        from infer.visualize import save_steps

        tokenizer = handle.tokenizer
        save_steps(args.visualize_steps, result["history"], tokenizer.special.mask,
                   lambda t: tokenizer.decode([t], skip_special_tokens=False),
                   [r["caption"] for r in result["regions"]])
        print(f"wrote {args.visualize_steps}", file=sys.stdout if args.output else sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress from our loggers only; libraries (Orbax/absl, JAX) stay at warnings.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("pdlm-infer", "pdlm_jax"):
        logging.getLogger(name).setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at interpreter exit
        return code
    except PDLMError as e:
        print(f"pdlm-infer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdlm-infer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`pdlm-infer ... | head`): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE, the status a tool killed by the signal gets


if __name__ == "__main__":
    sys.exit(main())
