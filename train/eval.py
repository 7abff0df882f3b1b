"""Accuracy of a model on freshly generated held-out scenes of the synthetic task (the demo models) or on the
records of an annotation file, through the real inference path.

    python -m train.eval [--checkpoint DIR] --scenes N [--seed S]             # region model: exact captions
    python -m train.eval --checkpoint DIR [--adapter DIR] --annotations FILE  # ... of annotation records
    python -m train.eval --checkpoint BASE_DIR --scenes N                     # Base model: exact answers
    python -m train.eval ... --modes exact,prefix,threshold:0.9 [--repeats 3] [--json FILE]   # fast modes

Scenes come from a seed stream the training never used. A region model captions every region
(`pdlm_jax.load(...).caption_regions`, as `pdlm-infer`); a region counts as correct when its caption equals
the annotation ignoring case and punctuation, and each attribute of the task's grammar (size, colour, shape,
place) is scored on its own. A PerceptionDLM-Base model is asked one question of every type the scene admits
(`train.synthetic.one_question_per_type`) and scored per type. Generation settings are the model's
(sampler.json) unless given. pdlm-train's periodic evaluation judges captions with the same function (`judge`).

`--modes` runs the held-out scenes once per sampler mode and prints one table (forwards per image, seconds per
image as the median of `--repeats` timed passes with compilation left out, its ratio to the exact mode, accuracy,
and token agreement with the exact mode).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pdlm_jax.asset_paths import DEMO_MODEL
from pdlm_jax.errors import PDLMError
from train import synthetic

HELD_OUT_SEED = 1_000_003  # training uses small seeds
ATTRIBUTES = ("size", "color", "shape", "place")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def judge(model, image, masks, captions, settings=None) -> tuple[dict, list[bool]]:
    """Caption `masks` of `image` with `model.caption_regions` (a RegionCaptioner: the inference path; `settings`:
    `GenerationSettings`, else the model's defaults); returns its result and, per region, whether the caption
    equals the annotation in `captions`."""
    result = model.caption_regions(image, masks, settings)
    return result, [normalise(r["caption"]) == normalise(truth) for truth, r in zip(captions, result["regions"])]


def _scenes(scenes: int, seed: int, rotated: float, colors: tuple[str, ...], annotations: str | None,
            task: str = "shapes"):
    """(image, masks, captions) of the first `scenes` records of `annotations`, else of synthetic scenes."""
    if annotations is None:
        for i in range(scenes):
            scene = synthetic.make_scene(seed, i, rotated=rotated, colors=colors, task=task)
            yield scene.image, scene.masks, scene.captions
        return
    from train.sources import AnnotationSource

    source = AnnotationSource([annotations])
    for i in range(min(scenes, len(source))):
        record = source[i]
        yield record.image, record.masks, record.captions


def _rate(tallies: dict) -> dict:
    return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in sorted(tallies.items())}


def _add(tallies: dict, key, ok: bool) -> None:
    t = tallies.setdefault(key, [0, 0])
    t[0] += ok
    t[1] += 1


def caption_run(model, scenes: int, seed: int, settings, rotated: float = 0.0,
                colors: tuple[str, ...] = synthetic.COLORS, annotations: str | None = None,
                verbose: bool = False, task: str = "shapes") -> dict:
    """One pass of a RegionCaptioner over the held-out scenes: the tallies and every region's tokens."""
    tallies = {"all": {}, "by_num_shapes": {}, "by_color": {}, "by_attribute": {}}
    confusions: dict[str, int] = {}
    tokens, seconds, forwards = [], 0.0, []
    for i, (image, masks, captions) in enumerate(_scenes(scenes, seed, rotated, colors, annotations, task)):
        result, oks = judge(model, image, masks, captions, settings)
        seconds += result["seconds"] - result["compile_seconds"]
        forwards.append(result["forwards"])
        for truth, region, ok in zip(captions, result["regions"], oks):
            tokens.append(region["token_ids"])
            _add(tallies["all"], "regions", ok)
            _add(tallies["by_num_shapes"], len(masks), ok)
            true_words = synthetic.parse_caption(normalise(truth))
            said = synthetic.parse_caption(normalise(region["caption"])) or {}
            words = normalise(truth).split()  # "a {color} {shape}" or a sentence of the grammar
            color = words[1] if len(words) == 3 else true_words["color"] if true_words else "other"
            _add(tallies["by_color"], color, ok)
            for attribute in ATTRIBUTES if true_words else ():
                _add(tallies["by_attribute"], attribute, said.get(attribute) == true_words[attribute])
            if not ok:
                key = f"{truth} -> {region['caption']!r}"
                confusions[key] = confusions.get(key, 0) + 1
                if verbose:
                    print(f"scene {i}: {key}", file=sys.stderr)
    correct, total = tallies["all"].get("regions", [0, 0])
    return {"regions": total, "correct": correct, "accuracy": correct / max(total, 1),
            **{k: _rate(v) for k, v in tallies.items() if k != "all"},
            "forwards_per_image": float(np.mean(forwards)) if forwards else 0.0,
            "seconds_per_image": seconds / max(len(forwards), 1),
            "top_errors": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:10]), "tokens": tokens}


