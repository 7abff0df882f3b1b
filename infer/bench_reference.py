"""Side-by-side CPU benchmark against the PyTorch reference (MSALab-PKU/PerceptionDLM), on the same weights.

The reference is only imported from a checkout given on the command line (never copied here; it needs
`einops` on the path):

    # 1. random weights of a ~4M-parameter model in the reference format, made by the reference classes
    python -m infer.bench_reference --reference-repo /work/refrepo make --out /tmp/ref4m
    # 2. our checkpoint from them
    pdlm-convert --src /tmp/ref4m --dst /tmp/ours4m --dtype float32
    # 3. time the reference demo's generate path (preprocessing included), then ours
    python -m infer.bench_reference --reference-repo /work/refrepo time --model /tmp/ref4m \\
        --image IMG --masks M0 M1 M2 --gen-length 32 --steps 32 --repeats 3 --json ref.json
    python -m infer.bench --checkpoint /tmp/ours4m --image IMG --masks M0 M1 M2 --modes exact,prefix ...

`make` starts from a reference-format config.json (default: the tiny_v1_wide fixture's: 128-px tiles, patch
8, 64 image tokens per tile) and widens the model (--vision-hidden, --lm-hidden, ...). The demo's own
helpers (`demo/infer_pdmllm.py`) do the preprocessing, `PDMLLM.generate` the rest, as
`python demo/infer_pdmllm.py` does, except that the dtype is a flag (the demo hard-codes bfloat16; on CPU
float32 is the reference's faster and exact setting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from infer.reference_checkout import copy_tokenizer_files, import_package, load_demo
from pdlm_jax.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = ROOT / "tests" / "fixtures" / "tiny_v1_wide"


def _reference(repo: Path):
    """The reference's model classes and demo helpers, imported from the checkout."""
    import_package(repo, "pdmllm")
    from pdmllm.configuration_pdmllm import PDMLLMConfig
    from pdmllm.modeling_pdmllm import PDMLLM

    return PDMLLMConfig, PDMLLM, load_demo(repo, "infer_pdmllm.py", "reference_demo")


def _config(base: Path, args) -> dict:
    cfg = json.loads((base / "config.json").read_text())
    lm, vision = cfg["language_model_config"], cfg["vision_model_config"]
    lm.update(hidden_size=args.lm_hidden, intermediate_size=args.lm_mlp, num_hidden_layers=args.lm_layers,
              num_attention_heads=args.lm_heads, num_key_value_heads=args.lm_heads)
    vision["vision_config"].update(hidden_size=args.vision_hidden, intermediate_size=args.vision_mlp,
                                   num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads)
    vision["hidden_size"] = args.vision_hidden
    cfg["mask_patch_embedding_out_channels"] = args.vision_hidden
    return cfg


def make(args) -> None:
    import torch
    from transformers import SiglipModel

    PDMLLMConfig, PDMLLM, _ = _reference(args.reference_repo)
    torch.manual_seed(args.seed)
    config = PDMLLMConfig(**_config(args.base, args))
    model = PDMLLM(config, vision_model=SiglipModel(config.vision_model_config))
    with torch.no_grad():  # the LM is built without initialisation: give every tensor a defined value
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    copy_tokenizer_files(args.base, args.out)
    n = sum(p.numel() for p in model.parameters())
    lm = sum(p.numel() for p in model.language_model.parameters())
    print(json.dumps({"out": str(args.out), "parameters": n, "language_model_parameters": lm}))


