"""Exact-caption accuracy of a model on freshly generated synthetic scenes (the demo task) or the records of an
annotation file.

    python -m train.eval --checkpoint DIR --scenes N [--seed S]
    python -m train.eval --checkpoint DIR [--adapter DIR] --annotations FILE [--scenes N]

Scenes come from a seed stream the training never used; every region is captioned through the real
inference path (`pdlm_jax.load(...).caption_regions`, as `pdlm-infer`) with the generation settings
stored with the model (sampler.json) unless given. A region counts as correct when its caption equals
the annotation ("a {color} {shape}") ignoring case and punctuation. pdlm-train's periodic evaluation
judges captions with the same function (`judge`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from pdlm_jax.asset_paths import DEMO_MODEL
from pdlm_jax.errors import PDLMError
from train import synthetic

HELD_OUT_SEED = 1_000_003  # training uses small seeds


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def judge(model, image, masks, captions, **settings) -> tuple[dict, list[bool]]:
    """Caption `masks` of `image` with `model.caption_regions(**settings)` (a RegionCaptioner: the inference
    path); returns its result and, per region, whether the caption equals the annotation in `captions`."""
    result = model.caption_regions(image, masks, **settings)
    return result, [normalise(r["caption"]) == normalise(truth) for truth, r in zip(captions, result["regions"])]


def _scenes(scenes: int, seed: int, rotated: float, colors: tuple[str, ...], annotations: str | None):
    """(image, masks, captions) of the first `scenes` records of `annotations`, else of synthetic scenes."""
    if annotations is None:
        for i in range(scenes):
            scene = synthetic.make_scene(seed, i, rotated=rotated, colors=colors)
            yield scene.image, scene.masks, scene.captions
        return
    from train.data import AnnotationSource

    source = AnnotationSource([annotations])
    for i in range(min(scenes, len(source))):
        record = source[i]
        yield record.image, record.masks, record.captions


def evaluate(checkpoint: str | Path, scenes: int, seed: int = HELD_OUT_SEED, gen_length: int | None = None,
             steps: int | None = None, dtype: str = "auto", verbose: bool = False, cache: str = "none",
             unmask: str = "remask", rotated: float = 0.0, quantize: str | None = None, adapter: str | None = None,
             colors: tuple[str, ...] = synthetic.COLORS, compare: bool = False, annotations: str | None = None) -> dict:
    """`quantize` / `adapter` as `pdlm_jax.load`; `compare`: also run the plain checkpoint (same dtype) and
    report the fraction of generated tokens and of captions that agree with it; `annotations`: judge the
    first `scenes` records of this annotation file instead of synthetic scenes."""
    import pdlm_jax
    from pdlm_jax.api import captioner
    from pdlm_jax.checkpoint import SAMPLER_FILE, sampler_defaults

    defaults = sampler_defaults(adapter if adapter and (Path(adapter) / SAMPLER_FILE).exists() else checkpoint)
    gen_length = defaults["gen_length"] if gen_length is None else gen_length
    steps = defaults["steps"] if steps is None else steps
    model = captioner(pdlm_jax.load(checkpoint, dtype=dtype, quantize=quantize, adapter=adapter))
    plain = captioner(pdlm_jax.load(checkpoint, dtype=dtype)) if compare else None
    agree = {"tokens": 0, "captions": 0, "slots": 0, "plain_correct": 0}
    confusions: dict[str, int] = {}
    by_shapes: dict[int, list[int]] = {}  # number of shapes in the scene -> [correct, regions]
    by_color: dict[str, list[int]] = {}  # colour word of the true caption -> [correct, regions]
    start = time.perf_counter()
    settings = dict(gen_length=gen_length, steps=steps, cache=cache, unmask=unmask)
    for i, (image, masks, captions) in enumerate(_scenes(scenes, seed, rotated, colors, annotations)):
        result, oks = judge(model, image, masks, captions, **settings)
        if plain is not None:
            baseline, plain_oks = judge(plain, image, masks, captions, **settings)
            agree["plain_correct"] += sum(plain_oks)
            for a, b in zip(result["regions"], baseline["regions"]):
                agree["tokens"] += sum(x == y for x, y in zip(a["token_ids"], b["token_ids"]))
                agree["slots"] += len(a["token_ids"])
                agree["captions"] += a["caption"] == b["caption"]
        tally = by_shapes.setdefault(len(masks), [0, 0])
        for truth, region, ok in zip(captions, result["regions"], oks):
            words = truth.split()
            for t in (tally, by_color.setdefault(words[1] if len(words) == 3 else "other", [0, 0])):
                t[0] += ok
                t[1] += 1
            if not ok:
                key = f"{truth} -> {region['caption']!r}"
                confusions[key] = confusions.get(key, 0) + 1
                if verbose:
                    print(f"scene {i}: {key}", file=sys.stderr)
    correct, total = (sum(t[j] for t in by_shapes.values()) for j in (0, 1))
    return {"scenes": scenes, "annotations": annotations, "regions": total, "correct": correct,
            "accuracy": correct / max(total, 1),
            "by_num_shapes": {k: {"correct": c, "regions": n, "accuracy": c / n}
                              for k, (c, n) in sorted(by_shapes.items())},
            "by_color": {k: {"correct": c, "regions": n, "accuracy": c / n} for k, (c, n) in sorted(by_color.items())},
            "gen_length": gen_length, "steps": steps, "cache": cache, "unmask": unmask, "dtype": dtype,
            "rotated": rotated, "colors": list(colors), "quantize": quantize, "adapter": adapter,
            **({"token_agreement": agree["tokens"] / max(agree["slots"], 1),
                "caption_agreement": agree["captions"] / max(total, 1),
                "plain_accuracy": agree["plain_correct"] / max(total, 1)} if compare else {}),
            "seconds": time.perf_counter() - start,
            "top_errors": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:10])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the embedded demo model)")
    ap.add_argument("--scenes", type=int, default=100, help="scenes (or records of --annotations) to caption")
    ap.add_argument("--annotations", help="judge the records of this annotation file instead of synthetic scenes")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="scene stream (default: a held-out one)")
    ap.add_argument("--gen-length", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="compute dtype (auto: the stored dtype, as pdlm-infer)")
    ap.add_argument("--cache", default="none", help="pdlm-infer --cache mode (none, prefix, prefix:R)")
    ap.add_argument("--unmask", default="remask", help="pdlm-infer --unmask mode (remask, threshold:TAU)")
    ap.add_argument("--rotated", type=synthetic.fraction, default=0.0,
                    help="fraction of squares and triangles drawn at any angle (0: upright, as in training)")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none", help="as pdlm-infer --quantize")
    ap.add_argument("--adapter", help="LoRA adapter directory applied to --checkpoint (as pdlm-infer --adapter)")
    ap.add_argument("--colors", type=synthetic.color_list, default=synthetic.COLORS,
                    help="colours of the scenes (comma-separated; default: the demo's four)")
    ap.add_argument("--compare", action="store_true",
                    help="also caption with the plain --checkpoint and report token and caption agreement")
    ap.add_argument("--verbose", action="store_true", help="print every wrong caption")
    args = ap.parse_args(argv)
    checkpoint = args.checkpoint or str(DEMO_MODEL)
    try:
        report = evaluate(checkpoint, args.scenes, args.seed, args.gen_length, args.steps, args.dtype, args.verbose,
                          args.cache, args.unmask, args.rotated, None if args.quantize == "none" else args.quantize,
                          args.adapter, args.colors, args.compare, args.annotations)
    except PDLMError as e:
        print(f"train.eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"exact-caption accuracy: {report['correct']}/{report['regions']} = {report['accuracy']:.1%}")
    if args.compare:
        print(f"plain model: {report['plain_accuracy']:.1%} exact captions; agreement with it: tokens "
              f"{report['token_agreement']:.2%}, captions {report['caption_agreement']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
