"""`python -m infer.bench_dataset`: images/second of the dataset runner, per-image calls against batching.

    python -m infer.bench_dataset [--checkpoint DIR] [--images 16] [--shapes K] [--batch-sizes 1,4,8] \\
        [--repeats 2] [--json bench_dataset.json]

Writes an annotation file of synthetic scenes (`train.synthetic`, the embedded demo model's task: 1–6 shapes per
image, or K with --shapes, in the training schema) and captions every region of it, in one process:

* `per-image`: the baseline without cross-image batching: one `caption_regions` call per
  image (each scene has <= 6 regions, so one pass), the passes one after another;
* `batched`: `run_annotations` with --batch-size B (rows per compiled program, filled across images) and
  --images-per-call N, for every B of --batch-sizes with N = B and with N = all images.

Every row runs once untimed (compiling its programs), then --repeats times, each into a fresh output;
images_per_second = images / median wall seconds of the timed runs (image loading, RLE decoding, captioning
and, for the runner, writing results included); ratio = images_per_second / the per-image row's; agreement =
fraction of regions whose token ids equal the per-image row's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdlm_jax.errors import PDLMError

COLUMNS = ("path", "batch_size", "images_per_call", "images", "regions", "seconds", "images_per_second", "ratio",
           "agreement")


def build_parser() -> argparse.ArgumentParser:
    from pdlm_jax.asset_paths import DEMO_MODEL

    p = argparse.ArgumentParser(prog="python -m infer.bench_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_MODEL), help="default: the embedded demo model")
    p.add_argument("--images", type=int, default=16, help="synthetic scenes in the annotation file")
    p.add_argument("--shapes", type=int, choices=range(1, 7), metavar="K",
                   help="shapes (regions) per scene; default: 1-6 at random, as in training")
    p.add_argument("--seed", type=int, default=1, help="scene stream of train.synthetic")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated --batch-size values")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row after the compiling one")
    p.add_argument("--gen-length", type=int, help="default: the checkpoint's sampler.json")
    p.add_argument("--steps", type=int, help="default: the checkpoint's sampler.json")
    p.add_argument("--json", type=Path, help="write {'rows': [...], 'settings': {...}} here")
    return p


def write_scenes(folder: Path, count: int, seed: int, shapes: int | None) -> Path:
    """`count` synthetic scenes as PNGs plus annotations.json (training schema, variant A)."""
    import numpy as np
    import pycocotools.mask
    from PIL import Image

    from train import synthetic

    records = []
    for i in range(count):
        scene = synthetic.make_scene(seed, i, num_shapes=shapes)
        Image.fromarray(scene.image).save(folder / f"{i:04d}.png")
        rles = [pycocotools.mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in scene.masks]
        records.append({"image_file": f"{i:04d}.png", "captions": scene.captions,
                        "mask_rles": [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}
                                      for r in rles]})
    path = folder / "annotations.json"
    path.write_text(json.dumps(records))
    return path


def per_image(handle, entries, settings) -> dict[str, list[int]]:
    """The baseline without cross-image batching: one caption_regions call per image; token ids by region id."""
    from infer.dataset import load_image
    from pdlm_jax.annotation_files import region_mask

    kwargs = {k: v for k, v in settings.caption_kwargs().items() if k != "batch_size"}
    tokens = {}
    for entry in entries:
        image = load_image(entry.source)
        masks = [region_mask(entry.record, r, (image.height, image.width)) for r in entry.regions]
        out = handle.caption_regions(image, masks, **kwargs)
        tokens.update((r.ann_id, res["token_ids"]) for r, res in zip(entry.regions, out["regions"]))
    return tokens


def batched(handle, settings) -> dict[str, list[int]]:
    """`run_annotations` into settings.output (removed first); token ids by region id."""
    from infer.dataset import run_annotations

    settings.output.unlink(missing_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its summary
        if run_annotations(settings, handle) != 0:
            raise PDLMError(f"the runner failed on some regions; see {settings.summary}")
    records = [json.loads(line) for line in settings.output.read_text().splitlines()]
    return {r["ann_id"]: r["token_ids"] for r in records}


def _timed(call, repeats: int) -> tuple[float, dict]:
    call()  # compiles
    seconds, tokens = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tokens


def run(args) -> tuple[list[dict], dict]:
    import dataclasses

    import jax

    import pdlm_jax
    from pdlm_jax.api import captioner
    from infer.dataset import DatasetSettings, load_annotations

    try:
        sizes = [int(v) for v in args.batch_sizes.split(",")]
    except ValueError:
        sizes = [0]
    if args.images < 1 or args.repeats < 1 or min(sizes) < 1:
        raise PDLMError("--images, --repeats and every --batch-sizes value must be positive integers")
    handle = captioner(pdlm_jax.load(args.checkpoint))
    generation = handle.settings(gen_length=args.gen_length, steps=args.steps)
    rows = []

    def add(name, batch_size, images_per_call, seconds, tokens):
        reference = rows[0]["tokens"] if rows else tokens
        rows.append(dict(path=name, batch_size=batch_size, images_per_call=images_per_call, images=args.images,
                         regions=len(reference), seconds=seconds, images_per_second=args.images / seconds,
                         ratio=args.images / seconds / rows[0]["images_per_second"] if rows else 1.0,
                         agreement=sum(tokens.get(a) == t for a, t in reference.items()) / len(reference),
                         tokens=tokens))
        print(_format(rows[-1]), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        work = Path(tmp)
        path = write_scenes(work, args.images, args.seed, args.shapes)
        entries = load_annotations(path, work)
        base = DatasetSettings(annotations=path, output=work / "results.jsonl", image_root=work,
                               summary=work / "summary.json", generation=generation)
        print("  ".join(f"{c:>{_width(c)}}" for c in COLUMNS), flush=True)
        add("per-image", 1, 1, *_timed(lambda: per_image(handle, entries, base), args.repeats))
        for size in sizes:
            for per_call in dict.fromkeys([size, args.images]):  # N = B, then all images in one call
                settings = dataclasses.replace(base, batch_size=size, images_per_call=per_call)
                add("batched", size, per_call, *_timed(lambda: batched(handle, settings), args.repeats))
    for row in rows:
        del row["tokens"]
    meta = dict(checkpoint=str(args.checkpoint), device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                gen_length=generation.gen_length, steps=generation.steps, repeats=args.repeats, seed=args.seed,
                regions_per_image=[len(e.regions) for e in entries])
    return rows, meta


def _width(column: str) -> int:
    return max(len(column), 9)


def _format(row: dict) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "  ".join(f"{fmt(row[c]):>{_width(c)}}" for c in COLUMNS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows, meta = run(args)
    except PDLMError as e:
        print(f"pdlm-bench-dataset: error: {e}", file=sys.stderr)
        return 2
    print(f"{meta['device']}, {meta['cpus']} CPUs; gen_length={meta['gen_length']} steps={meta['steps']}; "
          f"regions per image: {meta['regions_per_image']}")
    if args.json:
        from pdlm_jax.files import write_json_atomic

        write_json_atomic(args.json, {"rows": rows, "settings": meta})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
