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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np

from infer.reference_checkout import copy_tokenizer_files, import_package, load_demo
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


def reference_answer(refs, ckpt: Path, image_path: Path, question: str, gen_length: int, block_length: int,
                     steps: int) -> dict:
    """The reference demo's answer (float32, CPU) and the G ids its sampler returned."""
    import torch
    from transformers import PreTrainedTokenizerFast, SiglipImageProcessor
    from PIL import Image

    DMLLMConfig, DMLLM, demo = refs
    from transformers import SiglipModel

    config = DMLLMConfig.from_pretrained(ckpt)
    model = DMLLM.from_pretrained(ckpt, config=config, torch_dtype=torch.float32,
                                  vision_model=SiglipModel(config.vision_model_config)).eval()
    head = model.language_model.lm_head

    class PaddedHead(torch.nn.Module):  # the tiny vocabulary padded with -inf up to LLaDA's (§B7.2)
        def forward(self, x):
            y = head(x)
            pad = torch.full((*y.shape[:-1], PADDED_VOCAB - y.shape[-1]), -float("inf"), dtype=y.dtype)
            return torch.cat([y, pad], dim=-1)

    model.language_model.lm_head = PaddedHead()
    generated = {}
    generate = model.generate

    def recording_generate(**kw):
        generated["ids"] = generate(**kw)
        return generated["ids"]

    model.generate = recording_generate
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    settings = json.loads((ckpt / "processor_settings.json").read_text())
    processor = SiglipImageProcessor(**{k: v for k, v in settings["image_processor"].items()
                                        if k not in ("_processor_class", "image_processor_type")})
    tiles = demo.dynamic_preprocess(Image.open(image_path).convert("RGB"), min_num=settings["min_sub_img"],
                                    max_num=settings["max_sub_img"], image_size=settings["image_size"],
                                    use_thumbnail=True)
    pixel_values = processor.preprocess(images=tiles, return_tensors="pt")["pixel_values"].float()
    config = {"steps": steps, "gen_length": gen_length, "block_length": block_length, "temperature": 0.0,
              "top_k": 0, "top_p": 1.0, "cfg_scale": 0.0, "remasking": "low_confidence",
              "mask_id": tokenizer.convert_tokens_to_ids("<|mdm_mask|>")}
    with torch.no_grad():  # chat's plain return is broken (`return x`); the history variant works
        response, _ = model.chat(tokenizer, pixel_values=pixel_values, num_patches_list=[pixel_values.shape[0]],
                                 question=f"<image>\n{question}", generation_config=config, return_history=True)
    return {"token_ids": generated["ids"][0].tolist(), "tiles": int(pixel_values.shape[0]),
            "answer": response.replace("<think>\n\n</think>", "").strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", type=Path, required=True, help="checkout of MSALab-PKU/PerceptionDLM")
    p.add_argument("--work", type=Path, required=True, help="folder for the checkpoints, images and answers")
    p.add_argument("--json", type=Path, help="write the per-case results here")
    args = p.parse_args(argv)

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
