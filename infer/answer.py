"""`pdlm-infer --question` on a PerceptionDLM-Base checkpoint: answer a question about the whole image."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from pdlm_jax.errors import PDLMError

log = logging.getLogger("pdlm-infer")


def add_question_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", help="PerceptionDLM-Base checkpoints: the question to answer about the image")
    p.add_argument("--block-length", type=int,
                   help="PerceptionDLM-Base: positions per decoding block (default: the checkpoint's "
                        "sampler.json, else 128 as the reference demo)")


def wants_answer(args: argparse.Namespace) -> bool:
    """True for a PerceptionDLM-Base checkpoint; PDLMError where the flags do not fit the checkpoint."""
    from pdlm_jax.checkpoint import load_config

    base = load_config(args.checkpoint).is_base
    if base and (args.masks or getattr(args, "annotations", None)):
        raise PDLMError(f"{args.checkpoint} is a PerceptionDLM-Base checkpoint: it answers --question about the "
                        "whole image and takes no --masks/--annotations; captioning regions needs a "
                        "PerceptionDLM checkpoint")
    if not base and args.question is not None:
        raise PDLMError(f"{args.checkpoint} is a PerceptionDLM region-captioning checkpoint: --question needs a "
                        "PerceptionDLM-Base checkpoint; give --masks to caption regions (and --prompt to change "
                        "the region prompt)")
    if not base and args.block_length is not None:
        raise PDLMError("--block-length applies to PerceptionDLM-Base checkpoints (block diffusion) only")
    return base


def run_question(args: argparse.Namespace, settings, load: Callable) -> int:
    """Check the arguments (before loading the model), answer with `settings` (`GenerationSettings`, already
    resolved and checked), write or print the JSON."""
    from pdlm_jax.api import answerer
    from pdlm_jax.asset_paths import DEMO_SCENE
    from pdlm_jax.files import write_json_atomic
    from pdlm_jax.limits import for_checkpoint

    if args.demo:
        args.image = args.image or str(DEMO_SCENE / "image.png")
    if not args.image:
        raise PDLMError("--image is required: the picture the question is about")
    if not Path(args.image).is_file():
        raise PDLMError(f"image file {args.image} does not exist")
    if not args.question or not args.question.strip():
        raise PDLMError("--question is required on a PerceptionDLM-Base checkpoint (e.g. --question "
                        "\"What is in the picture?\")")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise PDLMError(f"--output {args.output}: folder {Path(args.output).resolve().parent} does not exist")
    if args.visualize or args.visualize_steps:
        raise PDLMError("PerceptionDLM-Base answering draws no regions: --visualize and --visualize-steps do not "
                        "apply")
    limits = for_checkpoint(args.checkpoint)
    limits.check_answer(settings.gen_length, settings.steps, args.question, limits.check_image(args.image))

    handle = answerer(load())
    log.info("answering about %s: %s", args.image, settings.record())
    result = handle.answer(args.image, args.question, settings, return_steps=args.history)
    log.info("done in %.2f s (%.2f s compiling), %d forwards", result["seconds"], result["compile_seconds"],
             result["forwards"])
    log.info("answer: %s", result["answer"])
    if args.output:  # stdout is free: the answer, then the file written
        write_json_atomic(args.output, result)
        print(f"{args.question} {result['answer']}")
        print(f"wrote {args.output}")
    else:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    return 0