def question_run(model, scenes: int, seed: int, settings, verbose: bool = False, blank: bool = False) -> dict:
    """One pass of a QuestionAnswerer over held-out scenes of the "sentences" task: one question of every type
    each scene admits. `blank`: ask them about a uniform grey image instead (what the model answers without
    looking: a type scored the same both ways is answered from the question alone)."""
    by_type: dict[str, list[int]] = {}
    confusions: dict[str, int] = {}
    tokens, seconds, forwards, images = [], 0.0, 0, 0
    for i in range(scenes):
        scene = synthetic.make_scene(seed, i, task="sentences")
        rng = np.random.default_rng([seed, i, 2])
        images += 1
        for kind, question, truth in synthetic.one_question_per_type(scene, rng):
            image = np.full_like(scene.image, 128) if blank else scene.image
            result = model.answer(image, question, settings)
            seconds += result["seconds"] - result["compile_seconds"]
            forwards += result["forwards"]
            tokens.append(result["token_ids"])
            ok = normalise(result["answer"]) == normalise(truth)
            _add(by_type, kind, ok)
            if not ok:
                key = f"{question} {truth} -> {result['answer']!r}"
                confusions[key] = confusions.get(key, 0) + 1
                if verbose:
                    print(f"scene {i}: {key}", file=sys.stderr)
    correct, total = (sum(t[j] for t in by_type.values()) for j in (0, 1))
    return {"questions": total, "correct": correct, "accuracy": correct / max(total, 1),
            "by_type": {k: v for k, v in sorted(_rate(by_type).items(), key=lambda kv:
                                                 synthetic.QUESTION_TYPES.index(kv[0]))},
            "forwards_per_image": forwards / max(images, 1), "seconds_per_image": seconds / max(images, 1),
            "top_errors": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:10]), "tokens": tokens}


def _agreement(tokens: list, reference: list) -> float:
    same = sum(int(np.sum(np.asarray(a) == np.asarray(b))) for a, b in zip(tokens, reference))
    return same / max(sum(len(a) for a in reference), 1)


def _check_kind(checkpoint, adapter, modes: list[str], annotations: str | None, blank: bool = False,
                **settings) -> None:
    """PDLMError for settings the checkpoint's kind cannot use, before its weights load."""
    from pdlm_jax.checkpoint import load_config
    from pdlm_jax.generation import for_checkpoint

    for mode in modes:
        for_checkpoint(checkpoint, adapter, mode=mode, **settings)
    base = load_config(checkpoint).is_base
    if annotations is not None and base:
        raise PDLMError("--annotations: a PerceptionDLM-Base model is evaluated on the synthetic task's "
                        "questions; give --scenes only")
    if blank and not base:
        raise PDLMError("--blank-image: only a PerceptionDLM-Base model answers about a whole image; a region "
                        "model's captions need the scene's masks")