def time_reference(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    PDMLLMConfig, PDMLLM, demo = _reference(args.reference_repo)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = PDMLLMConfig(**json.loads((args.model / "config.json").read_text()))
    model = PDMLLM.from_pretrained(args.model, config=config, vision_model=SiglipModel(config.vision_model_config))
    model.to(dtype).eval()
    settings = json.loads((args.model / "processor_settings.json").read_text())
    image_processor = SiglipImageProcessor(**settings["image_processor"])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    size, lo, hi = settings["image_size"], settings["min_sub_img"], settings["max_sub_img"]
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")

    class Processor:  # the attributes the demo reads from its AutoProcessor
        image_size, min_sub_img, max_sub_img = (size, size), lo, hi

    def caption() -> list[str]:
        """demo/infer_pdmllm.py's __main__ body, from the files to the parsed captions."""
        pil_image = Image.open(args.image).convert("RGB")
        masks = [(np.array(Image.open(m).convert("L").resize(pil_image.size, Image.NEAREST)) > 0).astype(np.uint8)
                 for m in args.masks]
        tiles = demo.dynamic_preprocess(pil_image, min_num=lo, max_num=hi, image_size=size, use_thumbnail=True)
        pixel_values = image_processor.preprocess(images=tiles, return_tensors="pt")["pixel_values"].to(dtype)
        aspect_ratio = demo.compute_aspect_ratio(pil_image, Processor, num_tiles=pixel_values.shape[0])
        order = demo.sort_masks_by_area(masks)
        masks = [masks[i] for i in order]
        bboxes = demo.build_bboxes(masks, tokenizer)
        prompts, prompt_tokens, _ = demo.build_visual_prompt_matrices(masks, prompt_numbers=config.prompt_numbers)
        mask_values = []
        for vp in prompts:
            sub = demo.dynamic_preprocess(vp.convert("RGB"), min_num=lo, max_num=hi, image_size=size,
                                          use_thumbnail=True)
            mask_values.append(image_processor.preprocess(images=sub, return_tensors="pt")["pixel_values"].to(dtype))
        text = demo.build_prompt_text(tokenizer=tokenizer, num_image_token=config.num_image_token,
                                      num_tiles=pixel_values.shape[0], questions=[args.prompt] * len(masks),
                                      gen_len=args.gen_length, num_masks=len(masks))
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(pixel_values=pixel_values, global_mask_values_list=mask_values,
                                 aspect_ratios=aspect_ratio, bboxes=[bboxes], input_ids=input_ids, steps=args.steps,
                                 temperature=0.0, top_p=1.0, tokenizer=tokenizer, prompt_tokens=prompt_tokens,
                                 mask_id=mask_id)  # the released vocabulary's 126336 is out of a small one
        return demo.split_assistant_blocks(tokenizer.decode(out[0], skip_special_tokens=False), len(masks))

    t0 = time.perf_counter()
    captions = caption()
    first = time.perf_counter() - t0
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        caption()
        seconds.append(time.perf_counter() - t0)
    return {"implementation": "reference", "masks": len(args.masks), "dtype": args.dtype,
            "seconds_per_image": statistics.median(seconds), "first_call_seconds": first, "all_seconds": seconds,
            "torch_threads": torch.get_num_threads(), "captions": captions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.bench_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-repo", type=Path, required=True, help="checkout of MSALab-PKU/PerceptionDLM")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="random weights in the reference format")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--base", type=Path, default=DEFAULT_BASE, help="reference-format folder to widen")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--vision-hidden", type=int, default=128)
    m.add_argument("--vision-mlp", type=int, default=256)
    m.add_argument("--vision-layers", type=int, default=3)
    m.add_argument("--vision-heads", type=int, default=2)
    m.add_argument("--lm-hidden", type=int, default=256)
    m.add_argument("--lm-mlp", type=int, default=640)
    m.add_argument("--lm-layers", type=int, default=4)
    m.add_argument("--lm-heads", type=int, default=4)
    t = sub.add_parser("time", help="time the reference demo's generate path")
    t.add_argument("--model", type=Path, required=True, help="a folder written by `make`")
    t.add_argument("--image", required=True)
    t.add_argument("--masks", nargs="+", required=True)
    t.add_argument("--gen-length", type=int, default=32)
    t.add_argument("--steps", type=int, default=32)
    t.add_argument("--prompt", default="Describe each masked region in detail.")
    t.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.command == "make":
        make(args)
        return 0
    result = time_reference(args)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
