"""`pdlm-data`: make, check and describe the annotation files pdlm-train reads (also `python -m train.data_tools`).

    pdlm-data from-masks --out ann.json --image img.png --masks m0.png m1.png --captions "a cat" "a dog" [--append]
    pdlm-data validate ann.json [--config train.yaml [section.key=value ...]]
    pdlm-data stats ann.json [--config train.yaml [section.key=value ...]] [--json stats.json]

`from-masks` turns an image and one mask PNG per region (nonzero = inside, the image's size) with their captions
into a record of the training schema (image_file, mask_rles as COCO RLE, captions); `--append` adds it to an
existing file. `validate` reads a file with pdlm-train's own checks (pdlm_jax.annotation_files and
train.sources.AnnotationSource: image readable and large enough, RLEs well-formed and non-empty, one caption per
mask and, given a config, every sample within its buckets) and lists every bad record, not just the first.
`stats` counts records and regions per image and the caption lengths in tokens, and sorts the records into
the config's padded buckets (tiles, sequence length, answer length).
Exit codes: 0 fine, 1 `validate` found bad records, 2 bad input (one-line error).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from pdlm_jax.errors import PDLMError


def rle_of(mask_png: str | Path, size: tuple[int, int]) -> dict:
    """The COCO RLE (pycocotools, as in the annotation files) of a mask PNG, which must be `size` (w, h)."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    try:
        with Image.open(mask_png) as im:
            mask = np.asarray(im.convert("L")) > 0
    except OSError as e:
        raise PDLMError(f"mask {mask_png}: cannot read it ({e})") from e
    if mask.shape[::-1] != tuple(size):
        raise PDLMError(f"mask {mask_png} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}; "
                        "masks must have the image's size")
    if not mask.any():
        raise PDLMError(f"mask {mask_png} is empty (no nonzero pixel); every region needs at least one")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def from_masks(out: str | Path, image: str | Path, masks: list[str], captions: list[str], append: bool = False) -> dict:
    """Write (or with `append` add) the record of `image` with its masks and captions to the file `out`.
    The image path is stored relative to the file's folder when it lies under it (the folder stays movable)."""
    from PIL import Image

    from pdlm_jax import annotation_files
    from pdlm_jax.files import write_json_atomic

    if len(masks) != len(captions):
        raise PDLMError(f"--masks gives {len(masks)} masks but --captions {len(captions)} captions; give one caption "
                        "per mask, in the same order")
    if not masks:
        raise PDLMError("--masks: give at least one mask PNG")
    if any(not c.strip() for c in captions):
        raise PDLMError("--captions: every caption must be non-empty")
    try:
        with Image.open(image) as im:
            size = im.size
    except OSError as e:
        raise PDLMError(f"image {image}: cannot read it ({e})") from e
    out = Path(out)
    records = annotation_files.read_records(out) if append and out.exists() else []
    if out.exists() and not append:
        raise PDLMError(f"{out} exists; pass --append to add this image to it, or choose another --out")
    stored = os.path.relpath(Path(image).resolve(), out.parent.resolve())
    record = {"image_file": str(Path(image).resolve()) if stored.startswith("..") else stored,
              "mask_rles": [rle_of(m, size) for m in masks], "captions": list(captions)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, records + [record])
    return record


def _load(path: str, args) -> tuple:
    """(source with every bad record listed in .skipped, training config or None)."""
    from train import config as train_config
    from train.samples import Limits
    from train.sources import AnnotationSource

    cfg = train_config.load(args.config, args.overrides) if args.config else None
    limits = None
    if cfg is not None:
        from pdlm_jax.regions.tokenizer import Tokenizer

        limits = Limits.of(cfg.model_config().region, Tokenizer(cfg.tokenizer_dir()), cfg.data)
    image_root = args.image_root or (cfg.data.image_root if cfg else None)
    return AnnotationSource([path], image_root, limits, on_bad_record="skip"), cfg


def validate(args) -> int:
    source, cfg = _load(args.file, args)
    for problem in source.skipped:
        print(problem)
    checked = "the buckets of " + args.config if cfg else "no config: buckets not checked"
    print(f"{args.file}: {len(source)} good records, {len(source.skipped)} bad ({checked})")
    return 1 if source.skipped else 0


