"""Train-step time of a model config on the current devices (prints a table row, writes JSON).

    python -m train.bench --preset tiny-512 --mesh data:-1 --batch 8 [--steps 5] [--json out.json]
    python -m train.bench --config configs/demo.yaml --mesh data:1 --length 232 [section.key=value ...]

For fake multi-device CPU runs set XLA_FLAGS=--xla_force_host_platform_device_count=8 first. The batch
is synthetic-task data at the config's geometry; timings exclude compilation (first step). The row also
has the host data pipeline's time per batch (`median_data_s`: scene drawing, tiling, masks, tokens), which
a training run pays on the same cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-512")
    ap.add_argument("--config", help="a pdlm-train YAML instead of --preset (its model and tokenizer)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    ap.add_argument("--tokenizer", default="tests/fixtures/tiny_v1", help="directory with tokenizer.json")
    ap.add_argument("--mesh", default="data:-1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--length", type=int, default=2048, help="padded sequence length bucket")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.overrides and not args.config:
        ap.error(f"overrides {args.overrides} need --config (a preset takes none)")

    import jax

    from pdlm_jax import sharding as shd
    from pdlm_jax.config import preset
    from pdlm_jax.regions.tokenizer import Tokenizer
    from train import batches as train_batches, step as step_lib
    from train.config import DataConfig, OptimConfig, load

    if args.config:
        train_cfg = load(args.config, args.overrides)
        cfg, tokenizer, name = train_cfg.model_config(), Tokenizer(train_cfg.tokenizer_dir()), args.config
        tiles = max(train_cfg.data.tile_buckets)
    else:
        cfg, tokenizer, name = preset(args.preset), Tokenizer(args.tokenizer), args.preset
        tiles = cfg.region.max_tiles + 1
    dcfg = DataConfig(synthetic_scenes=args.batch * (args.steps + 1), batch_size=args.batch, group_divisor=6,
                      tile_buckets=(tiles,), length_buckets=(args.length,), threads=1, prefetch=0)
    batches = iter(train_batches.build_pipeline(dcfg, cfg, tokenizer).dataset)
    batch = next(batches)
    data_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        next(batches)
        data_times.append(time.perf_counter() - t0)
    mesh = shd.make_mesh(args.mesh)
    trainer = step_lib.make_trainer(cfg, args.dtype, mesh, OptimConfig(), 100, tokenizer.special.mask,
                                    remat=args.remat)
    state = trainer.init_state(step_lib.init_params(cfg, 0, mesh), ())
    gbatch = trainer.put_batch(batch)
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, gbatch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, gbatch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    times.sort()
    row = {"config": name, "overrides": args.overrides, "mesh": dict(mesh.shape), "devices": jax.device_count(),
           "device_kind": jax.devices()[0].device_kind, "batch": args.batch, "length": args.length,
           "dtype": args.dtype, "first_step_s": compile_s, "median_step_s": times[len(times) // 2],
           "tokens_per_s": float(batch.inputs.valid.sum()) / times[len(times) // 2],
           "median_data_s": statistics.median(data_times)}
    print(json.dumps(row))
    if args.json:
        from pdlm_jax.files import write_json_atomic

        write_json_atomic(args.json, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