def evaluate(checkpoint: str | Path, scenes: int, seed: int = HELD_OUT_SEED, gen_length: int | None = None,
             steps: int | None = None, dtype: str = "auto", verbose: bool = False, cache: str = "none",
             unmask: str = "remask", rotated: float = 0.0, quantize: str | None = None, adapter: str | None = None,
             colors: tuple[str, ...] = synthetic.COLORS, compare: bool = False, annotations: str | None = None,
             block_length: int | None = None, task: str = "shapes", blank: bool = False) -> dict:
    """Accuracy of `checkpoint` (a region model, or a Base model on the task's questions). `quantize` /
    `adapter` as `pdlm_jax.load`; `compare`: also run the plain checkpoint (same dtype, same sampler) and report
    the fraction of generated tokens and of captions/answers that agree with it; `annotations`: judge the first
    `scenes` records of this annotation file instead of synthetic scenes (region models); `blank`: Base models
    answer about a grey image instead of each scene (`question_run`)."""
    import pdlm_jax
    from pdlm_jax.api import RegionCaptioner
    from pdlm_jax.generation import Mode

    mode = Mode.parse(cache, unmask).name
    _check_kind(checkpoint, adapter, [mode], annotations, blank, gen_length=gen_length, steps=steps,
                block_length=block_length)
    model = pdlm_jax.load(checkpoint, dtype=dtype, quantize=quantize, adapter=adapter)
    report = _one_pass(model, mode, scenes, seed, gen_length, steps, block_length, rotated, colors, annotations,
                       verbose, task, blank)
    if compare:
        plain = _one_pass(pdlm_jax.load(checkpoint, dtype=dtype), mode, scenes, seed, gen_length, steps, block_length,
                          rotated, colors, annotations, False, task)
        report |= {"token_agreement": _agreement(report["tokens"], plain["tokens"]),
                   "answer_agreement": float(np.mean([a == b for a, b in zip(report["tokens"], plain["tokens"])])),
                   "plain_accuracy": plain["accuracy"]}
    kind = "region" if isinstance(model, RegionCaptioner) else "base"
    report.pop("tokens")
    return {"checkpoint": str(checkpoint), "kind": kind, "task": "sentences" if kind == "base" else task,
            "scenes": scenes, "seed": seed, "annotations": annotations,
            "mode": mode, "dtype": dtype, "rotated": rotated, "colors": list(colors), "quantize": quantize,
            "adapter": adapter, **({"blank": True} if blank else {}), **report}


def _one_pass(model, mode: str, scenes: int, seed: int, gen_length, steps, block_length, rotated, colors,
              annotations, verbose, task: str = "shapes", blank: bool = False) -> dict:
    from pdlm_jax.api import RegionCaptioner

    settings = model.settings(gen_length=gen_length, steps=steps, block_length=block_length, mode=mode)
    start = time.perf_counter()
    if isinstance(model, RegionCaptioner):
        report = caption_run(model, scenes, seed, settings, rotated, colors, annotations, verbose, task)
    else:
        report = question_run(model, scenes, seed, settings, verbose, blank)
    resolved = {k: getattr(settings, k) for k in ("gen_length", "block_length", "steps")
                if getattr(settings, k) is not None}
    return {**resolved, **report, "seconds": time.perf_counter() - start}


def mode_table(checkpoint: str | Path, scenes: int, modes: list[str], repeats: int = 3, seed: int = HELD_OUT_SEED,
               dtype: str = "auto", gen_length: int | None = None, steps: int | None = None,
               block_length: int | None = None, task: str = "shapes") -> list[dict]:
    """One row per sampler mode over the same held-out scenes (see the module docstring); the first mode is the
    baseline of the ratios and agreements (put `exact` first)."""
    import pdlm_jax

    _check_kind(checkpoint, None, modes, None, gen_length=gen_length, steps=steps, block_length=block_length)
    model = pdlm_jax.load(checkpoint, dtype=dtype)
    rows, baseline = [], None
    for mode in modes:
        passes = [_one_pass(model, mode, scenes, seed, gen_length, steps, block_length, 0.0, synthetic.COLORS,
                            None, False, task) for _ in range(max(repeats, 1))]
        first = passes[0]
        seconds = statistics.median(p["seconds_per_image"] for p in passes)
        baseline = baseline or {"seconds": seconds, "tokens": first["tokens"]}
        rows.append({"mode": mode, "forwards_per_image": first["forwards_per_image"], "seconds_per_image": seconds,
                     "speedup": baseline["seconds"] / seconds, "accuracy": first["accuracy"],
                     "total": first.get("regions", first.get("questions")),
                     "token_agreement": _agreement(first["tokens"], baseline["tokens"]),
                     **{k: first[k] for k in ("gen_length", "steps", "block_length") if k in first},
                     **({"by_type": first["by_type"]} if "by_type" in first else
                        {"by_attribute": first["by_attribute"]})})
    return rows


def print_table(rows: list[dict], unit: str) -> None:
    print(f"| mode | forwards / image | s / image (CPU) | speed vs {rows[0]['mode']} | exact {unit} | "
          f"tokens equal to {rows[0]['mode']}'s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['forwards_per_image']:.2f} | {r['seconds_per_image']:.4f} | "
              f"{r['speedup']:.2f}x | {r['accuracy']:.1%} | {r['token_agreement']:.1%} |")


