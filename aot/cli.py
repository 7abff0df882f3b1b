"""`pdlm-aot`: compile the real inference or training program for hardware we do not have, and say if it fits.

    pdlm-aot --target h100 --preset perceptiondlm-8b --task infer --masks 6 --batch 8 --mode prefix
    pdlm-aot --target v5p:4x4x4 --preset perceptiondlm-8b --task train --mesh fsdp:64 --batch 64 --length 4096

The model is built abstractly (`nnx.eval_shape`: no weights, no host memory for them), its parameters and
the inputs carry the shardings the real run gives them (`pdlm_jax.sharding`), and the program compiled is
the real one: `pipeline.caption_program` for a bucket made by the same host code as `pdlm-infer` (a synthetic
image of T tiles or --image, k rectangular masks), or `train.step.Trainer`'s jitted update for a
`train.config.TrainConfig`. Devices are JAX's compile-only devices of the target (`pdlm_jax.hardware`).

Prints a table and (--json) writes {"target", "devices", "task", "settings", "fits", "device_memory_bytes",
"memory_per_device_bytes": {"arguments", "outputs", "temporaries", "total"}, "compile_seconds",
"model_flops_per_image" | "model_flops_per_step", "roofline_seconds_per_image" | "roofline_seconds_per_step",
"peak_flops", "memory_bandwidth", ...; with --explain "largest_buffers"}. Exit 0: compiles and fits; 1: compiles,
does not fit; 2: bad input.
The roofline is a lower bound, max(FLOPs / peak, bytes / bandwidth) over all devices with the chip's
published peaks; FLOPs are analytic (`pdlm_jax.flops`) and cross-checked against XLA's cost analysis of the
same program lowered for the CPU (XLA counts a loop body once, so the check compares one loop iteration).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from pdlm_jax.asset_paths import DEMO_SHAPES_MODEL
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import write_json_atomic
from pdlm_jax.lora import BASES

log = logging.getLogger("pdlm-aot")

SCHEMA_KEYS = ("target", "devices", "task", "settings", "fits", "device_memory_bytes", "memory_per_device_bytes",
               "compile_seconds", "peak_flops", "memory_bandwidth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="h100, h200, h100x8, h200x8, l4, rtx4090 or a TPU topology like "
                                                    "v5e:1x1 or v5p:4x4x4")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (perceptiondlm-8b, tiny, ...)")
    src.add_argument("--config", help="infer: a pdlm-jax config.json (a converted checkpoint's); "
                                      "train: a pdlm-train YAML")
    p.add_argument("--task", required=True, choices=("infer", "train"))
    p.add_argument("--mesh", help="device mesh, e.g. fsdp:64 or data:2,tensor:4 (infer default data:-1; "
                                  "train default: the config's run.mesh, else fsdp:-1)")
    p.add_argument("--batch", type=int, help="infer: images per call (default 1); train: global batch (default 8)")
    p.add_argument("--tiles", type=int, help="tiles per image (default 7: a 3x2 grid + thumbnail, the demo "
                                             "photo's geometry); infer may give --image instead")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn", "splash"),
                   help="the LM's attention kernel. infer (default auto): cuDNN's on GPU in bf16, else XLA's. train "
                        "(default: the config's model.attention, xla): auto = splash (Pallas) on TPU, cuDNN on GPU "
                        "in bf16, else XLA's")
    p.add_argument("--explain", action="store_true",
                   help="also list the compiled program's largest buffers (where the memory goes)")
    inf = p.add_argument_group("infer")
    inf.add_argument("--masks", type=int, default=3, help="regions k per image (1..prompt_numbers)")
    inf.add_argument("--mode", default="exact", help="exact | prefix[:R] | threshold:TAU | prefix[:R]+threshold:TAU")
    inf.add_argument("--gen-length", type=int, default=32)
    inf.add_argument("--steps", type=int, default=32)
    inf.add_argument("--temperature", type=float, default=0.0)
    inf.add_argument("--image", help="image file whose tiling sets the geometry (instead of --tiles)")
    inf.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    inf.add_argument("--quantize", choices=("int8", "int4"), help="weight-only int8 or int4 (pdlm-infer --quantize)")
    inf.add_argument("--tokenizer", default=str(DEMO_SHAPES_MODEL),
                     help="tokenizer directory (prompt length; any tokenizer with the special tokens)")
    tr = p.add_argument_group("train")
    tr.add_argument("--length", type=int, help="padded sequence length (default: the config's largest bucket)")
    tr.add_argument("--answer", type=int, help="padded answer length: the rows the loss computes logits at "
                    "(data.answer_buckets; default: the config's largest, else --length)")
    tr.add_argument("--grad-accum", type=int, help="micro-batches per update (optim.grad_accum)")
    tr.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                    help="per-layer rematerialisation (model.remat; default on)")
    tr.add_argument("--freeze", help="comma-separated frozen modules: vision, mask_embed, projector, lm")
    tr.add_argument("--compute-dtype", choices=("bfloat16", "float32"), help="model.dtype (default bfloat16)")
    tr.add_argument("--lora-rank", type=int, help="LoRA rank (alias of --set lora.rank=N)")
    tr.add_argument("--lora-base", choices=BASES,
                    help="how LoRA's frozen base is stored (lora.base; default auto: the compute dtype; int8, int4: "
                         "QLoRA)")
    tr.add_argument("--set", action="append", default=[], metavar="section.key=value",
                    help="any TrainConfig override, as pdlm-train takes them (repeatable)")
    return p


# ---- settings -> programs ------------------------------------------------------------------------------------


def parse_mode(text: str):
    from pdlm_jax.generation import Mode

    try:
        return Mode.from_name(text)
    except PDLMError as e:
        raise PDLMError(f"--mode {text!r}: {e}") from None


def synthetic_image(tiles: int, region):
    """A gray image whose tiling gives exactly `tiles` tiles (grid cols×rows plus the thumbnail)."""
    from PIL import Image

    from pdlm_jax.regions.tiling import candidate_grids

    grids = [(1, 1)] if tiles == 1 else [g for g in candidate_grids(region.min_tiles, region.max_tiles)
                                         if g[0] * g[1] + region.use_thumbnail == tiles and g[0] * g[1] > 1]
    if not grids:
        counts = sorted({c * r + (region.use_thumbnail and c * r > 1)
                         for c, r in candidate_grids(region.min_tiles, region.max_tiles)})
        raise PDLMError(f"--tiles {tiles}: this model tiles images into one of {counts} tiles")
    cols, rows = max(grids, key=lambda g: (g[0] * g[1], g[0]))
    s = region.image_size
    return Image.new("RGB", (cols * s, rows * s), (128, 128, 128))


def rectangle_masks(k: int, size: tuple[int, int]):
    """k (≤ 6) rectangular masks of distinct areas (the boxes of infer/bench_gpu.sh)."""
    import numpy as np

    boxes = [(0.05, 0.05, 0.60, 0.70), (0.50, 0.30, 0.95, 0.95), (0.10, 0.60, 0.45, 0.95),
             (0.65, 0.05, 0.95, 0.35), (0.30, 0.20, 0.55, 0.45), (0.02, 0.75, 0.15, 0.98)]
    w, h = size
    masks = []
    for x0, y0, x1, y1 in boxes[:k]:
        m = np.zeros((h, w), bool)
        m[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = True
        masks.append(m)
    return masks


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _model_config(args):
    from pdlm_jax.config import PDLMConfig, preset

    if args.config:
        return PDLMConfig.from_json_file(args.config)
    return preset(args.preset or "perceptiondlm-8b")


def infer_program(args, target) -> dict:
    """The captioning program of one bucket for `target`'s devices; returns the pieces `run` needs."""
    import jax
    import numpy as np
    from flax import nnx

    from pdlm_jax import api, flops, pipeline, programs, sharding
    from pdlm_jax.config import DTYPES
    from pdlm_jax.generation import GenerationSettings
    from pdlm_jax.modeling.layout import param_shardings
    from pdlm_jax.modeling.pdm import PerceptionDLM
    from pdlm_jax.regions.prepare import prepare_regions
    from pdlm_jax.regions.tiling import tile_image
    from pdlm_jax.regions.tokenizer import Tokenizer

    cfg = _model_config(args)
    batch = args.batch or 1
    k, G, S = args.masks, args.gen_length, args.steps
    if args.image and args.tiles:
        raise PDLMError("give --image or --tiles, not both")
    if batch < 1:
        raise PDLMError(f"--batch must be at least 1, got {batch}")
    if not 1 <= k <= cfg.region.prompt_numbers:
        raise PDLMError(f"--masks must be in 1..{cfg.region.prompt_numbers} (regions per pass), got {k}")
    mode = parse_mode(args.mode)
    settings = GenerationSettings(gen_length=G, steps=S, mode=mode, temperature=args.temperature)
    settings.check_regions(k, cfg.region.prompt_numbers)
    tokenizer = Tokenizer(args.tokenizer)
    if max(tokenizer.vocab_size, *tokenizer.special.all_ids()) > cfg.lm.vocab_size:
        raise PDLMError(f"tokenizer {args.tokenizer} has ids beyond the model's vocabulary of {cfg.lm.vocab_size}")
    tiled = tile_image(args.image or synthetic_image(args.tiles or 7, cfg.region), cfg.region)
    prep = prepare_regions(tiled, rectangle_masks(k, tiled.size), tokenizer, cfg, G)
    bucket = dataclasses.replace(pipeline.choose_bucket(tiled.num_tiles, k, prep.layout.length,
                                                        cfg.region.prompt_numbers, settings), batch=batch)
    row = pipeline.pass_inputs(prep, bucket, cfg, tokenizer.special.eot)
    inputs = pipeline.batch_inputs([row] * batch, [(k * G, S)] * batch, bucket, settings)

    devices = target.devices()
    mesh = sharding.make_mesh(args.mesh or "data:-1", devices)
    dtype = DTYPES[args.dtype]
    gpu = target.platform == "cuda"
    if args.attention == "splash":
        raise PDLMError("--attention splash: the captioning program has no splash path yet (training has)")
    attention = ("cudnn" if gpu and args.dtype == "bfloat16" else "xla") if args.attention in (None, "auto") \
        else api.attention_implementation(args.attention, dtype)
    make = lambda attention: PerceptionDLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),  # noqa: E731
                                           attention_implementation=attention)
    cpu_graphdef, cpu_abstract = nnx.split(nnx.eval_shape(lambda: make("xla")))  # the CPU has no cuDNN kernel
    trace = None
    if args.quantize:  # the int8 model pdlm-infer --quantize runs (qwix), still without allocating it
        from pdlm_jax import quantize

        graphdef, abstract, trace = quantize.abstract(lambda: make(attention), args.quantize)
    else:
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(attention)))
    state = _abstract(abstract, param_shardings(abstract, mesh))
    program = pipeline.caption_program((graphdef, state), tokenizer.special.mask, mesh, trace,
                                       programs.weight_layouts(args.quantize, target.platform))
    placed = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype,
                                                         sharding=program.input_sharding(v)), inputs)

    full, cached = mode.forward_split(S)
    per_image = flops.model_flops(cfg, tiled.num_tiles, [bucket.length], [k], G, full, cached)
    param_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    # Lower bound on HBM traffic per image: the weights are read once per forward, shared by the batch.
    bytes_per_image = param_bytes * (full + cached) / batch
    settings = dict(preset=args.preset, config=args.config, masks=k, batch=batch, mode=mode.name, gen_length=G,
                    steps=S, temperature=args.temperature, tiles=tiled.num_tiles, length=bucket.length,
                    dtype=args.dtype, quantize=args.quantize, attention=attention, mesh=dict(mesh.shape))
    return dict(settings=settings, lower=lambda: program.lower(bucket, placed),
                flops=per_image, bytes=bytes_per_image, unit="image",
                xla_check=lambda: _xla_flops_once(
                    lambda: pipeline.caption_program((cpu_graphdef, cpu_abstract), tokenizer.special.mask)
                    .lower(bucket, inputs), batch * _loop_body_flops(cfg, tiled.num_tiles, bucket)))


