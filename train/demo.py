"""The demo models' tools: their tokenizers, the bundled demo scene, the composed Base start and training curves.

`python -m train.demo tokenizer [--task shapes|sentences] --out DIR` builds a small byte-level BPE tokenizer
(every caption and answer word of the synthetic task is one token; every special token of the real tokenizer is
present, resolved by string). `python -m train.demo scene --out DIR` writes the bundled demo scene. The first
demo model (three-word captions, DEMO_SHAPES_MODEL) is trained with `pdlm-train --config configs/demo.yaml`;
`scripts/train_demo2.sh` trains the models of the "sentences" task (a Base model, then DEMO_MODEL from it),
starting from `python -m train.demo base-start` (a pretrained vision tower and projector beside a random
LM).
`python -m train.demo curve --runs RUN... --out STEM` writes runs' training curves (mean loss per 100 steps, and
the periodic evaluation) as STEM.json and STEM.png. `python -m train.demo add-words --words purple --out DIR`
writes the first demo model's tokenizer with new caption words, one token each (the LoRA recipe
configs/finetune_demo_lora.yaml teaches the word).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from train import synthetic

SPECIAL_TOKENS = (
    ["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]"]
    + [f"<|reserved_token_{i}|>" for i in range(16)]
    + ["<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<IMG_CONTEXT>", "<img>", "</img>"]
    + [f"<|Mask_Cap_{i}|>" for i in range(16)]
    + [f"<Prompt{i}>" for i in range(6)]
    + ["<NO_Prompt>"]
)
PROMPTS = ["system", "user", "assistant", "You are a helpful assistant.", "Describe each masked region in detail."]
# The words the "sentences" task's captions and answers use, each one token (captions and answers start right
# after a special token, hence the forms without a leading space too).
ANSWERS = sorted({a for c in synthetic.COLORS for s in synthetic.SHAPES for a in (
    *synthetic.NUMBERS, c, s, "yes", "no",
    *(synthetic.Item(s, c, z, r, k).place for z in synthetic.SIZES for r in range(3) for k in range(3)))})
SENTENCES = sorted({synthetic.Item(s, c, z, r, k).caption for c in synthetic.COLORS for s in synthetic.SHAPES
                    for z in synthetic.SIZES for r in range(3) for k in range(3)})
QUESTIONS = sorted({q for i in range(200)
                    for _, q, _ in synthetic.questions(synthetic.make_scene(0, i, task="sentences"))})
# per task: the text the tokenizer must encode compactly, the phrases that must be one token a word, and the BPE
# vocabulary asked for (before the special tokens)
CORPORA = {
    "shapes": (PROMPTS + [f"a {c} {s}" for c in synthetic.COLORS for s in synthetic.SHAPES],
               [f"a {c} {s}" for c in synthetic.COLORS for s in synthetic.SHAPES], 420),
    "sentences": (PROMPTS + SENTENCES + QUESTIONS + ANSWERS, SENTENCES + ANSWERS, 512 - len(SPECIAL_TOKENS)),
}
VOCAB_SIZE = 512  # the sentences models' embedding rows: their tokenizer's ids rounded up
DEMO_SCENE_INDEX = 4  # the first held-out 5-shape scene with all four colours, all three shapes and both sizes
DEMO_SCENE_SEED = 12345


def build_tokenizer(out_dir: str | Path, task: str = "shapes") -> Path:
    """Write the tokenizer of `task`'s models (tokenizer.json + the HF side files) to `out_dir`; returns the
    tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus, phrases, vocab_size = CORPORA[task]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 50, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    for text in phrases:  # one token per word: caption slots and answer blocks stay short
        ids = tok.encode(text).ids
        assert len(ids) == len(text.split()), (text, tok.encode(text).tokens)
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "model_max_length": 4096}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<IMG_CONTEXT>", "<img>", "</img>"]
        + [f"<|Mask_Cap_{i}|>" for i in range(16)]}, indent=2))
    return out / "tokenizer.json"