def trained_task(checkpoint: str) -> str:
    """The synthetic task a pdlm-train export was trained on (its provenance), else "shapes"."""
    from pdlm_jax.files import as_path

    try:
        provenance = json.loads((as_path(checkpoint) / "provenance.json").read_text())
    except (OSError, ValueError):
        return "shapes"
    return (provenance.get("config") or {}).get("data", {}).get("synthetic_task") or "shapes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the embedded demo model)")
    ap.add_argument("--scenes", type=int, default=100, help="scenes (or records of --annotations) to evaluate")
    ap.add_argument("--annotations", help="judge the records of this annotation file instead of synthetic scenes")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="scene stream (default: a held-out one)")
    ap.add_argument("--gen-length", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--block-length", type=int, help="Base models: positions per block of the block sampler")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="compute dtype (auto: the stored dtype, as pdlm-infer)")
    ap.add_argument("--cache", default="none", help="pdlm-infer --cache mode (none, prefix, prefix:R)")
    ap.add_argument("--unmask", default="remask", help="pdlm-infer --unmask mode (remask, threshold:TAU)")
    ap.add_argument("--modes", help="comma-separated sampler modes for the fast-mode table, e.g. exact,prefix,"
                                    "prefix:2,threshold:0.9,prefix+threshold:0.9 (the first is the baseline)")
    ap.add_argument("--repeats", type=int, default=3, help="--modes: timed passes per mode (the median is reported)")
    ap.add_argument("--json", type=Path, help="also write the report (or the --modes table) to this file")
    ap.add_argument("--task", choices=synthetic.TASKS,
                    help="region models: the synthetic task's captions (default: the one the checkpoint was "
                         "trained on; Base models: the questions of 'sentences')")
    ap.add_argument("--rotated", type=synthetic.fraction, default=0.0,
                    help="fraction of squares and triangles drawn at any angle (0: upright, as in training)")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none", help="as pdlm-infer --quantize")
    ap.add_argument("--adapter", help="LoRA adapter directory applied to --checkpoint (as pdlm-infer --adapter)")
    ap.add_argument("--colors", type=synthetic.color_list, default=synthetic.COLORS,
                    help="colours of the scenes (comma-separated; default: the demo's four)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the plain --checkpoint and report token and caption agreement")
    ap.add_argument("--verbose", action="store_true", help="print every wrong caption or answer")
    ap.add_argument("--blank-image", action="store_true",
                    help="Base models: ask every question about a uniform grey image instead of its scene (which "
                         "question types the model answers without looking)")
    args = ap.parse_args(argv)
    checkpoint = args.checkpoint or str(DEMO_MODEL)
    from pdlm_jax.files import write_json_atomic

    args.task = args.task or trained_task(checkpoint)
    try:
        if args.modes:
            rows = mode_table(checkpoint, args.scenes, args.modes.split(","), args.repeats, args.seed, args.dtype,
                              args.gen_length, args.steps, args.block_length, args.task)
            print(json.dumps(rows, indent=2))
            print_table(rows, "answers" if "by_type" in rows[0] else "captions")
            if args.json:
                write_json_atomic(args.json, rows)
            return 0
        report = evaluate(checkpoint, args.scenes, args.seed, args.gen_length, args.steps, args.dtype, args.verbose,
                          args.cache, args.unmask, args.rotated, None if args.quantize == "none" else args.quantize,
                          args.adapter, args.colors, args.compare, args.annotations, args.block_length, args.task,
                          args.blank_image)
    except PDLMError as e:
        print(f"train.eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    if args.json:
        write_json_atomic(args.json, report)
    if report["kind"] == "base":
        print("exact answers: " + ", ".join(f"{k} {v['correct']}/{v['total']} = {v['accuracy']:.1%}"
                                            for k, v in report["by_type"].items()))
        print(f"all questions: {report['correct']}/{report['questions']} = {report['accuracy']:.1%}")
    else:
        if report["by_attribute"]:
            print("attributes: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in report["by_attribute"].items()))
        print(f"exact-caption accuracy: {report['correct']}/{report['regions']} = {report['accuracy']:.1%}")
    if args.compare:
        print(f"plain model: {report['plain_accuracy']:.1%} exact; agreement with it: tokens "
              f"{report['token_agreement']:.2%}, whole captions/answers {report['answer_agreement']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