def _loop_body_flops(cfg, tiles: int, bucket) -> float:
    """Analytic FLOPs as XLA's cost analysis counts them: every loop body once (one layer of each tower's layer
    scan, one denoising step) and, of the prefix mode's refresh `cond`, the costlier branch (the full forward)."""
    from pdlm_jax import flops

    one_layer = cfg.replace(lm=dataclasses.replace(cfg.lm, num_layers=1),
                            vision=dataclasses.replace(cfg.vision, num_layers=cfg.vision.num_layers
                                                       - cfg.num_vision_layers_used + 1))
    return flops.vision_flops(one_layer, tiles) + flops.lm_flops(one_layer, bucket.length, bucket.length, bucket.slots)


# pdlm-aot's training flags as the pdlm-train overrides they stand for
TRAIN_FLAG_OVERRIDES = (("batch", "data.batch_size={}"), ("length", "data.length_buckets=[{}]"),
                        ("tiles", "data.tile_buckets=[{}]"), ("answer", "data.answer_buckets=[{}]"),
                        ("grad_accum", "optim.grad_accum={}"),
                        ("remat", "model.remat={}"), ("freeze", "model.freeze=[{}]"),
                        ("compute_dtype", "model.dtype={}"), ("mesh", "run.mesh={}"), ("lora_rank", "lora.rank={}"),
                        ("lora_base", "lora.base={}"))


