"""`python -m infer.bench_base`: PerceptionDLM-Base answering per mode and schedule; print a table, write JSON.

    python -m infer.bench_base --checkpoint DIR --image IMG --question "What is in the picture?" \\
        --schedules 128/128/128,128/32/128 --modes exact,prefix --repeats 3 [--random-lm 512,8] --json out.json

A schedule is G/B/S (gen_length / block_length / steps). Modes: `exact` (the reference's sampler: a full
forward every step) and `prefix` (opt-in block cache: a full forward at each block's first step, the block's
rows only at the others). Row fields: seconds = median over --repeats steady-state calls (preprocessing
included); compile_seconds of the first call; forwards; full_forwards (forwards over the whole sequence);
agreement = fraction of the G answer ids equal to the exact mode's for the same schedule (printed, never
asserted: the cache mode is approximate); same_answer = the answer text equals the exact mode's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from pdlm_jax.errors import PDLMError

COLUMNS = ("schedule", "mode", "seconds", "compile_s", "forwards", "full_fwd", "agreement", "same_answer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted PerceptionDLM-Base checkpoint (pdlm-convert)")
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="What is in the picture?")
    p.add_argument("--schedules", default="128/128/128,128/32/128", help="comma-separated G/B/S")
    p.add_argument("--modes", default="exact,prefix")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row after the compiling one")
    p.add_argument("--random-lm", metavar="HIDDEN,LAYERS",
                   help="time random weights instead: the checkpoint's config and tokenizer with an LLaDA of this "
                        "width and depth (e.g. 512,8; heads of 64), built on the device")
    p.add_argument("--json", type=Path, help="write the rows here")
    return p


def _load(args):
    """The checkpoint, or random weights of its architecture with a wider LM (--random-lm)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import pdlm_jax
    from pdlm_jax.answering import QuestionAnswerer
    from pdlm_jax.checkpoint import load_config, tokenizer_path
    from pdlm_jax.modeling.pdm import PerceptionDLM
    from pdlm_jax.regions.tokenizer import Tokenizer

    if not args.random_lm:
        return pdlm_jax.load(args.checkpoint)
    try:
        hidden, layers = (int(v) for v in args.random_lm.split(","))
    except ValueError:
        raise PDLMError(f"--random-lm {args.random_lm!r}: give HIDDEN,LAYERS, e.g. 512,8") from None
    cfg = load_config(args.checkpoint)
    cfg = cfg.replace(lm=dataclasses.replace(cfg.lm, hidden_size=hidden, intermediate_size=3 * hidden,
                                             num_layers=layers, num_heads=max(1, hidden // 64),
                                             num_kv_heads=max(1, hidden // 64))).validate()
    make = lambda: PerceptionDLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())
    return QuestionAnswerer(cfg, model, Tokenizer(tokenizer_path(args.checkpoint), base=True))


def _schedules(text: str) -> list[tuple[int, int, int]]:
    try:
        out = [tuple(int(v) for v in s.split("/")) for s in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(s) != 3 for s in out):
        raise PDLMError(f"--schedules {text!r}: give comma-separated G/B/S triples, e.g. 128/32/128")
    return out


def run(args) -> list[dict]:
    handle = _load(args)
    if not handle.cfg.is_base:
        raise PDLMError(f"{args.checkpoint} is not a PerceptionDLM-Base checkpoint")
    modes = [m.strip() for m in args.modes.split(",")]
    rows = []
    for G, B, S in _schedules(args.schedules):
        exact = None
        for mode in (["exact"] if "exact" not in modes else []) + modes:  # exact first: the agreement baseline
            cache = "none" if mode == "exact" else mode
            call = lambda: handle.answer(args.image, args.question, gen_length=G, block_length=B,  # noqa: E731
                                         steps=S, cache=cache)
            first = call()
            seconds = statistics.median(call()["seconds"] for _ in range(args.repeats))
            exact = exact or first
            agreement = sum(a == b for a, b in zip(first["token_ids"], exact["token_ids"])) / G
            row = dict(schedule=f"{G}/{B}/{S}", mode=mode, seconds=seconds, compile_s=first["compile_seconds"],
                       forwards=first["forwards"], full_fwd=first["forwards"] if cache == "none" else G // B,
                       agreement=agreement, same_answer=first["answer"] == exact["answer"])
            if mode in modes:
                rows.append(row)
                print("  ".join(f"{_fmt(row[c]):>12}" for c in COLUMNS), flush=True)
    return rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print("  ".join(f"{c:>12}" for c in COLUMNS))
        rows = run(args)
        if args.json:
            from pdlm_jax.files import write_json_atomic

            write_json_atomic(args.json, rows)
    except PDLMError as e:
        print(f"bench_base: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
