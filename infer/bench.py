"""`python -m infer.bench`: time region captioning per mode, region count and batch size; print a table, write JSON.

    python -m infer.bench --checkpoint DIR | --random-weights PRESET --image IMG --masks M0 M1 ... \\
        --gen-length 32 --steps 32 --modes exact,prefix,threshold --batch 1,4 --repeats 3 --json out.json

Modes: `exact` (the reference's sampler), `prefix[:R]` (prefix K/V cache), `threshold[:TAU]` (confidence
threshold, TAU 0.9 by default), combinations joined by '+' ("prefix+threshold:0.8"), and the `sequential`
baseline (one region per denoising pass, the passes one after another, batch 1) which always runs unless
--no-sequential. A row is timed for every mode × k × batch: k regions (the first k of --masks; --num-masks
lists several k) of `batch` copies of the image in one call.

Row fields: seconds_per_image = median over --repeats steady-state calls of wall time (preprocessing
included) / batch; compile_seconds of the first call; forwards per image; tokens_per_forward;
tokens_per_second = k·G·batch / call seconds; peak_memory_bytes = the largest compiled program's arguments +
temporaries + outputs (XLA's memory analysis; the device's own peak counter, when it has one, is in
device_peak_bytes); mfu = analytic model FLOPs of the work done (vision + LM matmuls and attention, lm_head at
the slots) / seconds / peak FLOP/s (--peak-tflops, known for H100/H200/A100 in bf16; null otherwise);
agreement = fraction of generated tokens equal to the exact mode's for the same k and batch.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pdlm_jax.errors import PDLMError
from pdlm_jax.flops import model_flops

log = logging.getLogger("pdlm-bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT / "configs" / "demo_tokenizer"
# Dense bf16 peak FLOP/s by device kind substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted checkpoint directory (pdlm-convert)")
    src.add_argument("--random-weights", metavar="PRESET",
                     help="random weights of a preset (e.g. perceptiondlm-8b, tiny-wide), built on the device")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer for --random-weights (any tokenizer with the special tokens)")
    p.add_argument("--image", required=True)
    p.add_argument("--masks", nargs="+", required=True, metavar="MASK")
    p.add_argument("--num-masks", default=None,
                   help="comma-separated k values (the first k masks), run in this order; default: all masks")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--modes", default="exact,prefix,threshold")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-region-per-pass baseline")
    p.add_argument("--batch", default="1", help="comma-separated images per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row after the compiling one")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="auto: the checkpoint's dtype, bfloat16 for random weights")
    p.add_argument("--mesh", help="device mesh, e.g. data:2,fsdp:2,tensor:2")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s of one device in TFLOP/s, for mfu")
    p.add_argument("--time-budget", type=float,
                   help="seconds: start no new row after this (rows run k by k in --num-masks order)")
    p.add_argument("--json", type=Path, help="write {'rows': [...]} here (rewritten after every row)")
    return p


def parse_mode(name: str):
    """'sequential' (None: the one-region-per-pass baseline) or a sampler mode (`generation.Mode.from_name`)."""
    from pdlm_jax.generation import Mode

    if name == "sequential":
        return None
    try:
        return Mode.from_name(name)
    except PDLMError as e:
        raise PDLMError(f"--modes {name!r}: {e} (or sequential)") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise PDLMError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise PDLMError(f"{what} must be positive, got {text!r}")
    return values


def _peak_flops(args, dtype: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    import jax

    kind = jax.devices()[0].device_kind
    peak = next((v for name, v in PEAK_TFLOPS.items() if name in kind), None)
    return peak * 1e12 if peak and dtype == "bfloat16" else None


def _program_bytes(executables) -> int | None:
    sizes = []
    for exe in executables:
        try:
            m = exe.memory_analysis()
            sizes.append(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                         - m.alias_size_in_bytes)
        except Exception:  # not every backend reports it
            pass
    return max(sizes) if sizes else None


def _device_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _load(args):
    import pdlm_jax
    from pdlm_jax.api import captioner, load_random

    if args.checkpoint:
        return captioner(pdlm_jax.load(args.checkpoint, dtype=args.dtype, mesh=args.mesh, attention=args.attention))
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    start = time.perf_counter()
    handle = load_random(args.random_weights, args.tokenizer, dtype=dtype, mesh=args.mesh, attention=args.attention)
    log.info("random %s weights built on the device in %.1f s", args.random_weights, time.perf_counter() - start)
    return handle


def run(args) -> list[dict]:
    import jax

    from pdlm_jax.regions.masks import load_masks
    from pdlm_jax.regions.prepare import prepare_regions
    from pdlm_jax.regions.tiling import tile_image

    modes = args.modes.split(",") + ([] if args.no_sequential or "sequential" in args.modes else ["sequential"])
    samplers = {m: parse_mode(m) for m in modes}
    batches = _ints(args.batch, "--batch")
    ks = _ints(args.num_masks, "--num-masks") if args.num_masks else [len(args.masks)]
    if max(ks) > len(args.masks):
        raise PDLMError(f"--num-masks asks for {max(ks)} masks but {len(args.masks)} were given")
    handle = _load(args)
    cfg, G = handle.cfg, args.gen_length
    dtype = str(handle.program.state["lm"]["embed"]["embedding"][...].dtype)
    peak = _peak_flops(args, dtype)
    tiled = tile_image(args.image, cfg.region)
    masks = load_masks(args.masks, tiled.size)
    rows, exact_tokens, start = [], {}, time.perf_counter()
    for k in ks:
        length = prepare_regions(tiled, masks[:k], handle.tokenizer, cfg, G).layout.length
        single = [prepare_regions(tiled, [m], handle.tokenizer, cfg, G).layout.length for m in masks[:k]]
        for mode in modes:
            for batch in ([1] if mode == "sequential" else batches):
                if args.time_budget and time.perf_counter() - start > args.time_budget:
                    log.warning("time budget of %.0f s spent: skipping the remaining rows", args.time_budget)
                    return rows
                sampler = samplers[mode]
                row = _time_row(handle, args.image, args.masks[:k], mode, sampler, batch, args)
                full, cached = sampler.forward_split(row["forwards"]) if sampler else (row["forwards"], 0)
                flops = model_flops(cfg, tiled.num_tiles, single if mode == "sequential" else [length],
                                    [1] * k if mode == "sequential" else [k], G, full, cached)
                row["mfu"] = flops / row["seconds_per_image"] / peak if peak else None
                if mode == "exact":
                    exact_tokens[(k, batch)] = row.pop("tokens")
                else:
                    tokens = row.pop("tokens")
                    want = exact_tokens.get((k, batch), exact_tokens.get((k, 1)))
                    row["agreement"] = float(np.mean(np.asarray(tokens) == np.asarray(want))) if want else None
                row |= dict(device=jax.devices()[0].device_kind, devices=jax.device_count(), dtype=dtype,
                            tiles=tiled.num_tiles, length=length, gen_length=G, steps=args.steps)
                rows.append(row)
                log.info("%s", _format_row(row))
                if args.json:
                    _write(args.json, rows)
    return rows


def _time_row(handle, image, masks, mode: str, sampler, batch: int, args) -> dict:
    """One warm-up (compiling) call, then `repeats` timed calls from the files (preprocessing included)."""
    G, steps = args.gen_length, args.steps
    before = set(handle.program.executables)

    def call():
        t0 = time.perf_counter()
        if sampler is None:  # sequential: one region per denoising pass, one pass after another
            results = [handle.caption_regions(image, [m], gen_length=G, steps=min(steps, G)) for m in masks]
            compile_s = sum(r["compile_seconds"] for r in results)
            forwards = sum(r["forwards"] for r in results)
            tokens = [r["regions"][0]["token_ids"] for r in results]
        else:
            results = handle.caption_batch([(image, masks)] * batch, gen_length=G, steps=steps, mode=sampler)
            compile_s, forwards = results[0]["compile_seconds"], results[0]["forwards"]
            tokens = [[r["token_ids"] for r in res["regions"]] for res in results]
        return time.perf_counter() - t0, compile_s, forwards, tokens

    _, compile_seconds, forwards, tokens = call()
    seconds = [call()[0] for _ in range(args.repeats)]
    per_call = statistics.median(seconds)
    new = [e for b, e in handle.program.executables.items() if b not in before] or \
        list(handle.program.executables.values())
    return dict(mode=mode, masks=len(masks), batch=batch, seconds_per_image=per_call / batch,
                compile_seconds=compile_seconds, forwards=forwards, tokens_per_forward=len(masks) * G / forwards,
                tokens_per_second=len(masks) * G * batch / per_call, peak_memory_bytes=_program_bytes(new),
                device_peak_bytes=_device_peak(), mfu=None, tokens=tokens)


COLUMNS = ("mode", "masks", "batch", "seconds_per_image", "compile_seconds", "forwards", "tokens_per_forward",
           "tokens_per_second", "peak_memory_bytes", "mfu", "agreement")


def _format_row(row: dict) -> str:
    def fmt(key):
        v = row.get(key)
        if v is None:
            return "-"
        if key == "peak_memory_bytes":
            return f"{v / 2**20:.0f}MiB"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return "  ".join(f"{fmt(c):>12}" for c in COLUMNS)


def _write(path: Path, rows: list[dict]) -> None:
    from pdlm_jax.files import write_json_atomic

    write_json_atomic(path, {"rows": rows})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pdlm-bench").setLevel(logging.INFO)
    try:
        if args.repeats < 1:
            raise PDLMError("--repeats must be at least 1")
        rows = run(args)
    except PDLMError as e:
        print(f"pdlm-bench: error: {e}", file=sys.stderr)
        return 2
    print("  ".join(f"{c:>12}" for c in COLUMNS))
    for row in rows:
        print(_format_row(row))
    if args.json:
        _write(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