def train_program(args, target) -> dict:
    """The real training update (train.step.Trainer) of a TrainConfig for `target`'s devices."""
    import jax
    import numpy as np

    from pdlm_jax import flops, keymap, sharding
    from pdlm_jax.regions.tokenizer import Tokenizer
    from pdlm_jax.trees import nest
    from train import config as train_config
    from train import batches, samples, step as step_lib

    overrides = []
    if args.attention == "auto":
        compute = args.compute_dtype or "bfloat16"
        overrides.append("model.attention=" + ("splash" if target.platform == "tpu" else
                                               "cudnn" if compute == "bfloat16" else "xla"))
    elif args.attention:
        overrides.append(f"model.attention={args.attention}")
    if args.preset or not args.config:
        overrides.append(f"model.preset={args.preset or 'perceptiondlm-8b'}")
    for flag, template in TRAIN_FLAG_OVERRIDES:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(template.format(str(value).lower() if isinstance(value, bool) else value))
    base = {}
    if args.config is None and args.batch is None:
        base["data"] = {"batch_size": 8}
    if args.config is None and args.mesh is None:
        base["run"] = {"mesh": "fsdp:-1"}
    if args.config:
        cfg = train_config.load(args.config, overrides + list(args.set))
    else:
        cfg = train_config.from_dict(train_config.apply_overrides(base, overrides + list(args.set)))
    model_cfg = cfg.model_config()
    tokenizer = Tokenizer(cfg.model.tokenizer or cfg.model.init_from or args.tokenizer, base=model_cfg.is_base)
    length = max(cfg.data.length_buckets)
    tiles = max(cfg.data.tile_buckets)

    # One sample made and padded by the training data code (an image of exactly `tiles` tiles, the most masks a
    # sample takes): the batch has a real run's shapes and dtypes; the global batch repeats its shape.
    region = model_cfg.region
    image = synthetic_image(tiles, region)
    if model_cfg.is_base:  # PerceptionDLM-Base: an image + conversation sample without regions
        from train import conversations

        conv = conversations.Conversation("pdlm-aot", "image", (conversations.Turn("user", "<image>\nDescribe it."),
                                                                 conversations.Turn("assistant", "An image.")))
        fmt = conversations.TextFormat(length)
        sample, regions = conversations.build_sample(conv, image, model_cfg, tokenizer, fmt), 0
    else:
        k = min(region.prompt_numbers, math.ceil(cfg.data.group_divisor))
        record = samples.Record(image, rectangle_masks(k, image.size), ["a region"] * k)
        sample = samples.build_sample(record, range(k), np.random.default_rng(0), model_cfg, tokenizer,
                                      cfg.data.question, cfg.data.random_prompt_ids)
        regions = region.prompt_numbers
    answer = min(max(cfg.data.answer_buckets, default=length), length)  # logits at the largest answer bucket
    sample = batches.Collate((tiles,), (length,), regions, tokenizer.special.eot, (answer,))([sample])
    B = cfg.data.batch_size * cfg.optim.grad_accum
    mesh = sharding.make_mesh(cfg.run.mesh, target.devices())
    trainer = step_lib.trainer_for(cfg, model_cfg, mesh, 1000, tokenizer.special.mask)
    shapes = {p: jax.ShapeDtypeStruct(s, np.float32) for p, s in keymap.expected_shapes(model_cfg).items()}
    state = trainer.abstract_state(nest(shapes), cfg.model.freeze)
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct((B, *v.shape[1:]), v.dtype,
                                                        sharding=sharding.batch_sharding(mesh, (B, *v.shape[1:]))),
                         sample)

    n_params = sum(math.prod(s) for s in keymap.expected_shapes(model_cfg).values())
    compute_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    # Lower bound on HBM traffic per update: AdamW reads p, g, mu, nu and writes p, mu, nu (float32), and the
    # forward and backward each read the weights once in the compute dtype.
    step_bytes = n_params * (7 * 4 + 2 * compute_bytes)
    settings = dict(preset=cfg.model.preset, config=args.config, batch=B, micro_batch=cfg.data.batch_size,
                    grad_accum=cfg.optim.grad_accum, length=length, answer=answer, tiles=tiles, dtype=cfg.model.dtype,
                    remat=cfg.model.remat, attention=cfg.model.attention, freeze=list(cfg.model.freeze),
                    lora_rank=cfg.lora.rank,
                    lora_base=cfg.lora.base if cfg.lora.enabled else None, mesh=dict(mesh.shape),
                    optimizer="adamw (float32 master weights and moments)", overrides=overrides + list(args.set))
    return dict(settings=settings, lower=lambda: trainer.jit_step().lower(state, batch),
                flops=flops.train_step_flops(model_cfg, B, tiles, length, answer), bytes=step_bytes, unit="step",
                xla_check=None)


