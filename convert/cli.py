"""`pdlm-convert`: reference safetensors -> our checkpoint, back with --to-safetensors, or a PerceptionDLM-Base
starting checkpoint composed from LLaDA + SigLIP with --compose. Sources may be folders, bucket URLs or
`hf://ORG/NAME[@REVISION]` ids."""

from __future__ import annotations

import argparse
import os
import sys

from pdlm_jax.errors import PDLMError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pdlm-convert",
        description="Convert a reference PerceptionDLM checkpoint (safetensors) into a pdlm-jax checkpoint "
                    "(Orbax), export one back with --to-safetensors, or compose a PerceptionDLM-Base starting "
                    "checkpoint from LLaDA and SigLIP with --compose. Sources: a folder, a bucket URL (gs://...) "
                    "or a Hugging Face id hf://ORG/NAME[@REVISION].")
    p.add_argument("--src", help="reference checkpoint dir (or ours with --to-safetensors)")
    p.add_argument("--compose", action="store_true",
                   help="build a PerceptionDLM-Base checkpoint from --lm and --vision with a new projector")
    p.add_argument("--lm", help="--compose: LLaDA checkpoint in Hugging Face form (model_type llada; e.g. "
                                "hf://GSAI-ML/LLaDA-8B-Instruct) with its tokenizer")
    p.add_argument("--vision", help="--compose: SigLIP/SigLIP2 checkpoint (SiglipModel or SiglipVisionModel; e.g. "
                                    "hf://google/siglip2-so400m-patch16-512)")
    p.add_argument("--seed", type=int, default=0, help="--compose: seed of the projector's initialisation")
    p.add_argument("--dst", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="stored dtype; auto keeps bf16 weights bf16 and stores anything else as float32 "
                        "(export: auto writes each tensor in its original dtype)")
    p.add_argument("--force", action="store_true", help="replace --dst if it exists")
    p.add_argument("--keep-unused", action="store_true",
                   help="keep the tensors we do not use (text tower, ...) raw in the checkpoint, so that "
                        "--to-safetensors can write them back")
    p.add_argument("--to-safetensors", action="store_true",
                   help="export our checkpoint --src as a reference-format checkpoint --dst")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="export: maximum shard size in GB")
    p.add_argument("-v", "--verbose", action="store_true", help="print each leaf as it is written")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Conversion is host-only work; do not let JAX (imported by Orbax) grab an accelerator.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from convert.export_safetensors import export
    from convert.writer import convert
    from pdlm_jax.files import local_directory

    log = (lambda s: print(s, flush=True)) if args.verbose else (lambda s: None)
    try:
        if args.compose:
            from convert.compose import compose

            if not (args.lm and args.vision) or args.src or args.to_safetensors:
                raise PDLMError("--compose takes --lm LLaDA and --vision SigLIP (folders or hf:// ids) and --dst, "
                                "not --src or --to-safetensors")
            source = f"{args.lm} + {args.vision}"
            summary = compose(args.lm, args.vision, args.dst, dtype=args.dtype, force=args.force,
                              keep_unused=args.keep_unused, seed=args.seed, log=log)
        elif not args.src or args.lm or args.vision:
            raise PDLMError("--src is required (--lm and --vision go with --compose)")
        elif args.to_safetensors:
            if args.keep_unused:
                raise PDLMError("--keep-unused applies to conversion; export writes back whatever was kept")
            source = args.src
            summary = export(local_directory(args.src, "--src"), args.dst, dtype=args.dtype, force=args.force,
                             max_shard_bytes=int(args.max_shard_gb * 1e9), log=log)
        else:
            source = args.src
            summary = convert(local_directory(args.src, "--src"), args.dst, dtype=args.dtype, force=args.force,
                              keep_unused=args.keep_unused, log=log)
    except PDLMError as e:
        print(f"pdlm-convert: error: {e}", file=sys.stderr)
        return 2  # bad input, as every pdlm CLI
    print(f"{source} -> {args.dst}")
    print(summary.format())
    return 0