def add_words(out_dir: str | Path, words: list[str], base_dir: str | Path | None = None) -> Path:
    """The demo model's tokenizer (or `base_dir`'s) with " word" added as one token per word: a caption
    "a small {word} circle in the top left" stays 8 tokens, within the caption slots the demo model was trained
    for. The new ids are rows of the model's vocabulary (VOCAB_SIZE) no caption used so far."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from pdlm_jax.asset_paths import DEMO_SHAPES_MODEL
    from pdlm_jax.checkpoint import TOKENIZER_FILES

    base, out = Path(base_dir or DEMO_SHAPES_MODEL), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_tokens([AddedToken(f" {w}", normalized=False) for w in words])
    tok.save(str(out / "tokenizer.json"))
    for name in TOKENIZER_FILES[1:]:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out / "tokenizer.json"


def write_demo_scene(out_dir: str | Path) -> None:
    """The bundled scene of `pdlm-infer --demo`: image.png and mask_{i}.png."""
    scene = synthetic.make_scene(DEMO_SCENE_SEED, DEMO_SCENE_INDEX, num_shapes=5, task="sentences")
    synthetic.write_scene(scene, out_dir)
    (Path(out_dir) / "captions.json").write_text(json.dumps(scene.captions, indent=2) + "\n")


def base_start(config: str | Path, out: str | Path, vision: str | Path | None = None, pretrain_steps: int = 0
               ) -> Path:
    """A Base starting checkpoint composed as the recipe composes Base stage 1 (SPEC-train-base T3,
    `pdlm-convert --compose`): a vision tower (checkpoint `vision`'s, or with None a random one of the config's
    shape) beside a randomly initialised LM and projector (the config's model, run.seed), with the config's
    tokenizer. With `pretrain_steps`, the tower and projector are first pretrained that many steps on the
    synthetic scenes (train.tower_pretraining), standing in for SigLIP's pretraining and a projector alignment;
    the curve is written beside the checkpoint as tower_pretraining.json."""
    import jax
    import numpy as np

    from pdlm_jax import sharding
    from pdlm_jax.checkpoint import restore_params
    from pdlm_jax.errors import PDLMError
    from train import checkpointing, config as train_config, step as step_lib

    cfg = train_config.load(str(config), ["model.init_from=null"])  # the config trains from what this writes
    model_cfg = cfg.model_config()
    mesh = sharding.make_mesh("data:1", jax.devices()[:1])
    params = jax.device_get(step_lib.init_params(model_cfg, cfg.run.seed, mesh,
                                                 vision_pos_embed=cfg.model.vision_pos_embed_init))
    composed = {"vision": f"random, seed {cfg.run.seed}", "lm_and_projector": f"random, seed {cfg.run.seed}"}
    if vision is not None:
        tensors = restore_params(vision, dtype=np.float32)[1]["vision"]
        if jax.tree.map(np.shape, tensors) != jax.tree.map(np.shape, params["vision"]):
            raise PDLMError(f"--vision {vision}: its vision tower does not fit {config}'s vision config")
        params["vision"], composed["vision"] = tensors, str(vision)
    curve = []
    if pretrain_steps:
        from train import tower_pretraining

        run = tower_pretraining.TowerPretraining(pretrain_steps, seed=cfg.run.seed)
        pretrained, curve = tower_pretraining.pretrain(model_cfg, params, run)
        params |= pretrained
        composed |= {"lm_and_projector": f"random LM, seed {cfg.run.seed}; projector pretrained with the tower",
                     "vision_pretraining": dataclasses.asdict(run)}
    path = checkpointing.export(out, model_cfg, params, cfg.tokenizer_dir(), cfg.exported_sampler(model_cfg),
                                {"composed": composed})
    if curve:
        (Path(out) / "tower_pretraining.json").write_text(json.dumps(curve, indent=1) + "\n")
    return path


CURVE_BIN = 100  # steps per point of a training curve


def read_curve(run_dir: str | Path) -> dict:
    """Mean training loss per CURVE_BIN steps and every periodic evaluation of a pdlm-train run's log.jsonl."""
    bins: dict[int, list[float]] = {}
    evals = []
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            bins.setdefault(-(-row["step"] // CURVE_BIN) * CURVE_BIN, []).append(row["loss"])
        if "eval_loss" in row:
            evals.append({k: row[k] for k in ("step", "eval_loss", "eval_accuracy") if k in row})
    return {"run": str(run_dir), "loss_per_100_steps": {step: sum(v) / len(v) for step, v in sorted(bins.items())},
            "evaluations": evals}


def write_curves(runs: list[str], labels: list[str], stem: str | Path) -> tuple[Path, Path]:
    """STEM.json (`read_curve` of each run) and STEM.png: the loss (log scale) and, where the runs evaluated,
    the held-out exact-caption accuracy, one colour per run."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    curves = [read_curve(r) | {"label": label} for r, label in zip(runs, labels)]
    stem = Path(stem)
    stem.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    panels = [("training loss (mean per 100 steps, log scale)", "loss_per_100_steps", True)]
    if any(c["evaluations"] for c in curves):
        panels.append(("held-out exact captions (periodic evaluation)", "evaluations", False))
    W, H, pad = 720, 260, 48
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", (W, H * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    colours = [(0, 114, 178), (213, 94, 0), (0, 158, 115)]
    last = max(max(map(int, c["loss_per_100_steps"])) for c in curves)

    def x_of(step):
        return pad + (W - 2 * pad) * step / last

    for p, (title, key, log) in enumerate(panels):
        top = p * H
        series = [[(int(s), v) for s, v in c[key].items()] if key != "evaluations" else
                  [(e["step"], e["eval_accuracy"]) for e in c[key] if "eval_accuracy" in e] for c in curves]
        values = [v for s in series for _, v in s]
        lo, hi = (math.log10(min(values)), math.log10(max(values))) if log else (0.0, 1.0)

        def y_of(v):  # this panel's scale
            return top + H - pad - (H - 2 * pad) * (((math.log10(v) if log else v) - lo) / max(hi - lo, 1e-9))

        draw.rectangle((pad, top + pad, W - pad, top + H - pad), outline=(120, 120, 120))
        draw.text((pad, top + 12), title, fill="black", font=font)
        for tick in (lo, (lo + hi) / 2, hi):
            label = f"{10 ** tick:.3g}" if log else f"{tick:.0%}"
            draw.text((4, y_of(10 ** tick if log else tick) - 7), label, fill="black", font=font)
        draw.text((W - pad - 60, top + H - pad + 6), f"step {last}", fill="black", font=font)
        for i, (points, curve) in enumerate(zip(series, curves)):
            if len(points) > 1:
                draw.line([(x_of(s), y_of(v)) for s, v in points], fill=colours[i % 3], width=2)
            draw.text((W - pad - 200, top + pad + 6 + 16 * i), curve["label"], fill=colours[i % 3], font=font)
    image.save(stem.with_suffix(".png"))
    return stem.with_suffix(".json"), stem.with_suffix(".png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.demo")
    ap.add_argument("what", choices=("tokenizer", "scene", "add-words", "curve", "base-start"))
    ap.add_argument("--out", required=True, help="a folder; curve: the stem of the .json and .png written")
    ap.add_argument("--words", nargs="+", default=["purple"], help="add-words: the new caption words")
    ap.add_argument("--runs", nargs="+", help="curve: pdlm-train output folders")
    ap.add_argument("--labels", nargs="+", help="curve: one legend label per run (default: the folders)")
    ap.add_argument("--task", choices=synthetic.TASKS, default="shapes", help="tokenizer: the task's words")
    ap.add_argument("--vision", help="base-start: the checkpoint whose vision tower to start from (default: a "
                    "random tower of the config's shape)")
    ap.add_argument("--config", help="base-start: the Base demo's training config")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="base-start: first pretrain the tower and projector this many steps on the synthetic "
                    "scenes")
    args = ap.parse_args(argv)
    if args.what == "tokenizer":
        print(build_tokenizer(args.out, args.task))
    elif args.what == "add-words":
        print(add_words(args.out, args.words))
    elif args.what == "base-start":
        import logging

        from pdlm_jax.errors import PDLMError

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("pdlm-train").setLevel(logging.INFO)
        if not args.config:
            ap.error("base-start needs --config")
        if args.pretrain_steps < 0:
            ap.error(f"--pretrain-steps must be 0 (no pretraining) or more, got {args.pretrain_steps}")
        try:
            print(base_start(args.config, args.out, args.vision, args.pretrain_steps))
        except PDLMError as e:
            ap.exit(2, f"python -m train.demo: error: {e}\n")
    elif args.what == "curve":
        if not args.runs or (args.labels and len(args.labels) != len(args.runs)):
            ap.error("curve needs --runs, and one --labels entry per run if any")
        print(*write_curves(args.runs, args.labels or args.runs, args.out))
    else:
        write_demo_scene(args.out)


if __name__ == "__main__":
    main()