def _bucket(value: int, buckets) -> str:
    fits = [b for b in sorted(buckets) if value <= b]
    return str(fits[0]) if fits else f">{max(buckets)}"


def stats(args) -> int:
    from pdlm_jax.regions.tokenizer import Tokenizer
    from train.samples import Limits, groups_per_record
    from train.sources import open_image_file

    source, cfg = _load(args.file, args)
    if cfg is None:  # the model geometry and buckets pdlm-train uses by default, with the demo's tokenizer
        from pdlm_jax.api import DEMO_MODEL
        from train import config as train_config

        cfg = train_config.load(None, [f"model.init_from={DEMO_MODEL}"])
    d = cfg.data
    tokenizer = Tokenizer(cfg.tokenizer_dir())
    limits = Limits.of(cfg.model_config().region, tokenizer, d)
    regions, caption_tokens, buckets = [], [], {}
    for record, image in source.records:
        captions = [r.caption for r in record.regions]
        regions.append(len(captions))
        caption_tokens += [len(tokenizer.encode(c)) for c in captions]
        with open_image_file(image) as im:
            tiles, length, answer = limits.longest_sample(im.size, captions)
        key = (f"tiles {_bucket(tiles, d.tile_buckets)}, length {_bucket(length, d.length_buckets)}"
               + (f", answer {_bucket(answer, d.answer_buckets)}" if d.answer_buckets else ""))
        buckets[key] = buckets.get(key, 0) + 1

    def summary(values):
        return {"min": min(values), "mean": round(statistics.mean(values), 2), "max": max(values)} if values else {}

    report = {"file": args.file, "config": args.config, "tokenizer": str(tokenizer.file), "records": len(source),
              "bad_records": len(source.skipped), "regions": sum(regions), "regions_per_image": summary(regions),
              "caption_tokens": summary(caption_tokens),
              "items_per_pass": sum(groups_per_record(n, d.group_divisor) for n in regions),
              "buckets": dict(sorted(buckets.items()))}
    print(f"{report['records']} records ({report['bad_records']} bad: see pdlm-data validate), "
          f"{report['regions']} regions, {report['items_per_pass']} training items a pass")
    for name in ("regions_per_image", "caption_tokens"):
        print(f"{name.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in report[name].items()))
    print("longest sample of each record, by padded bucket (data.tile_buckets / length_buckets / answer_buckets):")
    for key, n in report["buckets"].items():
        print(f"  {key}: {n} records")
    if args.json:
        from pdlm_jax.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("from-masks", help="image + mask PNGs + captions -> a training annotation record")
    m.add_argument("--out", required=True, help="annotation file to write (or add to, with --append)")
    m.add_argument("--image", required=True)
    m.add_argument("--masks", nargs="+", required=True, help="one PNG per region, the image's size, nonzero = inside")
    m.add_argument("--captions", nargs="+", required=True, help="one caption per mask, in the same order")
    m.add_argument("--append", action="store_true", help="add the record to an existing file")
    for name, text in (("validate", "list every bad record of an annotation file"),
                       ("stats", "records, regions, caption tokens and buckets of an annotation file")):
        s = sub.add_parser(name, help=text)
        s.add_argument("file")
        s.add_argument("--config", help="pdlm-train YAML: its tokenizer, model geometry and buckets; "
                                        "section.key=value arguments anywhere override its entries")
        s.add_argument("--image-root", help="as data.image_root (default: the config's)")
        if name == "stats":
            s.add_argument("--json", help="also write the numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)  # config overrides may follow --config, as with pdlm-train
    if overrides and (args.command == "from-masks" or not args.config or not all("=" in o for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (section.key=value overrides need --config)")
    args.overrides = overrides
    try:
        if args.command == "from-masks":
            record = from_masks(args.out, args.image, args.masks, args.captions, args.append)
            print(f"{args.out}: added {record['image_file']} with {len(record['captions'])} regions")
            return 0
        return validate(args) if args.command == "validate" else stats(args)
    except PDLMError as e:
        print(f"pdlm-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
