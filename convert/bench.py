"""Conversion benchmark: `python -m convert.bench --scale 0.02 0.1 [--lm-layers N] [--vision-layers N] [--compose]`.

For each scale, writes a synthetic bf16 checkpoint in the released key layout (every tensor of the
9.2B model, text tower included; widths multiplied by sqrt(scale) so the parameter count is about
scale x 9.2B, layer counts kept unless overridden), converts it in a child process, and reports time,
GB/s and the child's peak RSS next to the largest stacked parameter array (the memory target is
peak RSS <= largest stacked array + 1 GB). Prints a table and writes JSON. With --compose the same tensors
are written as the two components (a LLaDA folder with Hugging Face names, a SiglipModel folder) and the
child runs `pdlm-convert --compose` on them instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.export_safetensors import plan_shards, reference_config
from convert.reader import reference_shape
from convert.safetensors_file import Entry, FileWriter
from pdlm_jax import keymap
from pdlm_jax.config import PDLMConfig, preset
from pdlm_jax.files import write_json_atomic

TEXT_VOCAB = 256000  # SigLIP text tower (SPEC §1.3); present in the released file, ignored by us
TEXT_POSITIONS = 64


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scaled_config(scale: float, lm_layers: int | None = None, vision_layers: int | None = None) -> PDLMConfig:
    """The released architecture with every width multiplied by sqrt(scale) (heads and geometry kept)."""
    full = preset("perceptiondlm-8b")
    f = math.sqrt(scale)
    v, lm = full.vision, full.lm
    vision = dataclasses.replace(v, hidden_size=_round(v.hidden_size * f, 2 * v.num_heads),
                                 intermediate_size=_round(v.intermediate_size * f, 16),
                                 num_layers=vision_layers or v.num_layers)
    lm = dataclasses.replace(lm, hidden_size=_round(lm.hidden_size * f, 2 * lm.num_heads),
                             intermediate_size=_round(lm.intermediate_size * f, 64),
                             vocab_size=_round(lm.vocab_size * f, 64), num_layers=lm_layers or lm.num_layers)
    return full.replace(vision=vision, lm=lm).validate()


def reference_layout(cfg: PDLMConfig, text_vocab: int = TEXT_VOCAB, text_layers: int | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a released-format checkpoint for `cfg`, including the ones we
    ignore (vision layers after the selected one, post-LN, pooling head, text tower, logit scalars)."""
    shapes = keymap.expected_shapes(cfg)
    out = {}
    for name, (target, layer, transform) in keymap.reference_names(cfg).items():
        out[name] = reference_shape(shapes[target][1:] if layer is not None else shapes[target], transform)
    D, F = cfg.vision.hidden_size, cfg.vision.intermediate_size
    layer_shapes = {
        "layer_norm1.weight": (D,), "layer_norm1.bias": (D,), "layer_norm2.weight": (D,), "layer_norm2.bias": (D,),
        **{f"self_attn.{p}_proj.{w}": (D, D) if w == "weight" else (D,)
           for p in ("q", "k", "v", "out") for w in ("weight", "bias")},
        "mlp.fc1.weight": (F, D), "mlp.fc1.bias": (F,), "mlp.fc2.weight": (D, F), "mlp.fc2.bias": (D,),
    }
    vit = "vision_model.vision_model."
    for j in range(cfg.num_vision_layers_used, cfg.vision.num_layers):
        out.update({f"{vit}encoder.layers.{j}.{k}": s for k, s in layer_shapes.items()})
    out.update({f"{vit}post_layernorm.weight": (D,), f"{vit}post_layernorm.bias": (D,)})
    out.update({
        f"{vit}head.probe": (1, 1, D),
        f"{vit}head.attention.in_proj_weight": (3 * D, D), f"{vit}head.attention.in_proj_bias": (3 * D,),
        f"{vit}head.attention.out_proj.weight": (D, D), f"{vit}head.attention.out_proj.bias": (D,),
        f"{vit}head.layernorm.weight": (D,), f"{vit}head.layernorm.bias": (D,),
        **{f"{vit}head.{k}": s for k, s in layer_shapes.items() if k.startswith("mlp.")},
    })
    txt = "vision_model.text_model."
    out.update({f"{txt}embeddings.token_embedding.weight": (text_vocab, D),
                f"{txt}embeddings.position_embedding.weight": (TEXT_POSITIONS, D)})
    for j in range(cfg.vision.num_layers if text_layers is None else text_layers):
        out.update({f"{txt}encoder.layers.{j}.{k}": s for k, s in layer_shapes.items()})
    out.update({f"{txt}final_layer_norm.weight": (D,), f"{txt}final_layer_norm.bias": (D,),
                f"{txt}head.weight": (D, D), f"{txt}head.bias": (D,),
                "vision_model.logit_scale": (1,), "vision_model.logit_bias": (1,)})
    return out


def write_tensors(directory: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int, config: dict) -> int:
    """A bf16 safetensors folder (shards + index + config.json) holding `shapes` with arbitrary finite values;
    returns its bytes."""
    directory.mkdir(parents=True)
    entries = [Entry(n, "BF16", s) for n, s in shapes.items()]
    shards = plan_shards(entries, shard_bytes)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    # One random block reused everywhere: content does not matter (no compression), writing speed does.
    # Clearing bit 14 keeps the bf16 exponent < 128, so every value is finite.
    block = (np.random.default_rng(0).integers(0, 2**16, 32 * 2**20, dtype=np.uint16) & 0xBFFF).tobytes()
    for name, shard in zip(files, shards):
        writer = FileWriter(directory / name, shard)
        for e in shard:
            out, left = writer.seek(e.name), e.nbytes
            while left:
                n = min(left, len(block))
                out.write(block[:n])
                left -= n
        writer.close()
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: f for f, shard in zip(files, shards) for e in shard}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return sum(e.nbytes for e in entries)