def _timed_compile(lower, dump_dir: str | None = None):
    """(executable, seconds) of the program `lower()` lowers; `dump_dir`: XLA writes its buffer assignment
    and memory-usage report there (--explain)."""
    start = time.perf_counter()
    options = {"xla_dump_to": dump_dir} if dump_dir else None
    return lower().compile(compiler_options=options), time.perf_counter() - start


def largest_buffers(dump_dir: str, count: int = 12) -> list[dict]:
    """The `count` largest allocations of the compiled program, from XLA's memory-usage report in `dump_dir`
    (the largest report there: the target's program, not the small host programs): bytes and the shapes of
    the values sharing each allocation."""
    reports = sorted(Path(dump_dir).glob("*memory-usage-report.txt"), key=lambda p: p.stat().st_size)
    if not reports:
        raise PDLMError(f"--explain: XLA wrote no memory-usage report to {dump_dir}")
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    rows = []
    for line in max(reports, key=_report_total).read_text().splitlines():
        parts = [p.strip() for p in line.split(";")]
        size = re.fullmatch(r"([\d.]+)(B|KiB|MiB|GiB|TiB)", parts[1]) if len(parts) == 5 else None
        if size:
            rows.append({"bytes": int(float(size[1]) * units[size[2]]), "values": int(parts[3]),
                         "shapes": parts[4]})
    return sorted(rows, key=lambda r: -r["bytes"])[:count]


