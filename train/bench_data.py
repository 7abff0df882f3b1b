"""Throughput of the training data pipeline with 0, 2, ... grain worker processes (prints a table, writes JSON).

    python -m train.bench_data [--config configs/demo.yaml] [--workers 0,2] [--batches 40] [--json out.json]
                               [section.key=value ...]

The batches are the config's own (its model geometry, buckets, data.batch_size x optim.grad_accum); the model is
never run. `startup_s` is the time to the first batch (worker processes start and import the pipeline);
`samples_per_s` counts the samples of the following `--batches` batches, so it leaves the start-up out.
"""

from __future__ import annotations

import argparse
import sys
import time


def measure(cfg, workers: int, batches: int) -> dict:
    import dataclasses

    from pdlm_jax.regions.tokenizer import Tokenizer
    from train import batches

    data_cfg = dataclasses.replace(cfg.data, workers=workers)
    start = time.perf_counter()
    pipe = batches.build_pipeline(data_cfg, cfg.model_config(), Tokenizer(cfg.tokenizer_dir()),
                                  grad_accum=cfg.optim.grad_accum)
    it = iter(pipe.dataset)
    try:
        first = next(it)
        startup = time.perf_counter() - start
        t0 = time.perf_counter()
        samples = sum(next(it).labels.shape[0] for _ in range(batches))
        seconds = time.perf_counter() - t0
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"workers": workers, "threads": data_cfg.threads, "batch": first.labels.shape[0], "batches": batches,
            "startup_s": startup, "seconds": seconds, "samples_per_s": samples / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="pdlm-train YAML (its data and model geometry)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    ap.add_argument("--workers", default="0,2", help="comma-separated data.workers values to compare")
    ap.add_argument("--batches", type=int, default=40, help="batches timed after the first")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    from pdlm_jax.errors import PDLMError
    from train.config import load

    try:
        cfg = load(args.config, args.overrides)
        rows = [measure(cfg, int(w), args.batches) for w in args.workers.split(",")]
    except (PDLMError, ValueError) as e:
        print(f"train.bench_data: error: {e}", file=sys.stderr)
        return 2
    base = rows[0]["samples_per_s"]
    print(f"{'workers':>7} {'startup s':>10} {'samples/s':>10} {'vs first':>9}")
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base
        print(f"{r['workers']:>7} {r['startup_s']:>10.2f} {r['samples_per_s']:>10.1f} {r['speedup']:>8.2f}x")
    if args.json:
        from pdlm_jax.files import write_json_atomic

        write_json_atomic(args.json, {"config": args.config, "overrides": args.overrides, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