def write_synthetic(cfg: PDLMConfig, directory: Path, shard_bytes: int, text_vocab: int) -> int:
    """A bf16 reference-format checkpoint for `cfg` with arbitrary finite values; returns its bytes."""
    size = write_tensors(directory, reference_layout(cfg, text_vocab), shard_bytes, reference_config(cfg))
    (directory / "tokenizer.json").write_text("{}\n")  # placeholder: the converter only copies it
    return size


def write_components(cfg: PDLMConfig, workdir: Path, shard_bytes: int, text_vocab: int) -> tuple[Path, Path, int]:
    """The reference checkpoint's LM and vision tensors as the component folders `--compose` takes: LLaDA with
    Hugging Face names and a minimal tokenizer, SiglipModel with its text tower. Returns (lm, vision, bytes)."""
    from tokenizers import Tokenizer, models

    layout, config = reference_layout(cfg, text_vocab), reference_config(cfg)
    parts = {}
    for prefix, folder in (("language_model.", "lm"), ("vision_model.", "vision")):
        parts[folder] = {n.removeprefix(prefix): s for n, s in layout.items() if n.startswith(prefix)}
    lm, vision = workdir / "lm", workdir / "vision"
    size = write_tensors(lm, parts["lm"], shard_bytes, config["language_model_config"])
    size += write_tensors(vision, parts["vision"], shard_bytes, {
        "model_type": "siglip", "vision_config": config["vision_model_config"]["vision_config"],
        "text_config": {"vocab_size": text_vocab, "hidden_size": cfg.vision.hidden_size}})
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<|mdm_mask|>", "<|eot_id|>"])
    tokenizer.save(str(lm / "tokenizer.json"))
    return lm, vision, size


def run_child(args: list[str]) -> tuple[float, str, int]:
    """Run `python args...`; return (wall seconds, its stdout, peak RSS bytes of that child)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of exactly this child
        seconds = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"benchmark child {args} failed:\n{stdout}")
    return seconds, stdout, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def bench_one(scale: float, workdir: Path, lm_layers: int | None, vision_layers: int | None,
              compose: bool = False) -> dict:
    cfg = scaled_config(scale, lm_layers, vision_layers)
    src, dst = workdir / f"ref-{scale}", workdir / f"ours-{scale}"
    shapes = keymap.expected_shapes(cfg)
    nparams = sum(math.prod(s) for s in shapes.values())
    shard_bytes, text_vocab = max(64 * 2**20, int(4e9 * scale)), _round(TEXT_VOCAB * math.sqrt(scale), 64)
    if compose:
        lm, vision, source_bytes = write_components(cfg, src, shard_bytes, text_vocab)
        command = ["--compose", "--lm", str(lm), "--vision", str(vision), "--dtype", "bfloat16"]
    else:
        source_bytes = write_synthetic(cfg, src, shard_bytes, text_vocab)
        command = ["--src", str(src)]
    wall, stdout, rss = run_child(["-m", "convert", *command, "--dst", str(dst)])
    seconds = float(re.search(r"time: ([\d.]+) s", stdout).group(1))  # convert()'s own timing, no imports
    stacked = max(math.prod(s) for t, s in shapes.items() if "/layers/" in t) * 2
    out = {
        "mode": "compose" if compose else "convert",
        "scale": scale,
        "parameters": nparams,
        "source_gb": source_bytes / 1e9,
        "output_gb": nparams * 2 / 1e9,
        "seconds": seconds,
        "wall_seconds_with_startup": wall,
        "gb_per_s": nparams * 2 / 1e9 / seconds,
        "peak_rss_gb": rss / 1e9,
        "largest_stacked_gb": stacked / 1e9,
        "largest_leaf_gb": max(math.prod(s) for s in shapes.values()) * 2 / 1e9,
    }
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, nargs="+", default=[0.02, 0.1],
                   help="fractions of the 9.2B parameter count (widths x sqrt(scale)), up to 1.0")
    p.add_argument("--lm-layers", type=int, help="override the LM layer count (32)")
    p.add_argument("--vision-layers", type=int, help="override the vision layer count (27)")
    p.add_argument("--workdir", type=Path, help="where to write the synthetic checkpoints (default: a temp dir)")
    p.add_argument("--compose", action="store_true",
                   help="benchmark pdlm-convert --compose on the same tensors split into LLaDA + SigLIP folders")
    p.add_argument("--json", type=Path, default=Path("bench_convert.json"), help="output JSON file")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pdlm-convert-bench-"))
    # Fixed cost of the child: interpreter + numpy + JAX + Orbax imports.
    _, _, base_rss = run_child(["-c", "import convert.writer"])
    rows = [bench_one(s, workdir, args.lm_layers, args.vision_layers, args.compose) for s in args.scale]
    if not args.workdir:
        shutil.rmtree(workdir)
    head = ("mode", "scale", "params", "out GB", "seconds", "GB/s", "peak RSS GB", "largest stacked GB", "RSS - stacked GB")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["mode"], f"{r['scale']:g}", f"{r['parameters'] / 1e9:.3f}B", f"{r['output_gb']:.2f}",
                          f"{r['seconds']:.1f}", f"{r['gb_per_s']:.3f}", f"{r['peak_rss_gb']:.2f}",
                          f"{r['largest_stacked_gb']:.2f}", f"{r['peak_rss_gb'] - r['largest_stacked_gb']:.2f}"]))
    print(f"(child baseline RSS after imports: {base_rss / 1e9:.2f} GB)")
    write_json_atomic(args.json, {"baseline_rss_gb": base_rss / 1e9, "runs": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