def _report_total(path: Path) -> int:
    match = re.search(r"Total bytes: (\d+)", path.read_text())
    return int(match[1]) if match else 0


def _xla_flops_once(lower, analytic_once: float) -> dict | None:
    """XLA's FLOP count of the program `lower()` lowers for the CPU vs our analytic count of one loop iteration."""
    try:
        cost = lower().cost_analysis()
        xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    except Exception as e:  # the check is informative; a backend without cost analysis skips it
        log.warning("no XLA cost analysis on the CPU (%s)", e)
        return None
    return {"xla_cpu_flops_one_iteration": xla, "analytic_flops_one_iteration": analytic_once,
            "ratio": analytic_once / xla if xla else None}


# ---- report ----------------------------------------------------------------------------------------------------


def run(args) -> dict:
    from pdlm_jax import hardware

    target = hardware.target(args.target)  # PDLMError listing the known ones
    hardware.quiet_tpu_environment(target)
    build = infer_program if args.task == "infer" else train_program
    program = build(args, target)  # checks the settings before asking JAX for devices
    devices = target.devices()
    log.info("compiling %s for %s (%d devices)...", args.task, target.name, len(devices))
    try:
        with tempfile.TemporaryDirectory(prefix="pdlm-aot-") as dump_dir:
            exe, seconds = _timed_compile(program["lower"], dump_dir if args.explain else None)
            buffers = largest_buffers(dump_dir) if args.explain else None
    except RuntimeError as e:
        if "cuDNN not found" not in str(e):
            raise
        raise PDLMError("compiling cuDNN attention for a GPU target needs cuDNN's library: pip install "
                        "'pdlm-jax[aot]' (nvidia-cudnn-cu13), or plan with --attention xla") from None
    mem = exe.memory_analysis()
    arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temporaries, aliased = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    total = arguments + outputs + temporaries - aliased
    chip = target.chip
    unit = program["unit"]
    compute_s = program["flops"] / (chip.peak_flops * target.num_devices)
    memory_s = program["bytes"] / (chip.memory_bandwidth * target.num_devices)
    result = {
        "target": target.name, "devices": target.num_devices, "device_kind": devices[0].device_kind,
        "chip": chip.to_dict(), "task": args.task, "settings": program["settings"],
        "fits": total <= chip.device_memory_bytes, "device_memory_bytes": chip.device_memory_bytes,
        "memory_per_device_bytes": {"arguments": arguments, "outputs": outputs, "temporaries": temporaries,
                                    "aliased": aliased, "total": total},
        "compile_seconds": seconds,
        f"model_flops_per_{unit}": program["flops"],
        f"roofline_seconds_per_{unit}": max(compute_s, memory_s),
        "roofline_bound": "compute" if compute_s >= memory_s else "memory",
        "peak_flops": chip.peak_flops, "memory_bandwidth": chip.memory_bandwidth,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if buffers is not None:
        result["largest_buffers"] = buffers
    if program["xla_check"] is not None:
        result["flops_check"] = program["xla_check"]()
    return result


def format_table(r: dict) -> str:
    unit = "image" if r["task"] == "infer" else "step"
    m, gib = r["memory_per_device_bytes"], 2**30
    s = r["settings"]
    what = (f"k={s['masks']} batch={s['batch']} {s['mode']} G={s['gen_length']} S={s['steps']} T={s['tiles']} "
            f"L={s['length']}" if r["task"] == "infer" else
            f"batch={s['batch']} L={s['length']} A={s['answer']} T={s['tiles']} remat={s['remat']} "
            f"accum={s['grad_accum']}")
    rows = [
        ("target", f"{r['target']} ({r['devices']} × {r['device_kind']})"),
        ("program", f"{r['task']}: {what}, mesh {','.join(f'{a}:{n}' for a, n in s['mesh'].items() if n > 1) or '1'}"),
        ("memory / device", f"{m['total'] / gib:.2f} GiB (arguments {m['arguments'] / gib:.2f}, outputs "
                            f"{m['outputs'] / gib:.2f}, temporaries {m['temporaries'] / gib:.2f}) of "
                            f"{r['device_memory_bytes'] / gib:.1f} GiB"),
        ("fits", "yes" if r["fits"] else f"NO: over by {(m['total'] - r['device_memory_bytes']) / gib:.2f} GiB"),
        ("compile", f"{r['compile_seconds']:.1f} s"),
        (f"model FLOPs / {unit}", f"{r[f'model_flops_per_{unit}']:.3e}"),
        (f"roofline s / {unit}", f"{r[f'roofline_seconds_per_{unit}']:.4g} ({r['roofline_bound']}-bound; peaks "
                                 f"{r['peak_flops'] / 1e12:.0f} TFLOP/s, {r['memory_bandwidth'] / 1e12:.2f} TB/s "
                                 f"per chip, {r['chip']['source']})"),
    ]
    check = r.get("flops_check")
    if check:
        rows.append(("FLOPs check", f"analytic / XLA (CPU, one loop iteration) = {check['ratio']:.3f}"))
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    if r.get("largest_buffers"):  # --explain
        table += "\n\nlargest buffers (XLA's buffer assignment; values sharing one allocation):\n" + "\n".join(
            f"  {b['bytes'] / 2**20:10.1f} MiB  {b['shapes'][:140]}" for b in r["largest_buffers"])
    return table


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # the host only compiles (the targets are compile-only devices): without this, JAX starts the CUDA plugin
    # as a backend, which fails on a machine without a GPU's libraries before any topology is built
    if not os.environ.get("JAX_PLATFORMS"):
        import jax

        jax.config.update("jax_platforms", "cpu")
    try:
        result = run(args)
    except PDLMError as e:
        print(f"pdlm-aot: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # XLA refused the program: one line, its own status
        if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
            raise
        message = str(e).splitlines()[0]
        if message.startswith("RESOURCE_EXHAUSTED"):  # the TPU compiler refuses what cannot fit in HBM
            print(f"pdlm-aot: does not fit on {args.target}: {message}", file=sys.stderr)
            return 1
        print(f"pdlm-aot: compilation failed for {args.target}: {message}", file=sys.stderr)
        return 3
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    if not result["fits"]:
        over = result["memory_per_device_bytes"]["total"] - result["device_memory_bytes"]
        print(f"pdlm-aot: does not fit: {over / 2**30:.2f} GiB per device over the "
              f"{result['device_memory_bytes'] / 2**30:.1f} GiB of a {result['chip']['kind']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
