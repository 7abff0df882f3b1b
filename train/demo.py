"""The embedded demo model: its tokenizer, its architecture and its bundled demo scene.

`python -m train.demo tokenizer --out DIR` builds a small byte-level BPE tokenizer (every word of the
prompt and of the synthetic captions is one token; every special token of the real tokenizer is present,
resolved by string). `python -m train.demo scene --out DIR` writes the bundled demo scene. The model is
trained with `pdlm-train --config configs/demo.yaml` and exported to `pdlm_jax/assets/demo_model/`.
`python -m train.demo add-words --words purple --out DIR` writes the demo model's tokenizer with new
caption words, one token each (the LoRA recipe configs/finetune_demo_lora.yaml teaches the word).
"""

from __future__ import annotations

import argparse
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
# Text the tokenizer must encode compactly: the fixed prompts, every question and every answer word
# (captions and answers start right after a special token, hence the forms without a leading space too).
ANSWERS = sorted({a for c in synthetic.COLORS for s in synthetic.SHAPES for a in (
    *synthetic.NUMBERS, c, s, "yes", "no",
    *(synthetic.Item(s, c, z, r, k).place for z in synthetic.SIZES for r in range(3) for k in range(3)))})
CAPTIONS = sorted({synthetic.Item(s, c, z, r, k).caption for c in synthetic.COLORS for s in synthetic.SHAPES
                   for z in synthetic.SIZES for r in range(3) for k in range(3)})
QUESTIONS = sorted({q for i in range(200) for _, q, _ in synthetic.questions(synthetic.make_scene(0, i))})
CORPUS = (["system", "user", "assistant", "You are a helpful assistant.", "Describe each masked region in detail."]
          + CAPTIONS + QUESTIONS + ANSWERS)
VOCAB_SIZE = 512  # the demo models' embedding rows: the tokenizer's ids rounded up
DEMO_SCENE_INDEX = 4  # the first held-out 5-shape scene with all four colours and all three shapes
DEMO_SCENE_SEED = 12345


def build_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json (+ the HF side files) to `out_dir`; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=1,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 50, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    for text in CAPTIONS + ANSWERS:  # one token per word: caption slots and answer blocks stay short
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
    "a {word} {shape}" stays 3 tokens, the caption length the demo model was trained for. The new ids
    are rows of the model's vocabulary no caption used so far."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from pdlm_jax.asset_paths import DEMO_MODEL
    from pdlm_jax.checkpoint import TOKENIZER_FILES

    base, out = Path(base_dir or DEMO_MODEL), Path(out_dir)
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
    scene = synthetic.make_scene(DEMO_SCENE_SEED, DEMO_SCENE_INDEX, num_shapes=5)
    synthetic.write_scene(scene, out_dir)
    (Path(out_dir) / "captions.json").write_text(json.dumps(scene.captions, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.demo")
    ap.add_argument("what", choices=("tokenizer", "scene", "add-words"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--words", nargs="+", default=["purple"], help="add-words: the new caption words")
    args = ap.parse_args(argv)
    if args.what == "tokenizer":
        print(build_tokenizer(args.out))
    elif args.what == "add-words":
        print(add_words(args.out, args.words))
    else:
        write_demo_scene(args.out)


if __name__ == "__main__":
    main()
