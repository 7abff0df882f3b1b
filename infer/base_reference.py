"""Extra oracle cases for PerceptionDLM-Base made by the PyTorch reference itself, and our check against them.

The reference (MSALab-PKU/PerceptionDLM, `smallvlm/models/dmllm`, `demo/infer_dmllm.py`) is imported from a
checkout given on the command line, never copied here. For every case this script

1. builds a random tiny DMLLM with the reference's classes (the architecture of tests/fixtures/base_tiny, new
   weights drawn per seed with each tensor's spread in the fixture) and saves it with `save_pretrained`;
2. answers a question with the reference demo's path on CPU in float32: the demo's `dynamic_preprocess`
   (with the package's own `find_closest_aspect_ratio`, which the demo forgets to define: SPEC-base §B7.1),
   the SigLIP image processor, `DMLLM.chat` with the demo's generation config. As for the fixture, the tiny
   vocabulary needs lm_head's output padded with -inf up to 126464 (the sampler indexes LLaDA's ids) and the
   tokenizer's <|mdm_mask|> passed as `mask_id`;
3. converts the checkpoint with `pdlm-convert` and runs `pdlm-infer --question`, and compares the ids.

    python -m infer.base_reference --reference-repo /path/to/PerceptionDLM --work /tmp/base_cases \\
        [--json cases.json]

It prints one line per case and a summary; the exit status is 1 when any case differs.

With --bench it times instead, on one CPU (the whole process pinned, torch single-threaded), seconds per answer
from the image file on one random DMLLM made by the reference's classes (default ~4M parameters: SigLIP
128/256/3, LLaDA 256/640/4, 128-px tiles of 64 image tokens, base_tiny's tokenizer) and converted with
pdlm-convert: the demo's path (preprocessing + `DMLLM.chat`) against `pdlm_jax.load(...).answer` in each
--modes, interleaved, median of --repeats after one warm-up call. It prints a markdown table and checks that
our exact mode's ids equal the reference's (exit status 1 when they differ):

    python -m infer.base_reference --reference-repo /path/to/PerceptionDLM --work /tmp/base_bench --bench \\
        --gen-length 32 --block-length 32 --steps 32 --repeats 3 [--modes exact,prefix,threshold:0.9] \\
        [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

from infer.reference_checkout import copy_tokenizer_files, import_package, load_demo
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "base_tiny"
PADDED_VOCAB = 126464

# (seed, image (width, height, pattern seed), question, gen_length, block_length, steps): one block and
# several, s < B, s = B, s > B (early exit), remainders in the transfer counts, several tile grids.
CASES = [
    (1, (96, 64, 1), "What is in the picture?", 16, 16, 16),
    (2, (64, 64, 2), "Describe the image in detail.", 12, 4, 6),
    (3, (200, 60, 3), "How many {shapes} are there?", 24, 8, 9),
    (4, (50, 130, 4), "What color is the <image> object?", 8, 4, 12),
    (5, (128, 128, 5), "Is it day or night?", 32, 8, 16),
    (6, (300, 100, 6), "Where is it?", 10, 10, 4),
    (7, (80, 90, 7), "What is the man holding?", 20, 5, 8),
]


def reference_modules(repo: Path):
    """The reference's DMLLM classes and its Base demo, imported from the checkout."""
    import_package(repo, "dmllm")
    import dmllm.modeling_dmllm as modeling
    import dmllm.processing_dmllm as processing
    from dmllm.configuration_dmllm import DMLLMConfig

    # The demo imports DMLLM by its in-repo path; point that name at the module loaded above.
    for name in ("smallvlm", "smallvlm.models", "smallvlm.models.dmllm"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["smallvlm.models.dmllm.modeling_dmllm"] = modeling
    demo = load_demo(repo, "infer_dmllm.py", "reference_base_demo")
    demo.find_closest_aspect_ratio = processing.find_closest_aspect_ratio  # the demo's NameError (§B7.1)
    return DMLLMConfig, modeling.DMLLM, demo


def make_checkpoint(refs, seed: int, out: Path) -> None:
    """A random DMLLM in the reference format: the fixture's architecture, weights redrawn from `seed`."""
    import torch
    from safetensors.numpy import load_file
    from transformers import SiglipModel

    DMLLMConfig, DMLLM, _ = refs
    config = DMLLMConfig.from_pretrained(FIXTURE)
    model = DMLLM(config, vision_model=SiglipModel(config.vision_model_config))
    fixture = {}
    for shard in sorted(FIXTURE.glob("*.safetensors")):
        fixture.update(load_file(shard))
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(fixture):
        t = fixture[name].astype(np.float32)
        norm = t.ndim == 1 and name.endswith("weight")  # norm gains stay as they are
        state[name] = torch.from_numpy(t if norm else (rng.standard_normal(t.shape) * t.std()).astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(FIXTURE, out)


def synthetic_image(width: int, height: int, seed: int):
    """Smooth colour gradients plus a few rectangles: varied, never a zero-sum tile."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * rng.uniform(0.5, 3) + y * rng.uniform(0.5, 3) + rng.uniform(0, 255)) % 256
                    for _ in range(3)], axis=-1)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8))


def load_reference(refs, ckpt: Path) -> types.SimpleNamespace:
    """The reference DMLLM from `ckpt` (float32, CPU) with what the demo builds once: tokenizer, image
    processor, tile settings. As for the fixture, the tiny vocabulary needs lm_head's output padded with -inf
    up to LLaDA's 126464 (§B7.2): the sampler indexes LLaDA's ids."""
    import torch
    from transformers import PreTrainedTokenizerFast, SiglipImageProcessor, SiglipModel

    DMLLMConfig, DMLLM, demo = refs
    config = DMLLMConfig.from_pretrained(ckpt)
    model = DMLLM.from_pretrained(ckpt, config=config, torch_dtype=torch.float32,
                                  vision_model=SiglipModel(config.vision_model_config)).eval()
    head = model.language_model.lm_head

    class PaddedHead(torch.nn.Module):
        def forward(self, x):
            y = head(x)
            pad = torch.full((*y.shape[:-1], PADDED_VOCAB - y.shape[-1]), -float("inf"), dtype=y.dtype)
            return torch.cat([y, pad], dim=-1)

    model.language_model.lm_head = PaddedHead()
    generated = {}
    generate = model.generate

    def recording_generate(**kw):  # chat decodes the ids; keep them for the comparison
        generated["ids"] = generate(**kw)
        return generated["ids"]

    model.generate = recording_generate
    settings = json.loads((ckpt / "processor_settings.json").read_text())
    processor = SiglipImageProcessor(**{k: v for k, v in settings["image_processor"].items()
                                        if k not in ("_processor_class", "image_processor_type")})
    return types.SimpleNamespace(model=model, demo=demo, generated=generated, settings=settings,
                                 processor=processor, tokenizer=PreTrainedTokenizerFast.from_pretrained(ckpt))


def ask_reference(ref: types.SimpleNamespace, image_path: Path, question: str, gen_length: int, block_length: int,
                  steps: int) -> dict:
    """The demo's path from the image file to the answer: `dynamic_preprocess` (with the package's own
    `find_closest_aspect_ratio`, §B7.1), the SigLIP image processor, `DMLLM.chat` with the demo's generation
    config and the tokenizer's <|mdm_mask|> as `mask_id`."""
    import torch
    from PIL import Image

    settings = ref.settings
    tiles = ref.demo.dynamic_preprocess(Image.open(image_path).convert("RGB"), min_num=settings["min_sub_img"],
                                        max_num=settings["max_sub_img"], image_size=settings["image_size"],
                                        use_thumbnail=True)
    pixel_values = ref.processor.preprocess(images=tiles, return_tensors="pt")["pixel_values"].float()
    config = {"steps": steps, "gen_length": gen_length, "block_length": block_length, "temperature": 0.0,
              "top_k": 0, "top_p": 1.0, "cfg_scale": 0.0, "remasking": "low_confidence",
              "mask_id": ref.tokenizer.convert_tokens_to_ids("<|mdm_mask|>")}
    with torch.no_grad():  # chat's plain return is broken (`return x`); the history variant works
        response, _ = ref.model.chat(ref.tokenizer, pixel_values=pixel_values,
                                     num_patches_list=[pixel_values.shape[0]], question=f"<image>\n{question}",
                                     generation_config=config, return_history=True)
    return {"token_ids": ref.generated["ids"][0].tolist(), "tiles": int(pixel_values.shape[0]),
            "answer": response.replace("<think>\n\n</think>", "").strip()}


def reference_answer(refs, ckpt: Path, image_path: Path, question: str, gen_length: int, block_length: int,
                     steps: int) -> dict:
    """The reference demo's answer (float32, CPU) and the G ids its sampler returned."""
    return ask_reference(load_reference(refs, ckpt), image_path, question, gen_length, block_length, steps)


# ---- --bench: seconds per answer, the reference demo's path against ours, on the same random weights ----

def bench_config(args) -> tuple[dict, dict]:
    """(config.json, processor_settings.json) of the benchmark model: base_tiny's, with the widths and the tile
    geometry of the command line (the tokenizer and its 402-token vocabulary stay)."""
    cfg = json.loads((FIXTURE / "config.json").read_text())
    lm, vision = cfg["language_model_config"], cfg["vision_model_config"]
    lm.update(hidden_size=args.lm_hidden, intermediate_size=args.lm_mlp, num_hidden_layers=args.lm_layers,
              num_attention_heads=args.lm_heads, num_key_value_heads=args.lm_heads)
    vision["vision_config"].update(hidden_size=args.vision_hidden, intermediate_size=args.vision_mlp,
                                   num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                                   image_size=args.tile_size, patch_size=args.patch_size)
    vision["hidden_size"] = args.vision_hidden
    tokens = (args.tile_size // args.patch_size // 2) ** 2  # downsample_ratio 0.5: pixel shuffle of 2x2 patches
    cfg.update(image_size=args.tile_size, patch_size=args.patch_size, num_image_token=tokens)
    settings = json.loads((FIXTURE / "processor_settings.json").read_text())
    settings.update(image_size=args.tile_size, patch_size=args.patch_size, num_image_token=tokens)
    settings["image_processor"]["size"] = {"height": args.tile_size, "width": args.tile_size}
    return cfg, settings


def make_bench_checkpoint(refs, args, out: Path) -> dict:
    """A random DMLLM of `bench_config` in the reference format, made and saved by the reference's classes;
    returns its parameter counts."""
    import torch
    from transformers import SiglipModel

    DMLLMConfig, DMLLM, _ = refs
    cfg, settings = bench_config(args)
    torch.manual_seed(args.seed)
    config = DMLLMConfig.from_dict(cfg)
    model = DMLLM(config, vision_model=SiglipModel(config.vision_model_config))
    with torch.no_grad():  # the LM is built without initialisation: give every tensor a defined value
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(FIXTURE, out)
    (out / "processor_settings.json").write_text(json.dumps(settings, indent=2) + "\n")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    return {"total": count(model), "vision_tower": count(model.vision_model.vision_model),
            "projector": count(model.vision_abstractor), "language_model": count(model.language_model)}


def bench_modes(text: str) -> list[str]:
    """Our sampler modes to time (pdlm_jax.generation.Mode names); `exact` is always there, first: it is the
    one checked against the reference."""
    from pdlm_jax.generation import Mode

    names = [m.strip() for m in text.split(",") if m.strip()]
    try:
        modes = [Mode.from_name(m) for m in names]
    except PDLMError as e:
        raise PDLMError(f"--modes {text!r}: {e}") from None
    if any(m.refresh for m in modes):
        raise PDLMError(f"--modes {text!r}: the Base answerer's prefix cache has no refresh period; use 'prefix'")
    return ["exact"] + [m.name for m in modes if m.name != "exact"]


def check_bench_args(args) -> None:
    """PDLMError naming the argument, before any model is built."""
    from pdlm_jax import block_sampling

    if args.repeats < 1:
        raise PDLMError(f"--repeats must be at least 1, got {args.repeats}")
    if args.tile_size % args.patch_size or (args.tile_size // args.patch_size) % 2:
        raise PDLMError(f"--tile-size {args.tile_size} must be an even number of --patch-size {args.patch_size} "
                        "patches (the 2x2 pixel shuffle)")
    try:
        block_sampling.block_schedule(args.gen_length, args.block_length, args.steps)
    except PDLMError as e:
        raise PDLMError(f"--gen-length/--block-length/--steps: {e}") from None
    args.image_size = parse_image_size(args.image)
    args.mode_names = bench_modes(args.modes)


def pin_to_cpu(cpu: int) -> None:
    """The whole process on one CPU (as `taskset -c CPU`), before torch and XLA size their thread pools."""
    if cpu < 0:
        return
    if cpu not in os.sched_getaffinity(0):
        raise PDLMError(f"--cpu {cpu} is not one of this process's CPUs {sorted(os.sched_getaffinity(0))}")
    os.sched_setaffinity(0, {cpu})


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise PDLMError(f"--image {text!r}: give WIDTHxHEIGHT in pixels, e.g. 300x100")
    return w, h


def watch_reference(model) -> dict:
    """Seconds of each reference answer spent in the LM body (`lm`, with the count of its forwards) and in
    lm_head with the -inf padding to 126464 columns (`head`); the caller zeroes them before each answer. The
    rest is preprocessing, the vision tower and the sampler."""
    stats = {"forwards": 0, "lm": 0.0, "head": 0.0}

    def watch(module, key):
        start = {}
        module.register_forward_pre_hook(lambda *_: start.update(t=time.perf_counter()))

        def after(*_):
            stats[key] += time.perf_counter() - start["t"]
            stats["forwards"] += key == "lm"
        module.register_forward_hook(after)

    watch(model.language_model.model, "lm")
    watch(model.language_model.lm_head, "head")
    return stats


def timed_rounds(calls: dict, repeats: int) -> tuple[dict, dict]:
    """One warm-up call per run (our compilation, torch's first-call setup), then `repeats` rounds that call
    every run once, interleaved, so that the other jobs' load changes hit every run alike. Returns
    (results: the warm-up call's and each timed call's, seconds: each timed call's wall time)."""
    results = {name: [fn()] for name, fn in calls.items()}
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            results[name].append(fn())
            seconds[name].append(time.perf_counter() - start)
    return results, seconds


def bench_rows(results: dict, seconds: dict) -> list[dict]:
    """One row per run: median seconds per answer, the reference's median over it, forwards, warm-up call."""
    reference = statistics.median(seconds["reference"])
    rows = []
    for name, timed in seconds.items():
        median = statistics.median(timed)
        rows.append({"run": name, "seconds": median, "vs_reference": reference / median,
                     "forwards": results[name][-1]["forwards"], "first_call_seconds": results[name][0]["wall"],
                     "all_seconds": timed, "answer": results[name][-1]["answer"],
                     "token_ids": results[name][-1]["token_ids"],
                     "stable": all(r["token_ids"] == results[name][0]["token_ids"] for r in results[name])})
    return rows


def markdown_table(rows: list[dict], repeats: int) -> str:
    lines = [f"| run | seconds / answer (median of {repeats}) | vs reference | forwards | first call (s) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "1.0" if r["run"] == "reference" else f"{r['vs_reference']:.1f}×"
        lines.append(f"| {r['run']} | {r['seconds']:.3f} | {ratio} | {r['forwards']} | "
                     f"{r['first_call_seconds']:.2f} |")
    return "\n".join(lines)


def bench(args) -> int:
    """--bench: make, convert, time, check exact ids, print the table, write the JSON."""
    pin_to_cpu(args.cpu)
    check_bench_args(args)
    load_before = os.getloadavg()
    import torch

    import pdlm_jax
    from convert.cli import main as convert_main

    torch.set_num_threads(1)
    refs = reference_modules(args.reference_repo)
    work = args.work / "bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    parameters = make_bench_checkpoint(refs, args, work / "reference")
    image = work / "image.png"
    synthetic_image(*args.image_size, args.seed).save(image)
    if convert_main(["--src", str(work / "reference"), "--dst", str(work / "ours"), "--dtype", "float32"]) != 0:
        raise PDLMError(f"pdlm-convert failed on {work / 'reference'}")

    ref = load_reference(refs, work / "reference")
    ours = pdlm_jax.load(work / "ours")
    stats = watch_reference(ref.model)
    G, B, S = args.gen_length, args.block_length, args.steps

    def reference_call():
        stats.update(forwards=0, lm=0.0, head=0.0)
        start = time.perf_counter()
        out = ask_reference(ref, image, args.question, G, B, S)
        return {**out, "wall": time.perf_counter() - start, **stats}

    def our_call(mode):
        settings = ours.settings(gen_length=G, block_length=B, steps=S, mode=mode)

        def call():
            start = time.perf_counter()
            out = ours.answer(image, args.question, settings)
            return {**out, "wall": time.perf_counter() - start}
        return call

    calls = {"reference": reference_call, **{f"ours, {m}": our_call(m) for m in args.mode_names}}
    results, seconds = timed_rounds(calls, args.repeats)
    report = bench_report(args, parameters, results, seconds, load_before, torch.get_num_threads())
    print_report(report, args)
    if args.json:
        write_json_atomic(args.json, report)
    return 0 if report["token_exact"] and not report["unstable"] else 1


def bench_report(args, parameters: dict, results: dict, seconds: dict, load_before, torch_threads: int) -> dict:
    """The JSON of one --bench run: settings, machine state, the reference's time split, one row per run."""
    rows = bench_rows(results, seconds)
    by_run = {r["run"]: r for r in rows}
    first = results["ours, exact"][0]
    timed_reference = results["reference"][1:]
    return {
        "token_exact": by_run["ours, exact"]["token_ids"] == by_run["reference"]["token_ids"],
        "unstable": [r["run"] for r in rows if not r["stable"]], "reference_answer": by_run["reference"]["answer"],
        "parameters": parameters, "config": bench_config(args)[0],
        "image": {"size": list(args.image_size), "tiles": first["image"]["tiles"], "grid": first["image"]["grid"]},
        "prompt_length": first["prompt_length"], "gen_length": args.gen_length, "block_length": args.block_length,
        "steps": args.steps, "repeats": args.repeats, "question": args.question,
        "cpu_affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch_threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "reference_lm_seconds": statistics.median(r["lm"] for r in timed_reference),
        "reference_head_seconds": statistics.median(r["head"] for r in timed_reference), "rows": rows,
    }


def print_report(report: dict, args) -> None:
    image = report["image"]
    print(f"model: {report['parameters']['total'] / 1e6:.2f}M parameters; image {args.image} ({image['tiles']} "
          f"tiles), prompt {report['prompt_length']} tokens, G/B/S {args.gen_length}/{args.block_length}/"
          f"{args.steps}; CPU {report['cpu_affinity']}, torch threads {report['torch_threads']}; load average "
          f"{report['load_average_before'][0]:.2f} -> {report['load_average_after'][0]:.2f}; of the reference's "
          f"seconds per answer: LM body {report['reference_lm_seconds']:.3f}, lm_head + -inf padding to "
          f"{PADDED_VOCAB} {report['reference_head_seconds']:.3f}")
    print(markdown_table(report["rows"], args.repeats))
    if report["unstable"]:
        print(f"answers changed between calls: {', '.join(report['unstable'])}")
    by_run = {r["run"]: r for r in report["rows"]}
    print("ours, exact: token-exact with the reference" if report["token_exact"] else
          f"ours, exact: DIFFERENT from the reference\n  reference {by_run['reference']['token_ids']}\n"
          f"  ours      {by_run['ours, exact']['token_ids']}")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("--bench", "time the reference demo's path and ours on one random model (folder "
                             "WORK/bench), check that our exact ids equal the reference's")
    b.add_argument("--bench", action="store_true", help="benchmark instead of the oracle cases")
    b.add_argument("--seed", type=int, default=0, help="weights and image pattern")
    b.add_argument("--vision-hidden", type=int, default=128)
    b.add_argument("--vision-mlp", type=int, default=256)
    b.add_argument("--vision-layers", type=int, default=3)
    b.add_argument("--vision-heads", type=int, default=2)
    b.add_argument("--lm-hidden", type=int, default=256)
    b.add_argument("--lm-mlp", type=int, default=640)
    b.add_argument("--lm-layers", type=int, default=4)
    b.add_argument("--lm-heads", type=int, default=4)
    b.add_argument("--tile-size", type=int, default=128, help="tile side in pixels (base_tiny: 64)")
    b.add_argument("--patch-size", type=int, default=8, help="SigLIP patch (base_tiny: 16); 128/8: 64 image "
                   "tokens per tile, as in the region benchmark")
    b.add_argument("--image", default="300x100", help="WIDTHxHEIGHT of the synthetic image (300x100: 3+1 tiles)")
    b.add_argument("--question", default="What is in the picture?")
    b.add_argument("--gen-length", type=int, default=32)
    b.add_argument("--block-length", type=int, default=32)
    b.add_argument("--steps", type=int, default=32)
    b.add_argument("--modes", default="exact,prefix,threshold:0.9",
                   help="our sampler modes (exact, prefix, threshold:TAU, prefix+threshold:TAU); exact always runs")
    b.add_argument("--repeats", type=int, default=3, help="timed calls per run, after one warm-up call")
    b.add_argument("--cpu", type=int, default=1,
                   help="pin the whole process to this CPU (as taskset -c); -1: no pinning")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", type=Path, required=True, help="checkout of MSALab-PKU/PerceptionDLM")
    p.add_argument("--work", type=Path, required=True, help="folder for the checkpoints, images and answers")
    p.add_argument("--json", type=Path, help="write the per-case results (with --bench: the timings) here")
    add_bench_arguments(p)
    args = p.parse_args(argv)
    if args.bench:
        try:
            return bench(args)
        except PDLMError as e:
            print(f"base_reference: error: {e}", file=sys.stderr)
            return 2

    import torch

    from convert.cli import main as convert_main
    from infer.cli import main as infer_main

    torch.set_num_threads(1)
    refs = reference_modules(args.reference_repo)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed, (w, h, pattern), question, G, B, S in CASES:
        case = args.work / f"case{seed}"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        make_checkpoint(refs, seed, case / "reference")
        image = case / "image.png"
        synthetic_image(w, h, pattern).save(image)
        ref = reference_answer(refs, case / "reference", image, question, G, B, S)
        assert convert_main(["--src", str(case / "reference"), "--dst", str(case / "ours")]) == 0
        assert infer_main(["--checkpoint", str(case / "ours"), "--image", str(image), "--question", question,
                           "--gen-length", str(G), "--block-length", str(B), "--steps", str(S),
                           "--output", str(case / "answer.json"), "--quiet"]) == 0
        ours = json.loads((case / "answer.json").read_text())
        same = ours["token_ids"] == ref["token_ids"] and ours["answer"] == ref["answer"]
        rows.append(dict(seed=seed, image=[w, h], tiles=ref["tiles"], question=question, gen_length=G,
                         block_length=B, steps=S, forwards=ours["forwards"], token_exact=same,
                         reference_ids=ref["token_ids"], our_ids=ours["token_ids"]))
        print(f"seed {seed}: image {w}x{h} ({ref['tiles']} tiles) G={G} B={B} S={S} forwards={ours['forwards']}: "
              f"{'token-exact' if same else 'DIFFERENT'}", flush=True)
    exact = sum(r["token_exact"] for r in rows)
    print(f"{exact}/{len(rows)} cases token-exact")
    if args.json:
        write_json_atomic(args.json, rows)
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
