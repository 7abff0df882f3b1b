"""`pdlm-convert`: reference safetensors -> our checkpoint, or back with --to-safetensors."""

from __future__ import annotations

import argparse
import os
import sys

from pdlm_jax.errors import PDLMError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pdlm-convert",
        description="Convert a reference PerceptionDLM checkpoint (safetensors) into a pdlm-jax checkpoint "
                    "(Orbax), or export one back with --to-safetensors.")
    p.add_argument("--src", required=True, help="reference checkpoint dir (or ours with --to-safetensors)")
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
    from convert.export import export
    from convert.writer import convert

    log = (lambda s: print(s, flush=True)) if args.verbose else (lambda s: None)
    try:
        if args.to_safetensors:
            if args.keep_unused:
                raise PDLMError("--keep-unused applies to conversion; export writes back whatever was kept")
            summary = export(args.src, args.dst, dtype=args.dtype, force=args.force,
                             max_shard_bytes=int(args.max_shard_gb * 1e9), log=log)
        else:
            summary = convert(args.src, args.dst, dtype=args.dtype, force=args.force,
                              keep_unused=args.keep_unused, log=log)
    except PDLMError as e:
        print(f"pdlm-convert: error: {e}", file=sys.stderr)
        return 2  # bad input, as every pdlm CLI
    print(f"{args.src} -> {args.dst}")
    print(summary.format())
    return 0
